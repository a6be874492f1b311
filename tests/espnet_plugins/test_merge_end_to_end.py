"""Merging ESPnet experiments end to end, through ``espnet_plugins.bin.merge_models``.

The tiny tone model (``tone_base`` of conftest.py, pretrained by stock ESPnet on the source
domain) is fine-tuned to two pitch-shifted domains (up and down) twice: fully (stock
``espnet2.bin.asr_train --init_param``) and with SSVD-O adapters (the plugin). Each pair is merged
into one ordinary model directory, which stock ``espnet2.bin.asr_inference`` decodes; a grid
search picks the merge's scaling on dev data.
"""

from __future__ import annotations

from pathlib import Path

import editdistance
import pytest
import torch
import yaml
from espnet_runs import REPO, TINY_CONFIG, data_args, decode, read_text_file, run_module
from tiny_corpus import CHARACTERS, write_data_dir, write_token_list

pytest.importorskip("espnet2")

from espnet_plugins.bin import merge_models
from ssvd_peft.layers.base import ADAPTERS_ATTR
from ssvd_peft.merging import AdapterMerge
from ssvd_peft.merging import merge_models as merge_state_dicts

DOMAINS = {"up": 1.25, "down": 0.78}
ADAPT_EPOCHS = 3


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per domain adapt and dev sets, and one test set of both domains."""
    root = tmp_path_factory.mktemp("merge")
    for index, (domain, shift) in enumerate(DOMAINS.items()):
        write_data_dir(root / "data" / f"adapt_{domain}", 32, shift=shift, seed=10 + index)
        write_data_dir(root / "data" / f"dev_{domain}", 8, shift=shift, seed=20 + index)
        write_data_dir(root / "data" / f"test_{domain}", 24, shift=shift, seed=30 + index)
    join_data_dirs(root / "data" / "dev", {domain: root / "data" / f"dev_{domain}" for domain in DOMAINS})
    join_data_dirs(root / "data" / "test", {domain: root / "data" / f"test_{domain}" for domain in DOMAINS})
    write_token_list(root / "data" / "tokens.txt")
    return root


def join_data_dirs(target: Path, sources: dict[str, Path]) -> None:
    """One data dir of several, every utterance id prefixed with its source's name."""
    target.mkdir(parents=True)
    for name in ("wav.scp", "text", "speech_shape"):
        lines = [
            f"{prefix}-{line}"
            for prefix, source in sources.items()
            for line in (source / name).read_text().splitlines()
        ]
        (target / name).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def base(tone_base: Path) -> Path:
    """The base model's experiment dir (config.yaml, valid.acc.best.pth)."""
    return tone_base.parent


def fine_tune(work: Path, base: Path, domain: str, kind: str) -> Path:
    """A full fine-tune (stock ESPnet from the base's weights) or an SSVD-O adapter of ``domain``."""
    exp = work / "exp" / f"{kind}_{domain}"
    data = data_args("train", work / "data" / f"adapt_{domain}") + data_args(
        "valid", work / "data" / f"dev_{domain}"
    )
    common = ["--output_dir", str(exp), "--max_epoch", str(ADAPT_EPOCHS), *data]
    if kind == "full":
        args = ["--config", str(TINY_CONFIG), "--token_list", "data/tokens.txt", "--init_param"]
        args += [str(base / "valid.acc.best.pth"), "--optim_conf", "lr=0.002", *common]
        run_module("espnet2.bin.asr_train", args, work, work / f"{kind}_{domain}.log")
    else:
        args = ["--config", str(REPO / "conf" / "tiny" / "finetune_ssvd_o.yaml")]
        args += ["--peft_pretrained", str(base / "valid.acc.best.pth"), *common]
        run_module("espnet_plugins.bin.asr_train", args, work, work / f"{kind}_{domain}.log")
    return exp


@pytest.fixture(scope="module")
def experiments(work: Path, base: Path) -> dict[str, list[Path]]:
    return {kind: [fine_tune(work, base, domain, kind) for domain in DOMAINS] for kind in ("full", "ssvd_o")}


def run_merge(work: Path, base: Path, exps: list[Path], output: str, *extra: str) -> Path:
    """``espnet_plugins.bin.merge_models`` (in process: its main, as the command runs it)."""
    output_dir = work / "exp" / output
    argv = ["--base_dir", str(base), "--exp_dirs", *map(str, exps), "--output_dir", str(output_dir), *extra]
    merge_models.main(argv)
    return output_dir


def character_error_rate(
    work: Path, config: Path, model: Path, name: str, module: str = "espnet2.bin.asr_inference", *extra: str
) -> float:
    """CER of ``module`` (default: stock ESPnet inference) on the joint test set (every utterance must
    be decoded)."""
    hypotheses = decode(work, module, config, model, name, work / "data" / "test", *extra)
    references = read_text_file(work / "data" / "test" / "text")
    assert hypotheses.keys() == references.keys()
    assert all(set(text) <= set(CHARACTERS) for text in hypotheses.values())
    errors = sum(editdistance.eval(hypotheses[utt], references[utt]) for utt in references)
    return errors / sum(len(text) for text in references.values())


@pytest.fixture(scope="module")
def base_error(work: Path, base: Path) -> float:
    return character_error_rate(work, base / "config.yaml", base / "valid.acc.best.pth", "base")


@pytest.mark.parametrize(
    ("kind", "method", "knobs"),
    [("full", "task_arithmetic", ["scaling=0.5"]), ("ssvd_o", "ties", ["density=0.5"])],
)
def test_merged_domains_decode_with_stock_espnet_better_than_the_base(
    work, base, experiments, base_error, kind, method, knobs
):
    exps = experiments[kind]
    knob_args = [arg for knob in knobs for arg in ("--knob", knob)]
    merged = run_merge(work, base, exps, f"merged_{kind}", "--method", method, *knob_args)

    config = yaml.safe_load((merged / "config.yaml").read_text())
    assert not [key for key in config if key.startswith("peft")]
    record = yaml.safe_load((merged / "merge.yaml").read_text())
    assert record["method"] == method and record["kind"] == (
        "full fine-tunes" if kind == "full" else "adapters"
    )

    state = torch.load(merged / "model.pth", weights_only=True)
    files = [exp / "valid.acc.ave.pth" for exp in exps]
    parsed = {knob.split("=")[0]: float(knob.split("=")[1]) for knob in knobs}
    if kind == "full":
        expected = merge_state_dicts(base / "valid.acc.ave.pth", files, method, **parsed)
    else:
        expected = AdapterMerge(base / "valid.acc.ave.pth", files, method, **parsed).state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key

    merged_error = character_error_rate(work, merged / "config.yaml", merged / "model.pth", f"merged_{kind}")
    assert merged_error < base_error, (merged_error, base_error)


def test_a_grid_search_on_dev_data_picks_the_knob_and_writes_its_merge(work, base, experiments):
    dev = work / "data" / "dev"
    merged = run_merge(
        work,
        base,
        experiments["full"],
        "searched",
        "--method",
        "tsv_m",
        "--search",
        "scaling=0.25,1.0",
        "--dev_data",
        f"{dev}/wav.scp,speech,sound",
        "--dev_data",
        f"{dev}/text,text,text",
    )
    record = yaml.safe_load((merged / "merge.yaml").read_text())
    grid = record["search"]["grid"]
    assert [row["knobs"]["scaling"] for row in grid] == [0.25, 1.0]
    assert all(row["metric"] == "acc" and 0.0 <= row["score"] <= 1.0 for row in grid)
    best = max(grid, key=lambda row: row["score"])
    assert record["search"]["chosen"] == best and record["knobs"]["scaling"] == best["knobs"]["scaling"]
    files = [exp / "valid.acc.ave.pth" for exp in experiments["full"]]
    expected = merge_state_dicts(base / "valid.acc.ave.pth", files, "tsv_m", scaling=best["knobs"]["scaling"])
    state = torch.load(merged / "model.pth", weights_only=True)
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_adapters_merged_in_their_subspace_stay_an_adapter_that_the_plugin_decodes(
    work, base, experiments, base_error
):
    dev = work / "data" / "dev"
    dev_data = ["--dev_data", f"{dev}/wav.scp,speech,sound", "--dev_data", f"{dev}/text,text,text"]
    exps = experiments["ssvd_o"]
    merged = run_merge(
        work, base, exps, "kept_ssvd_core", "--method", "task_arithmetic", "--as_adapter", "ssvd_core",
        "--search", "scaling=0.5,1.0", *dev_data,
    )  # fmt: skip
    config = yaml.safe_load((merged / "config.yaml").read_text())
    record = yaml.safe_load((merged / "merge.yaml").read_text())
    assert config["peft"] == "ssvd_core" and config["peft_pretrained"] == str(
        (base / "valid.acc.ave.pth").resolve()
    )
    assert record["kept_as"]["form"] == "ssvd_core" and len(record["search"]["grid"]) == 2
    scaling = record["knobs"]["scaling"]

    # Folded into the base, the kept adapter is the dense merge of the same updates (TA commutes with
    # the shared U_k . V_k^T); the model file holds the adapter entries, the base's fingerprints and
    # the modules trained in full (merged as full tensors).
    model_file = torch.load(merged / "model.pth", weights_only=True)
    saved = tuple(f"{module}." for module in config["peft_modules_to_save"])
    kinds = [f".{ADAPTERS_ATTR}." in key or key.endswith("base_fingerprint") for key in model_file]
    assert all(kind or key.startswith(saved) for kind, key in zip(kinds, model_file, strict=True))
    assert any(key.startswith(saved) for key in model_file)
    files = [exp / "valid.acc.ave.pth" for exp in exps]
    dense = AdapterMerge(base / "valid.acc.ave.pth", files, "task_arithmetic", scaling=scaling).state_dict()
    folded = folded_state(base, merged)
    assert folded.keys() == dense.keys()
    for key in dense:
        torch.testing.assert_close(folded[key], dense[key], rtol=1e-5, atol=1e-6, msg=key)

    merged_error = character_error_rate(
        work, merged / "config.yaml", merged / "model.pth", "kept_ssvd_core",
        "espnet_plugins.bin.asr_inference", "--peft_merge", "true",
    )  # fmt: skip
    assert merged_error < base_error, (merged_error, base_error)

    as_lora = run_merge(
        work, base, exps, "kept_lora", "--method", "ties", "--as_adapter", "lora", "--rank", "2"
    )
    lora_record = yaml.safe_load((as_lora / "merge.yaml").read_text())
    assert lora_record["kept_as"]["form"] == "lora" and lora_record["kept_as"]["rank"] == 2
    assert 0.0 < lora_record["kept_as"]["reconstruction_error"] < 1.0


def folded_state(base: Path, merged: Path) -> dict[str, torch.Tensor]:
    """The state dict of the base model with the merged adapter experiment loaded and folded in."""
    import argparse

    from espnet_plugins.tasks.asr import PeftASRTask
    from ssvd_peft.checkpoint import load_adapter
    from ssvd_peft.inject import merge_and_unload

    config = yaml.safe_load((base / "config.yaml").read_text())
    model = PeftASRTask.build_model(argparse.Namespace(**config))
    model.load_state_dict(torch.load(base / "valid.acc.ave.pth", weights_only=True))
    load_adapter(model, merged / "model.pth")
    return merge_and_unload(model).state_dict()


def test_bad_merges_exit_with_one_message_and_write_nothing(work, base, experiments, capsys):
    full, adapters = list(map(str, experiments["full"])), list(map(str, experiments["ssvd_o"]))
    cases = [
        ([*full, adapters[0]], [], "mix adapters"),
        ([str(work / "data")], [], "is not an ESPnet experiment directory"),
        (full, ["--as_adapter", "lora"], "these experiments are full fine-tunes"),
        (adapters, ["--rank", "2"], "give as_adapter lora too"),
    ]
    for exps, extra, message in cases:
        output = work / "exp" / "refused"
        args = ["--base_dir", str(base), "--exp_dirs", *exps, "--method", "ties", "--output_dir", str(output)]
        with pytest.raises(SystemExit, match=message):
            merge_models.main([*args, *extra])
        assert not output.exists()
    with pytest.raises(SystemExit, match="adapter experiment; give the directory of the pretrained model"):
        merge_models.main(
            [
                "--base_dir",
                str(experiments["ssvd_o"][0]),
                "--exp_dirs",
                str(experiments["ssvd_o"][1]),
                "--method",
                "ties",
                "--output_dir",
                str(work / "exp" / "refused"),
            ]
        )
