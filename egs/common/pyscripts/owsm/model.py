#!/usr/bin/env python3
"""Stage 2: a locally downloaded OWSM model, ready to be the frozen base of the fine-tuning runs.

    <owsm_dir>  (an ESPnet model directory, e.g. a copy of huggingface.co/espnet/owsm_v3.1_ebf)
      -> <out_dir>/config.yaml   the model's training config; its file paths (bpemodel,
                                 normalize_conf.stats_file, a token_list file) made absolute
         <out_dir>/tokens.txt    OWSM's token list, one token a line (fine-tuning keeps it)
         <out_dir>/model.pth     symlink to the model's weights

The model is named by <owsm_dir>/meta.yaml (ESPnet's packing: yaml_files.s2t_train_config,
files.s2t_model_file) or, without it, by the one config.yaml under <owsm_dir> that has a .pth
file next to it. A path in the config is looked for as written and then as every shorter tail of
it under <owsm_dir> (a config written on another machine still resolves); a missing
non_linguistic_symbols file is dropped (a BPE model holds its special tokens). The token list must
hold the tokens the recipe writes and decodes with: the language and task tokens, <notimestamps>
and <na>. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

PATH_KEYS = (("bpemodel",), ("normalize_conf", "stats_file"), ("token_list",), ("non_linguistic_symbols",))
OPTIONAL_PATH_KEYS = (("non_linguistic_symbols",),)
REQUIRED_TOKENS = ("<notimestamps>", "<na>")


class OwsmModelError(Exception):
    """An OWSM directory that cannot serve as the base model; the message says what was expected."""


def find_model(owsm_dir: Path) -> tuple[Path, Path]:
    """(training config, model file) of the ESPnet model in ``owsm_dir``."""
    if not owsm_dir.is_dir():
        raise OwsmModelError(f"--owsm_dir {owsm_dir} does not exist; give the downloaded OWSM model's dir")
    meta_file = owsm_dir / "meta.yaml"
    if meta_file.is_file():
        meta = yaml.safe_load(meta_file.read_text()) or {}
        try:
            config = owsm_dir / meta["yaml_files"]["s2t_train_config"]
            model = owsm_dir / meta["files"]["s2t_model_file"]
        except (KeyError, TypeError):
            raise OwsmModelError(
                f"{meta_file} has no yaml_files.s2t_train_config and files.s2t_model_file: "
                "is this an OWSM (speech-to-text) model?"
            ) from None
        for path in (config, model):
            if not path.is_file():
                raise OwsmModelError(f"{meta_file} names {path}, which does not exist")
        return config, model
    candidates = [
        (config, sorted(config.parent.glob("*.pth")))
        for config in sorted(owsm_dir.rglob("config.yaml"))
        if any(config.parent.glob("*.pth"))
    ]
    if len(candidates) == 1 and len(candidates[0][1]) == 1:
        return candidates[0][0], candidates[0][1][0]
    found = [f"{config} with {[m.name for m in models]}" for config, models in candidates] or "none"
    raise OwsmModelError(
        f"{owsm_dir} has no meta.yaml, and not exactly one config.yaml with one .pth file next to it "
        f"(found: {found}); expected an ESPnet model directory such as a copy of espnet/owsm_v3.1_ebf"
    )


def resolve_path(value: str, owsm_dir: Path, key: str, config_file: Path) -> str | None:
    """``value`` if it exists, else the first existing tail of it under ``owsm_dir``; absolute.
    None for a missing optional file."""
    path = Path(value)
    candidates = [path] if path.is_absolute() else [owsm_dir / path, config_file.parent / path]
    parts = path.parts[1:] if path.is_absolute() else path.parts
    candidates += [owsm_dir.joinpath(*parts[i:]) for i in range(len(parts))]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    if (key,) in OPTIONAL_PATH_KEYS:
        print(f"owsm_model.py: {key} {value!r} not found; left out", file=sys.stderr)
        return None
    raise OwsmModelError(f"{key} {value!r} of {config_file} is not found as written nor under {owsm_dir}")


def resolved_config(config_file: Path, owsm_dir: Path) -> dict[str, Any]:
    """The training config with every file path of PATH_KEYS absolute."""
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    for keys in PATH_KEYS:
        holder = config
        for key in keys[:-1]:
            holder = holder.get(key) or {}
        value = holder.get(keys[-1])
        if isinstance(value, str):
            holder[keys[-1]] = resolve_path(value, owsm_dir, ".".join(keys), config_file)
    return config


def token_list(config: dict[str, Any], config_file: Path, needed: list[str]) -> list[str]:
    tokens = config.get("token_list")
    if isinstance(tokens, str):
        tokens = Path(tokens).read_text(encoding="utf-8").split()
    if not isinstance(tokens, list) or not tokens:
        raise OwsmModelError(f"{config_file} has no token_list")
    missing = [t for t in needed if t not in tokens]
    if missing:
        languages = [t for t in tokens if len(t) == 5 and t.startswith("<") and t.endswith(">")][:8]
        raise OwsmModelError(
            f"the token list of {config_file} lacks {missing}; the recipe writes and decodes with them "
            f"(give --lang_sym/--task_sym as this model spells them, e.g. one of {languages})"
        )
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owsm_dir", type=Path, required=True, help="downloaded OWSM model directory")
    parser.add_argument("--out_dir", type=Path, required=True, help="output: config, tokens, model link")
    parser.add_argument("--lang_sym", default="<eng>", help="language token the data prep wrote")
    parser.add_argument("--task_sym", default="<asr>", help="task token the data prep wrote")
    args = parser.parse_args(argv)
    try:
        config_file, model_file = find_model(args.owsm_dir)
        config = resolved_config(config_file, args.owsm_dir)
        tokens = token_list(config, config_file, [args.lang_sym, args.task_sym, *REQUIRED_TOKENS])
    except OwsmModelError as error:
        print(f"owsm_model.py: error: {error}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    (args.out_dir / "config.yaml").write_text(text, encoding="utf-8")
    (args.out_dir / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    link = args.out_dir / "model.pth"
    link.unlink(missing_ok=True)
    link.symlink_to(model_file.resolve())
    print(f"OWSM model {model_file} ({len(tokens)} tokens) -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
