"""Layer analysis for feature fusion (Huo et al., 2022, its first step): the same small fusion head
trained on each single tap H_l of the frozen encoder, and WER and CER against l on each test set,
to choose the taps and groups of a fusion block.

    python egs/common/pyscripts/fusion_layers.py --config conf/fusion.yaml --layers all \\
        --output_dir exp/layers --test accent=data/accent_dev --test child=data/child_dev \\
        --decode_config conf/decode.yaml -- \\
        --peft_pretrained exp/base/valid.acc.ave.pth \\
        --train_data_path_and_name_and_type data/adapt/wav.scp,speech,sound ...

For every layer l: ``python -m espnet_plugins.bin.<task>_train --config <config> --fusion taps=[l]
--fusion groups=1 --output_dir <output_dir>/layer<l>`` followed by the options after ``--``
(skipped when ``<model_file>`` is there), then ``<task>_inference`` of that model on every test
set (skipped when its hypotheses are newer than the model and the test's wav.scp). ``<config>`` is
an ordinary training config with a fusion block (its variant and knobs; default ``weighted_sum``,
which on one tap is LN(H_l) and leaves the decoder and CTC head to learn). Choose the taps on dev
sets, never on the tests that report results.

Writes ``<output_dir>/layers.csv`` (layer, test, WER, CER, words) and ``layers.png`` (WER and CER
against the layer, a line per test set), scored by ``scoring.error_rates``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import yaml
from kaldi_files import read_table
from scoring import error_rates

FIELDS = ("layer", "test", "WER", "CER", "words")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["asr", "s2t"], default="asr")
    parser.add_argument("--config", type=Path, required=True, help="training config with a fusion block")
    parser.add_argument("--layers", nargs="+", default=["all"], help="tap indices, or all (0 .. blocks)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--test", action="append", default=[], help="name=data_dir (wav.scp and text)")
    parser.add_argument("--decode_config", type=Path, default=None, help="inference options (--config)")
    parser.add_argument("--model_file", default="valid.acc.best.pth", help="which model of a layer's run")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv[:split])
    train_options = argv[split + 1 :]
    tests = {}
    for item in args.test:
        name, _, directory = item.partition("=")
        if not name or not directory or not (Path(directory) / "text").is_file():
            parser.error(f"--test {item!r}: give name=data_dir, a data dir with wav.scp and text")
        tests[name] = Path(directory)
    if not tests:
        parser.error("give at least one --test name=data_dir")
    args.tests = tests
    return args, train_options


def pretrained_blocks(config: Path, train_options: list[str]) -> int:
    """The number of encoder blocks of the pretrained model (``peft_pretrained``'s config.yaml)."""
    pretrained = yaml.safe_load(config.read_text()).get("peft_pretrained")
    if "--peft_pretrained" in train_options:
        pretrained = train_options[train_options.index("--peft_pretrained") + 1]
    source = Path(pretrained).parent / "config.yaml" if pretrained else None
    if source is None or not source.is_file():
        raise SystemExit(
            "--layers all needs the pretrained model's config.yaml (next to --peft_pretrained) to count "
            "the encoder's blocks; list the layers instead (--layers 0 3 6)"
        )
    blocks = (yaml.safe_load(source.read_text()).get("encoder_conf") or {}).get("num_blocks")
    if not isinstance(blocks, int):
        raise SystemExit(f"{source} has no encoder_conf.num_blocks; list the layers instead (--layers 0 3 6)")
    return blocks


def layers_of(args: argparse.Namespace, train_options: list[str]) -> list[int]:
    if args.layers == ["all"]:
        return list(range(pretrained_blocks(args.config, train_options) + 1))
    try:
        return sorted({int(layer) for layer in args.layers})
    except ValueError:
        raise SystemExit(f"--layers takes block indices or all; got {' '.join(args.layers)}") from None


def run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({result.returncode}); see {log}")


def train_layer(args: argparse.Namespace, layer: int, train_options: list[str]) -> Path:
    """The model file of the head on tap ``layer`` (trained unless it exists)."""
    directory = args.output_dir / f"layer{layer}"
    model = directory / args.model_file
    if model.is_file():
        return model
    command = [args.python, "-m", f"espnet_plugins.bin.{args.task}_train", "--config", str(args.config)]
    command += ["--fusion", f"taps=[{layer}]", "--fusion", "groups=1", "--output_dir", str(directory)]
    run([*command, *train_options], args.output_dir / f"layer{layer}.log")
    return model


def decode(args: argparse.Namespace, layer: int, model: Path, name: str, data: Path) -> dict[str, str]:
    """Hypotheses of the layer's model on the test set ``data`` (decoded unless hypotheses newer than
    the model and the test's wav.scp are there)."""
    directory = args.output_dir / f"layer{layer}" / f"decode_{name}"
    hypotheses = directory / "1best_recog" / "text"
    newest_input = max(model.stat().st_mtime, (data / "wav.scp").stat().st_mtime)
    if hypotheses.is_file() and hypotheses.stat().st_mtime > newest_input:
        return read_table(hypotheses)
    task = args.task
    command = [args.python, "-m", f"espnet_plugins.bin.{task}_inference"]
    if args.decode_config is not None:
        command += ["--config", str(args.decode_config)]
    command += [f"--{task}_train_config", str(model.parent / "config.yaml")]
    command += [f"--{task}_model_file", str(model), "--output_dir", str(directory)]
    command += ["--data_path_and_name_and_type", f"{data}/wav.scp,speech,sound"]
    run(command, directory.with_suffix(".log"))
    return read_table(hypotheses)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for test in dict.fromkeys(row["test"] for row in rows):
        mine = [row for row in rows if row["test"] == test]
        for axis, metric in zip(axes, ("WER", "CER"), strict=True):
            axis.plot([row["layer"] for row in mine], [row[metric] for row in mine], marker="o", label=test)
    for axis, metric in zip(axes, ("WER", "CER"), strict=True):
        axis.set_xlabel("tapped layer (0: embedding output)")
        axis.set_ylabel(f"{metric} %")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args, train_options = parse_args(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, object]] = []
    for layer in layers_of(args, train_options):
        model = train_layer(args, layer, train_options)
        for name, data in args.tests.items():
            wer, cer = error_rates(read_table(data / "text"), decode(args, layer, model, name, data))
            rows.append(
                {"layer": layer, "test": name, "WER": round(wer.percent, 2), "CER": round(cer.percent, 2),
                 "words": wer.length}
            )  # fmt: skip
    with (args.output_dir / "layers.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.output_dir / "layers.png")
    print(f"wrote {args.output_dir / 'layers.csv'} and {args.output_dir / 'layers.png'}")


if __name__ == "__main__":
    main()
