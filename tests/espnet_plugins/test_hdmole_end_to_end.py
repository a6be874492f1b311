"""HDMoLE through the ESPnet entry points, on two domains with per-utterance domain labels.

The tiny Transformer ASR model of the tone corpus (``tone_base`` of conftest.py, pretrained with
stock ``espnet2.bin.asr_train`` at the corpus's own pitch) is adapted by
``espnet_plugins.bin.asr_train`` with ``peft: hdmole`` to a mix of that pitch (domain ``source``,
id 0) and a shifted one (``shifted``, id 1), reading ``utt2domain`` (domain names, ``-`` for a few
unlabelled training utterances) as text under ``peft_conf.domains``. The domain router pools the
layer-normalised input of the first encoder block's self-attention over the valid frames (its
padding mask), so every adapted layer is routed with the current batch's domain. A short run with
two processes (DDP, gloo) reads the integer ids of ``utt2domain_id`` as text_int.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import torch
import yaml
from espnet_runs import REPO, data_args, decode, export_merged, read_text_file, run_module
from tiny_corpus import CHARACTERS, write_data_dir, write_token_list

pytest.importorskip("espnet2")

ADAPT_EPOCHS = 30
SHIFTS = (1.0, 1.5)
DOMAINS = ("source", "shifted")
UNLABELLED_EVERY = 6
CORPUS_FILES = ("wav.scp", "text", "utt2spk", "speech_shape", "text_shape")
HDMOLE_BLOCK = {
    "peft": "hdmole",
    "peft_conf": {
        "target_modules": ["linear_q", "linear_v", "w_1", "w_2"],
        "num_domains": 2,
        "experts_per_domain": 2,
        "rank": 4,
        "domain_weight": 5.0,
        "balance_weight": 0.01,
        "router_source": "encoder.encoders.0.self_attn",
        "router_side": "input",
        "router_dim": 64,
        "domains": list(DOMAINS),
    },
    "peft_modules_to_save": [],
    "peft_save": "adapter",
}


def write_domain_data(path: Path, per_domain: int, seed: int, unlabelled_every: int = 0) -> Path:
    """One data dir with ``per_domain`` utterances of every domain in SHIFTS; utt2domain holds the
    domain names (``-`` for every ``unlabelled_every``-th utterance), utt2domain_id the ids."""
    names = (*CORPUS_FILES, "utt2domain", "utt2domain_id")
    merged: dict[str, list[str]] = {name: [] for name in names}
    for domain, shift in enumerate(SHIFTS):
        source = write_data_dir(path / f"domain{domain}", per_domain, shift=shift, seed=seed + domain)
        for name in CORPUS_FILES:
            for line in (source / name).read_text().splitlines():
                utt, rest = line.split(maxsplit=1)
                merged[name].append(f"{utt}-d{domain} {rest}")
        for index, line in enumerate(source.joinpath("text").open()):
            utt = f"{line.split()[0]}-d{domain}"
            unlabelled = unlabelled_every and index % unlabelled_every == 0
            merged["utt2domain"].append(f"{utt} {'-' if unlabelled else DOMAINS[domain]}")
            merged["utt2domain_id"].append(f"{utt} {-1 if unlabelled else domain}")
    for name, lines in merged.items():
        (path / name).write_text("\n".join(sorted(lines)) + "\n")
    return path


def domain_args(prefix: str, data_dir: Path) -> list[str]:
    """utt2domain (names) read as text."""
    return [f"--{prefix}_data_path_and_name_and_type", f"{data_dir}/utt2domain,domain,text"]


def domain_id_args(prefix: str, data_dir: Path) -> list[str]:
    """utt2domain_id (integer ids) read as text_int."""
    return [f"--{prefix}_data_path_and_name_and_type", f"{data_dir}/utt2domain_id,domain,text_int"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hdmole")
    write_domain_data(root / "data" / "adapt", 24, seed=10, unlabelled_every=UNLABELLED_EVERY)
    write_domain_data(root / "data" / "heldout", 8, seed=20)
    write_token_list(root / "data" / "tokens.txt")
    return root


@pytest.fixture(scope="module")
def pretrained(tone_base: Path) -> Path:
    """The tone corpus's base model (conftest.py), pretrained on the source domain (shift 1.0)."""
    return tone_base


@pytest.fixture(scope="module")
def hdmole(work: Path, pretrained: Path) -> tuple[Path, str]:
    """The HDMoLE experiment dir and its training log."""
    config = yaml.safe_load((REPO / "conf" / "tiny" / "finetune_ssvd_o.yaml").read_text())
    config.update(HDMOLE_BLOCK)
    (work / "hdmole.yaml").write_text(yaml.safe_dump(config))
    exp = work / "exp" / "hdmole"
    args = ["--config", str(work / "hdmole.yaml"), "--peft_pretrained", str(pretrained)]
    args += ["--output_dir", str(exp), "--max_epoch", str(ADAPT_EPOCHS), "--batch_size", "4"]
    for prefix, data in (("train", work / "data" / "adapt"), ("valid", work / "data" / "heldout")):
        args += data_args(prefix, data) + domain_args(prefix, data)
    return exp, run_module("espnet_plugins.bin.asr_train", args, work, work / "hdmole.log")


def test_the_adaptation_data_has_names_and_unlabelled_utterances(work: Path) -> None:
    labels = read_text_file(work / "data" / "adapt" / "utt2domain")
    assert set(labels.values()) == {*DOMAINS, "-"}
    ids = read_text_file(work / "data" / "adapt" / "utt2domain_id")
    assert all(ids[utt] == str(DOMAINS.index(name) if name != "-" else -1) for utt, name in labels.items())


def epoch_results(log: str, part: str) -> list[dict[str, float]]:
    """The ``[part]`` statistics of every 'Nepoch results' log line."""
    lines = re.findall(rf"\d+epoch results: .*?\[{part}\](.*?)(?:\[|, time=|$)", log, flags=re.M)
    return [{key: float(value) for key, value in re.findall(r"(\w+)=([0-9.e+-]+)", line)} for line in lines]


def test_training_log_holds_the_auxiliary_losses_and_the_loss_decreases(hdmole: tuple[Path, str]) -> None:
    _, log = hdmole
    train = epoch_results(log, "train")
    assert len(train) == ADAPT_EPOCHS
    assert all("hdmole_domain" in epoch and "hdmole_balance" in epoch for epoch in train)
    assert train[-1]["loss"] < 0.9 * train[0]["loss"], train
    assert train[-1]["hdmole_domain"] < train[0]["hdmole_domain"], train


def test_validation_reports_routing_statistics_and_the_router_beats_chance(
    hdmole: tuple[Path, str],
) -> None:
    exp, log = hdmole
    valid = epoch_results(log, "valid")
    assert len(valid) == ADAPT_EPOCHS
    last = valid[-1]
    assert 1.0 <= last["hdmole_active_experts"] <= 4.0
    assert 0.0 <= last["hdmole_routing_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4
    assert last["hdmole_domain_accuracy"] > 0.75, valid
    per_layer = read_text_file(exp / "hdmole_stats" / f"valid.{ADAPT_EPOCHS}.txt")
    assert "encoder.encoders.0.self_attn.linear_q.active_experts" in per_layer
    assert float(per_layer["domain_accuracy"]) == pytest.approx(last["hdmole_domain_accuracy"], abs=1e-3)


def test_adapter_only_files_hold_the_router_and_the_budget_counts_it(hdmole: tuple[Path, str]) -> None:
    exp, _ = hdmole
    state = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    assert state["peft_adapters.default.proj.weight"].shape == (2, 64)
    assert state["peft_adapters.default.proj.weight"].abs().sum() > 0
    assert all(
        ".peft_adapters." in key or key.startswith("peft_adapters.") or "fingerprint" in key for key in state
    )
    budget = json.loads((exp / "peft_budget.json").read_text())
    assert budget["model_part"] == 2 * (64 + 1), "the domain router: M (d + 1)"
    assert budget["trainable"] == budget["adapter"]["trainable"] + budget["model_part"]


def test_plugin_inference_decodes_every_utterance(work: Path, hdmole: tuple[Path, str]) -> None:
    exp, _ = hdmole
    data = work / "data" / "heldout"
    hypotheses = decode(
        work,
        "espnet_plugins.bin.asr_inference",
        exp / "config.yaml",
        exp / "valid.acc.best.pth",
        "routed",
        data,
    )
    assert hypotheses.keys() == read_text_file(data / "text").keys()
    assert all(text and set(text) <= set(CHARACTERS) for text in hypotheses.values())


def test_fixed_domain_export_decodes_with_stock_espnet(
    work: Path, hdmole: tuple[Path, str], pretrained: Path
) -> None:
    export_dir = export_merged(work, hdmole[0], "export1", "--peft_domain", "shifted")
    exported = torch.load(export_dir / "model.pth", map_location="cpu")
    base = torch.load(pretrained, map_location="cpu")
    assert exported.keys() == base.keys()
    key = "encoder.encoders.0.feed_forward.w_1.weight"
    assert not torch.equal(exported[key], base[key])
    data = work / "data" / "heldout" / "domain1"
    hypotheses = decode(
        work,
        "espnet2.bin.asr_inference",
        export_dir / "config.yaml",
        export_dir / "model.pth",
        "stock",
        data,
    )
    assert hypotheses.keys() == read_text_file(data / "text").keys()
    assert all(set(text) <= set(CHARACTERS) for text in hypotheses.values())


def test_distributed_training_with_two_processes_reads_integer_ids(work: Path, pretrained: Path) -> None:
    """Two gloo processes, two_stage routing, utt2domain_id as text_int: the stats ESPnet averages
    over the ranks include the HDMoLE ones, and DDP runs without --unused_parameters."""
    config = yaml.safe_load((REPO / "conf" / "tiny" / "finetune_ssvd_o.yaml").read_text())
    config.update(HDMOLE_BLOCK)
    ids_only = {key: value for key, value in HDMOLE_BLOCK["peft_conf"].items() if key != "domains"}
    config["peft_conf"] = {**ids_only, "combination": "two_stage"}
    (work / "hdmole_ddp.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exp = work / "exp" / "hdmole_ddp"
    args = ["--nproc_per_node", "2", "--master_port", str(port), "-m", "espnet_plugins.bin.asr_train"]
    args += ["--config", str(work / "hdmole_ddp.yaml"), "--peft_pretrained", str(pretrained)]
    args += ["--output_dir", str(exp), "--ngpu", "0", "--dist_backend", "gloo", "--max_epoch", "2"]
    args += ["--batch_size", "4"]
    for prefix, data in (("train", work / "data" / "adapt"), ("valid", work / "data" / "heldout")):
        args += data_args(prefix, data) + domain_id_args(prefix, data)
    log = run_module("torch.distributed.run", args, work, work / "hdmole_ddp.log")
    assert re.search(r":0/2\] .* 2epoch results", log)
    train, valid = epoch_results(log, "train"), epoch_results(log, "valid")
    assert len(train) == len(valid) == 2
    assert all("hdmole_domain" in epoch and "hdmole_balance" in epoch for epoch in train)
    assert train[1]["loss"] < train[0]["loss"] and train[1]["hdmole_domain"] < train[0]["hdmole_domain"]
    assert 0.0 <= valid[-1]["hdmole_domain_accuracy"] <= 1.0
    state = torch.load(exp / "2epoch.pth", map_location="cpu")
    assert state["peft_adapters.default.proj.weight"].shape == (2, 64)
