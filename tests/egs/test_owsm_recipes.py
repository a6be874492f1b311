"""Stages 2-5 of egs/myst/asr1 and egs/l2arctic/asr1 (s2t_peft.sh) without OWSM's weights.

A tiny OWSM-shaped model stands in for OWSM v3.1: ESPnet's S2T task with an E-Branchformer
encoder and a Transformer decoder, global_mvn statistics, OWSM's special tokens, packed like a
downloaded model (meta.yaml, exp/<run>/config.yaml with paths relative to the model directory or
written on another machine). Stage 2 must make it usable from anywhere; every recipe's training
options must combine with every peft block into a config that ESPnet parses and whose adapters
cover every linear layer of the encoder and decoder; scoring must count words the recipe's way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from espnet2.tasks.s2t import S2TTask
from owsm import equal_budget, finetune_config

from espnet_plugins.modules import build_meta_model
from espnet_plugins.tasks.s2t import PeftS2TTask
from ssvd_peft.budget import estimate_budget
from ssvd_peft.inject import iter_adapter_layers
from ssvd_peft.registry import get_method

EGS = Path(__file__).resolve().parents[2] / "egs"
SCRIPTS = EGS / "common" / "pyscripts"
PEFT_CONF = EGS / "common" / "owsm" / "conf" / "peft"
SWEEPS_CONF = EGS / "common" / "owsm" / "conf" / "sweeps.yaml"
RECIPES = ("myst", "l2arctic")
MODELS = ("owsm_v3.1_ebf", "owsm_v3.1_ebf_small", "owsm_v3.1_ebf_base")
METHODS = ("lora", "dora", "pissa", "ssvd", "ssvd_o")
SPECIAL = ["<na>", "<nolang>", "<eng>", "<asr>", "<notimestamps>", "<0.00>", "<30.00>", "<sop>"]
TOKENS = ["<blank>", "<unk>", *SPECIAL, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'", "<space>", "<sos>", "<eos>"]
N_MELS = 20
MODEL = {
    "token_type": "char",
    "frontend_conf": {"fs": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": N_MELS},
    "normalize": "global_mvn",
    "encoder": "e_branchformer",
    "encoder_conf": {
        "output_size": 32, "attention_heads": 2, "attention_layer_type": "selfattn",
        "pos_enc_layer_type": "abs_pos", "rel_pos_type": "latest", "cgmlp_linear_units": 64,
        "cgmlp_conv_kernel": 3, "use_linear_after_conv": False, "gate_activation": "identity",
        "num_blocks": 2, "input_layer": "conv2d", "linear_units": 64, "positionwise_layer_type": "linear",
        "use_ffn": True, "macaron_ffn": True, "merge_conv_kernel": 3,
    },
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 2},
    "model_conf": {"ctc_weight": 0.3, "sym_na": "<na>"},
    "preprocessor_conf": {
        "text_prev_name": "text_prev", "text_ctc_name": "text_ctc", "fs": 16000, "na_symbol": "<na>",
        "speech_length": 30, "speech_resolution": 0.02, "speech_init_silence": 30,
        "text_prev_apply_prob": 0.5, "time_apply_prob": 0.5, "notime_symbol": "<notimestamps>",
        "first_time_symbol": "<0.00>", "last_time_symbol": "<30.00>",
    },
}  # fmt: skip
STATS = "exp/s2t_stats_raw_char/train/feats_stats.npz"
NLSYMS = "data/nlsyms.txt"
RUN = "exp/s2t_train_tiny"


def run(command: list[str], env_threads: bool = False) -> subprocess.CompletedProcess[str]:
    """``command``'s result, with the shared scripts importable as path.sh makes them; with
    env_threads, its torch runs on one thread each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    if env_threads:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env)


def owsm_model(owsm_dir: Path, out_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "owsm.model", "--owsm_dir", str(owsm_dir), "--out_dir", str(out_dir)]
    return run([*command, *options])


@pytest.fixture(scope="module")
def owsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A downloaded-model directory: meta.yaml, config.yaml (relative and foreign paths), weights."""
    root = tmp_path_factory.mktemp("owsm_tiny")
    (root / "data").mkdir()
    (root / NLSYMS).write_text("\n".join(SPECIAL) + "\n")
    (root / STATS).parent.mkdir(parents=True)
    np.savez(root / STATS, count=np.array(1000.0), sum=np.zeros(N_MELS), sum_square=1000.0 * np.ones(N_MELS))
    files = {
        "normalize_conf": {"stats_file": str(root / STATS)},
        "non_linguistic_symbols": str(root / NLSYMS),
    }
    (root / RUN).mkdir(parents=True)
    (root / "in.yaml").write_text(yaml.safe_dump({**MODEL, **files, "token_list": TOKENS, "output_dir": RUN}))
    args = S2TTask.get_parser().parse_args(["--config", str(root / "in.yaml")])
    S2TTask.check_required_command_args(args)
    torch.manual_seed(0)
    torch.save(
        S2TTask.build_model(args).state_dict(), root / RUN / "valid.total_count.ave_5best.till45epoch.pth"
    )
    config = vars(args)
    config["normalize_conf"]["stats_file"] = STATS
    config["non_linguistic_symbols"] = f"/home/someone/owsm_v3.1/{NLSYMS}"
    (root / RUN / "config.yaml").write_text(yaml.safe_dump(config))
    meta = {
        "yaml_files": {"s2t_train_config": f"{RUN}/config.yaml"},
        "files": {"s2t_model_file": f"{RUN}/valid.total_count.ave_5best.till45epoch.pth"},
    }
    (root / "meta.yaml").write_text(yaml.safe_dump(meta))
    return root


@pytest.fixture(scope="module")
def prepared_owsm(owsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "owsm"
    result = owsm_model(owsm_dir, out)
    assert result.returncode == 0, result.stderr
    return out


def test_stage_2_resolves_the_model_files_and_writes_the_token_list(
    owsm_dir: Path, prepared_owsm: Path
) -> None:
    config = yaml.safe_load((prepared_owsm / "config.yaml").read_text())
    assert config["normalize_conf"]["stats_file"] == str((owsm_dir / STATS).resolve())
    assert config["non_linguistic_symbols"] == str((owsm_dir / NLSYMS).resolve())
    assert config["token_list"] == TOKENS
    assert (prepared_owsm / "tokens.txt").read_text().split("\n")[:-1] == TOKENS
    assert (prepared_owsm / "model.pth").resolve() == (
        owsm_dir / RUN / "valid.total_count.ave_5best.till45epoch.pth"
    )


def test_stage_2_names_a_token_the_model_lacks(owsm_dir: Path, tmp_path: Path) -> None:
    result = owsm_model(owsm_dir, tmp_path / "out", "--lang_sym", "<deu>")
    assert result.returncode == 1
    assert "lacks ['<deu>']" in result.stderr and "<eng>" in result.stderr
    assert not (tmp_path / "out").exists()


def test_stage_2_without_meta_yaml_needs_exactly_one_model(owsm_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "owsm"
    for name in (f"{RUN}/config.yaml", f"{RUN}/valid.total_count.ave_5best.till45epoch.pth", STATS, NLSYMS):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((owsm_dir / name).read_bytes())
    assert owsm_model(copy, tmp_path / "one").returncode == 0
    (copy / "exp" / "other").mkdir()
    (copy / "exp" / "other" / "config.yaml").write_text("{}")
    (copy / "exp" / "other" / "model.pth").write_bytes(b"")
    result = owsm_model(copy, tmp_path / "two")
    assert result.returncode == 1
    assert "not exactly one config.yaml with one .pth file next to it" in result.stderr


def test_stage_2_names_a_missing_statistics_file(owsm_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "owsm"
    for name in ("meta.yaml", f"{RUN}/config.yaml", f"{RUN}/valid.total_count.ave_5best.till45epoch.pth"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((owsm_dir / name).read_bytes())
    result = owsm_model(copy, tmp_path / "out")
    assert result.returncode == 1
    assert f"normalize_conf.stats_file {STATS!r}" in result.stderr and "not found" in result.stderr


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_training_options_combine_with_every_peft_block(recipe: str, model: str) -> None:
    tuning_dir = EGS / recipe / "asr1" / "conf" / "tuning"
    tuning = finetune_config.load_mapping(tuning_dir / f"{model}.yaml")
    for method in METHODS:
        peft = finetune_config.load_mapping(PEFT_CONF / f"{method}.yaml")
        config = finetune_config.combined(tuning, peft, tuning_dir, PEFT_CONF)
        assert config["peft"] == method
        assert config["optim"] == "adamw" and config["optim_conf"]["lr"] == 1e-4
        assert config["scheduler"] == "warmuplr" and config["scheduler_conf"] == {"warmup_steps": 1500}
        assert config["batch_size"] * config["accum_grad"] == 32
        assert config["preprocessor_conf"]["time_apply_prob"] == 1.0
        assert config["preprocessor_conf"]["text_prev_apply_prob"] == 0.0


def test_peft_blocks_hold_the_stated_ranks_and_ratios() -> None:
    blocks = {m: yaml.safe_load((PEFT_CONF / f"{m}.yaml").read_text()) for m in METHODS}
    assert {m: (b["peft_conf"].get("rank"), b["peft_conf"].get("alpha")) for m, b in blocks.items()} == {
        "lora": (32, 64), "dora": (32, 64), "pissa": (32, 32), "ssvd": (None, None), "ssvd_o": (None, None),
    }  # fmt: skip
    assert blocks["ssvd"]["peft_conf"]["k_ratio"] == blocks["ssvd_o"]["peft_conf"]["k_ratio"] == 0.4
    targets = {tuple(b["peft_conf"]["target_modules"]) for b in blocks.values()}
    assert len(targets) == 1


def test_no_recipe_borrows_another_recipes_files() -> None:
    """What several recipes use lives in egs/common; a recipe holds no link into another one."""
    links = [path for path in EGS.rglob("*") if path.is_symlink()]
    assert links == []


def test_a_peft_file_with_training_options_is_refused(tmp_path: Path) -> None:
    tuning = EGS / "myst" / "asr1" / "conf" / "tuning" / "owsm_v3.1_ebf.yaml"

    def combine(peft: dict) -> subprocess.CompletedProcess[str]:
        (tmp_path / "peft.yaml").write_text(yaml.safe_dump(peft))
        command = [
            sys.executable,
            "-m",
            "owsm.finetune_config",
            "--tuning",
            str(tuning),
            "--peft",
            str(tmp_path / "peft.yaml"),
        ]
        return run([*command, "--out", str(tmp_path / "out.yaml")])

    result = combine({"peft": "lora", "peft_conf": {"target_modules": ["w_1"]}, "max_epoch": 3})
    assert result.returncode == 1
    assert "must hold the peft block only" in result.stderr and "['max_epoch']" in result.stderr
    result = combine({"peft": "lora", "peft_conf": {"target_modules": ["w_1"], "rank": 0}})
    assert result.returncode == 1
    assert "rank must be a positive integer" in result.stderr


def budget_rows(out_dir: Path) -> dict[str, dict[str, str]]:
    with (out_dir / "budget.csv").open() as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_every_method_gets_the_rank_or_k_closest_to_the_reference_blocks_budget(
    prepared_owsm: Path, tmp_path: Path
) -> None:
    model = build_meta_model(prepared_owsm / "config.yaml", "s2t")
    reference = finetune_config.load_mapping(PEFT_CONF / "ssvd_o.yaml")
    budget = estimate_budget(model, "ssvd_o", **reference["peft_conf"]).trainable
    out = tmp_path / "peft"
    equal_budget.write_blocks(prepared_owsm / "config.yaml", PEFT_CONF, list(METHODS), "ssvd_o", out)
    rows = budget_rows(out)
    assert rows["ssvd_o"] == {
        "method": "ssvd_o", "knob": "k_ratio", "value": "0.4", "trainable": str(budget),
        "budget": str(budget), "sweep": "main", "point": "-",
    }  # fmt: skip
    assert yaml.safe_load((out / "ssvd_o.yaml").read_text()) == reference
    for method in ("lora", "dora", "pissa", "ssvd"):
        block = yaml.safe_load((out / f"{method}.yaml").read_text())
        written = finetune_config.load_mapping(PEFT_CONF / f"{method}.yaml")["peft_conf"]
        knob = "rank" if method in ("lora", "dora", "pissa") else "k"
        value = block["peft_conf"][knob]
        assert {key: v for key, v in block["peft_conf"].items() if key != knob} == {
            key: v for key, v in written.items() if key not in (knob, "k_ratio")
        }

        def count(knob_value: int, method: str = method, block: dict = block, knob: str = knob) -> int:
            return estimate_budget(model, method, **{**block["peft_conf"], knob: knob_value}).trainable

        assert int(rows[method]["trainable"]) == count(value) and rows[method]["value"] == str(value)
        closest = abs(count(value) - budget)
        assert all(closest <= abs(count(other) - budget) for other in (value - 1, value + 1) if other > 0)


def test_an_unreachable_budget_is_refused_and_nothing_is_written(prepared_owsm: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "owsm.equal_budget", "--config", str(prepared_owsm / "config.yaml")]
    command += ["--peft_conf_dir", str(PEFT_CONF), "--methods", "lora ssvd", "--budget", "1000000000"]
    result = run([*command, "--out_dir", str(tmp_path / "peft")])
    assert result.returncode == 1
    assert "lora: " in result.stderr and "out of reach" in result.stderr
    assert not (tmp_path / "peft").exists()
    result = run([*command[:-1], "nosuchmethod", "--out_dir", str(tmp_path / "peft")])
    assert result.returncode == 1
    assert "no peft block" in result.stderr and "nosuchmethod.yaml" in result.stderr


@pytest.mark.parametrize("method", METHODS)
def test_each_peft_block_adapts_every_linear_layer_of_encoder_and_decoder(
    method: str, prepared_owsm: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    tuning_dir = EGS / "myst" / "asr1" / "conf" / "tuning"
    tuning = finetune_config.load_mapping(tuning_dir / "owsm_v3.1_ebf_base.yaml")
    peft = finetune_config.load_mapping(PEFT_CONF / f"{method}.yaml")
    (tmp_path / "finetune.yaml").write_text(
        yaml.safe_dump(finetune_config.combined(tuning, peft, tuning_dir, PEFT_CONF))
    )
    options = [
        "--config",
        str(tmp_path / "finetune.yaml"),
        "--peft_pretrained",
        str(prepared_owsm / "model.pth"),
    ]
    args = PeftS2TTask.get_parser().parse_args([*options, "--output_dir", str(tmp_path / "exp")])
    PeftS2TTask.check_required_command_args(args)
    model = PeftS2TTask.build_model(args)
    assert args.encoder == "e_branchformer" and args.preprocessor_conf["time_apply_prob"] == 1.0
    adapted = {name for name, _ in iter_adapter_layers(model)}
    base = S2TTask.build_model(
        argparse.Namespace(**yaml.safe_load((prepared_owsm / "config.yaml").read_text()))
    )
    linear = {
        n
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[0] in ("encoder", "decoder")
    }
    assert adapted == linear
    assert "encoder.embed.out.0" in adapted and "decoder.output_layer" in adapted
    assert (
        "encoder.encoders.1.feed_forward_macaron.w_2" in adapted
        and "encoder.encoders.0.cgmlp.channel_proj1.0" in adapted
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        ".peft_adapters." in n for n, p in model.named_parameters() if p.requires_grad
    )


def write_scoring_inputs(root: Path) -> tuple[Path, Path]:
    data = root / "data"
    (data / "test").mkdir(parents=True)
    (data / "test" / "text.ctc").write_text("a-1 THE CAT SAT\nb-1 ONE TWO\nb-2 IT'S FINE\n")
    (data / "test" / "utt2domain").write_text("a-1 arabic\nb-1 korean\nb-2 korean\n")
    (data / "source").mkdir()
    (data / "source" / "text").write_text("s-1 <eng><asr><notimestamps> HELLO WORLD\n")
    exp = root / "exp"
    hyps = {
        ("base", "test"): "a-1 The cat sat.\nb-1 1 2 3\nb-2 It's fine!\n",
        ("base", "source"): "s-1 hello world\n",
        ("lora", "test"): "a-1 the cat\nb-1 one two\n",
        ("lora", "source"): "s-1 hello word\n",
    }
    for (name, test_set), text in hyps.items():
        (exp / "decode" / name / test_set).mkdir(parents=True)
        (exp / "decode" / name / test_set / "text").write_text(text)
    (exp / "lora").mkdir()
    (exp / "lora" / "peft_budget.json").write_text(json.dumps({"trainable": 1234, "model_parameters": 5678}))
    (exp / "lora" / "config.yaml").write_text(yaml.safe_dump({"peft": "lora", "peft_conf": {"rank": 7}}))
    return data, exp


def test_scoring_counts_normalised_words_per_set_and_domain_with_forgetting(tmp_path: Path) -> None:
    data, exp = write_scoring_inputs(tmp_path)
    sets = f"test={data / 'test'} source={data / 'source'}"
    command = [sys.executable, "-m", "owsm.score", "--exp", str(exp), "--sets", sets, "--names", "base lora"]
    result = run([*command, "--cleaners", "none", "--sclite", "false"])
    assert result.returncode == 0, result.stderr
    assert "lacks 1 utterances" in result.stderr
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert rows["base"] == {
        "model": "base", "trainable": "0", "rank or k": "-", "test WER": "14.29", "test arabic": "0.0",
        "test korean": "25.0", "source WER": "0.0", "forgetting": "0.0",
    }  # fmt: skip
    assert rows["lora"] == {
        "model": "lora", "trainable": "1,234", "rank or k": "rank 7", "test WER": "42.86",
        "test arabic": "33.33", "test korean": "50.0", "source WER": "50.0", "forgetting": "50.0",
    }  # fmt: skip
    assert (
        (exp / "results.md")
        .read_text()
        .splitlines()[0]
        .startswith("| model | trainable | rank or k | test WER |")
    )


def test_scoring_breaks_a_set_down_by_speaker_and_grade_in_numeric_order(tmp_path: Path) -> None:
    """--breakdowns "domain spk grade": one WER per value of each utt2<label> the set holds."""
    data, exp = write_scoring_inputs(tmp_path)
    (data / "test" / "utt2spk").write_text("a-1 a\nb-1 b\nb-2 b\n")
    (data / "test" / "utt2grade").write_text("a-1 10\nb-1 3\nb-2 10\n")
    command = [sys.executable, "-m", "owsm.score", "--exp", str(exp), "--sets", f"test={data / 'test'}"]
    options = ["--cleaners", "none", "--sclite", "false"]
    result = run([*command, "--names", "base lora", *options, "--breakdowns", "domain spk grade"])
    assert result.returncode == 0, result.stderr
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    # grade 3: b-1 (2 words; base inserts THREE); grade 10: a-1 and b-2 (5 words; lora drops SAT, and
    # says nothing for b-2)
    breakdowns = ["test arabic", "test korean", "test spk a", "test spk b", "test grade 3", "test grade 10"]
    assert list(rows["lora"])[4:] == breakdowns
    for row in rows.values():
        assert (row["test spk a"], row["test spk b"]) == (row["test arabic"], row["test korean"])
    assert (rows["base"]["test grade 3"], rows["base"]["test grade 10"]) == ("50.0", "0.0")
    assert (rows["lora"]["test grade 3"], rows["lora"]["test grade 10"]) == ("0.0", "60.0")
    plain = run([*command, "--names", "base", *options, "--breakdowns", "none"])
    assert plain.returncode == 0
    assert (exp / "results.md").read_text().splitlines()[0] == "| model | trainable | rank or k | test WER |"


def test_scoring_with_espnets_whisper_en_cleaner_drops_fillers_beside_the_plain_wer(tmp_path: Path) -> None:
    """MyST-like references with fillers and British spelling: the plain normalisation counts the
    fillers a model does not say as deletions; ESPnet's whisper_en cleaner (the published numbers'
    scoring) drops them on both sides and standardises the spelling."""
    pytest.importorskip("whisper")
    data, exp = tmp_path / "data", tmp_path / "exp"
    (data / "test").mkdir(parents=True)
    (data / "test" / "text").write_text("c-1 um the colour is uh red\nc-2 hmm i like maths\n")
    for name, text in {
        "base": "c-1 the color is red\nc-2 i like math\n",
        "lora": "c-1 the colour is red\n",
    }.items():
        (exp / "decode" / name / "test").mkdir(parents=True)
        (exp / "decode" / name / "test" / "text").write_text(text)
    command = [sys.executable, "-m", "owsm.score", "--exp", str(exp), "--sets", f"test={data / 'test'}"]
    result = run([*command, "--names", "base lora"])
    assert result.returncode == 0, result.stderr
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    # plain: 10 reference words; base misses um, uh, hmm and says color, math (5 errors); lora says
    # nothing for c-2 (4 deletions) and misses um, uh (2)
    assert (rows["base"]["test WER"], rows["lora"]["test WER"]) == ("50.0", "60.0")
    # whisper_en: "the color is red" + "i like maths" (7 words); base: math for maths; lora: c-2 empty
    assert (rows["base"]["test WER whisper_en"], rows["lora"]["test WER whisper_en"]) == ("14.29", "42.86")
    unknown = run([*command, "--names", "base", "--cleaners", "whisper_fr"])
    assert unknown.returncode == 1 and "unknown cleaner 'whisper_fr'" in unknown.stderr


def test_scoring_with_sclite_as_espnet_writes_its_files_and_agrees_with_the_own_count(tmp_path: Path) -> None:
    """sclite (SCTK) on the normalised words, speakers from utt2spk: ESPnet's score_wer files, its WER
    beside the recipe's own (the same on these sentences)."""
    from owsm.sclite import find_sclite

    if find_sclite() is None:
        pytest.skip("no sclite: make setup installs Debian's sctk")
    data, exp = write_scoring_inputs(tmp_path)
    (data / "test" / "utt2spk").write_text("a-1 a\nb-1 b\nb-2 b\n")
    command = [sys.executable, "-m", "owsm.score", "--exp", str(exp), "--sets", f"test={data / 'test'}"]
    result = run([*command, "--names", "base lora", "--cleaners", "none", "--sclite", "true"])
    assert result.returncode == 0, result.stderr
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert [(row["test WER"], row["test WER sclite"]) for row in rows.values()] == [
        ("14.29", "14.29"),
        ("42.86", "42.86"),
    ]
    score_dir = exp / "decode" / "lora" / "test" / "score_wer"
    assert (score_dir / "ref.trn").read_text() == "THE CAT SAT (a-a-1)\nONE TWO (b-b-1)\nIT'S FINE (b-b-2)\n"
    assert (score_dir / "hyp.trn").read_text() == "THE CAT (a-a-1)\nONE TWO (b-b-1)\n (b-b-2)\n"
    result_txt = (score_dir / "result.txt").read_text()
    assert re.search(r"\|\s+b\s+\|\s+2\s+4\s+\|\s+50\.0\s+0\.0\s+50\.0\s+0\.0\s+50\.0", result_txt)


def test_scoring_names_the_missing_decoding(tmp_path: Path) -> None:
    data, exp = write_scoring_inputs(tmp_path)
    result = run(
        [
            sys.executable,
            "-m",
            "owsm.score",
            "--exp",
            str(exp),
            "--sets",
            f"test={data / 'test'}",
            "--names",
            "base dora",
        ]
    )
    assert result.returncode == 1
    assert f"no hypotheses {exp / 'decode' / 'dora' / 'test' / 'text'}" in result.stderr


def write_myst_corpus(root: Path) -> None:
    """Four students of a few one-second utterances in MyST's layout."""
    rng = np.random.default_rng(0)
    texts = ("the cat sat", "a big red ball", "yes it is", "no it isn't")
    students = (
        ("train", "001001", 4),
        ("train", "001002", 4),
        ("development", "002001", 2),
        ("test", "003001", 2),
    )
    for partition, student, count in students:
        folder = root / "data" / partition / student / f"myst_{student}_2014-01-01_10-00-00_ME_1.1"
        folder.mkdir(parents=True)
        for number in range(count):
            stem = f"{folder.name}_{number:03d}"
            soundfile.write(
                folder / f"{stem}.flac", 0.1 * rng.standard_normal(16000), 16000, subtype="PCM_16"
            )
            (folder / f"{stem}.trn").write_text(texts[number])


@pytest.mark.parametrize("recipe", RECIPES)
def test_stage_1_without_a_corpus_names_db_sh(recipe: str, tmp_path: Path) -> None:
    """The corpus root comes from the recipe's db.sh (empty as shipped) or --corpus_dir."""
    db = (EGS / recipe / "asr1" / "db.sh").read_text()
    assert {"myst": "\nMYST=\n", "l2arctic": "\nL2ARCTIC=\n"}[recipe] in db
    command = [str(EGS / recipe / "asr1" / "run.sh"), "--stop_stage", "1", "--data", str(tmp_path / "data")]
    result = run([*command, "--python", sys.executable])
    assert result.returncode == 1 and "set it in the recipe's db.sh or pass --corpus_dir" in result.stderr
    assert not (tmp_path / "data").exists()


def test_run_sh_goes_from_the_corpus_to_the_results_table_and_resumes(owsm_dir: Path, tmp_path: Path) -> None:
    """All five stages of egs/myst/asr1 on CPU with the tiny model (full fine-tuning, LoRA at SSVD-O's
    budget and SSVD-O; a few steps each), and one sweep run (SSVD-O on the decoder alone)."""
    write_myst_corpus(tmp_path / "corpus")
    sweeps_conf = tmp_path / "sweeps.yaml"
    decoder_only = {"decoder": {"exclude_modules": [r"encoder\..*"]}}
    sweeps_conf.write_text(yaml.safe_dump({"allocation": {"methods": ["ssvd_o"], "parts": decoder_only}}))
    command = [str(EGS / "myst" / "asr1" / "run.sh"), "--corpus_dir", str(tmp_path / "corpus")]
    command += ["--owsm_dir", str(owsm_dir), "--model", "owsm_v3.1_ebf_base", "--methods", "full lora ssvd_o"]
    command += ["--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--python", sys.executable]
    command += ["--sweeps", "allocation", "--sweeps_conf", str(sweeps_conf)]
    command += [
        "--ngpu",
        "0",
        "--gpu_inference",
        "false",
        "--inference_nj",
        "2",
        "--inference_args",
        "--maxlenratio 0.01",
    ]
    command += [
        "--s2t_args",
        "--use_amp false --num_workers 0 --max_epoch 1 --num_iters_per_epoch 2 --batch_size 2",
    ]
    result = run(command, env_threads=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "exp"
    assert yaml.safe_load((exp / "ssvd_o" / "config.yaml").read_text())["peft"] == "ssvd_o"
    assert (exp / "ssvd_o" / "valid.acc.ave.pth").stat().st_size < 0.25 * (
        exp / "owsm" / "model.pth"
    ).stat().st_size
    full_config = yaml.safe_load((exp / "full" / "config.yaml").read_text())
    assert "peft" not in full_config and full_config["init_param"] == [str(exp / "owsm" / "model.pth")]
    assert full_config["optim_conf"] == {"lr": 1e-5, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0}
    base_state = torch.load(exp / "owsm" / "model.pth", weights_only=True)
    full_state = torch.load(exp / "full" / "valid.acc.ave.pth", weights_only=True)
    assert full_state.keys() == base_state.keys()
    assert not torch.equal(full_state["encoder.encoders.0.feed_forward.w_1.weight"], base_state[
        "encoder.encoders.0.feed_forward.w_1.weight"
    ])  # fmt: skip
    test_utts = set(read_keys(tmp_path / "data" / "test" / "text"))
    for name in ("base", "full", "lora", "ssvd_o", "ssvd_o@decoder"):
        assert set(read_keys(exp / "decode" / name / "test" / "text")) == test_utts
    budget = budget_rows(exp / "peft")
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"base", "full", "lora", "ssvd_o", "ssvd_o@decoder"}
    assert rows["base"]["trainable"] == "0"
    assert all(float(row["test WER whisper_en"]) >= 0.0 for row in rows.values())  # ESPnet's cleaner too
    owsm_config = yaml.safe_load((exp / "owsm" / "config.yaml").read_text())
    owsm_model = S2TTask.build_model(argparse.Namespace(**owsm_config))
    assert rows["full"]["trainable"] == f"{sum(p.numel() for p in owsm_model.parameters()):,}"
    for method in ("lora", "ssvd_o", "ssvd_o@decoder"):
        assert rows[method]["trainable"].replace(",", "") == budget[method]["trainable"]
    assert (rows["ssvd_o@decoder"]["sweep"], rows["ssvd_o@decoder"]["point"]) == ("allocation", "decoder")
    assert rows["ssvd_o@decoder"]["rank or k"] == f"k {budget['ssvd_o@decoder']['value']}"
    assert (rows["ssvd_o"]["sweep"], rows["full"]["point"]) == ("-", "-")
    sweep_state = torch.load(exp / "ssvd_o@decoder" / "valid.acc.ave.pth", weights_only=True)
    adapter_keys = [key for key in sweep_state if ".peft_adapters." in key]
    assert adapter_keys and all(key.startswith("decoder.") for key in adapter_keys)
    assert rows["lora"]["rank or k"] == f"rank {budget['lora']['value']}"
    assert (
        rows["ssvd_o"]["rank or k"] == "k_ratio 0.4"
        and budget["lora"]["budget"] == budget["ssvd_o"]["trainable"]
    )

    # jobs ran through cmd.sh's local back-end: ESPnet's launcher -> train.log, JOB arrays -> logdir/
    assert (exp / "lora" / "train.log").read_text().splitlines()[-1].startswith("# Ended (code 0) at ")
    decode_logs = sorted(p.name for p in (exp / "decode" / "lora" / "test" / "logdir").glob("*.log"))
    assert decode_logs == ["s2t_inference.1.log", "s2t_inference.2.log"]

    again = run([*command, "--stage", "3"], env_threads=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(" done (") == 4 and again.stdout.count("decoded, skipped") == 5


def test_num_nodes_trains_through_espnets_launcher_on_slurm(owsm_dir: Path, tmp_path: Path) -> None:
    """--num_nodes 2 with cmd_backend=slurm: espnet2.bin.launch submits one srun job of two nodes
    through ESPnet's slurm.pl (here a checkout's stand-in that records its call)."""
    write_myst_corpus(tmp_path / "corpus")
    (tmp_path / "espnet" / "utils").mkdir(parents=True)
    slurm_pl = tmp_path / "espnet" / "utils" / "slurm.pl"
    slurm_pl.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "slurm_call"}\n')
    slurm_pl.chmod(0o755)
    command = [
        str(EGS / "myst" / "asr1" / "run.sh"),
        "--corpus_dir",
        str(tmp_path / "corpus"),
        "--stop_stage",
        "3",
    ]
    command += ["--owsm_dir", str(owsm_dir), "--model", "owsm_v3.1_ebf_base", "--methods", "lora"]
    command += ["--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--python", sys.executable]
    command += ["--ngpu", "4", "--num_nodes", "2"]
    env = {**os.environ, "cmd_backend": "slurm", "ESPNET_ROOT": str(tmp_path / "espnet")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    call = (tmp_path / "slurm_call").read_text().splitlines()
    dir_ = tmp_path / "exp" / "lora"
    slurm_conf = str(EGS / "common" / "conf" / "slurm.conf")
    assert call[:12] == ["--config", slurm_conf, "--name", "s2t_lora", "--gpu", "4", "--num_threads", "4",
                         "--num_nodes", "2", str(dir_ / "train.log"), "srun"]  # fmt: skip
    assert call[13:16] == [sys.executable, "-m", "espnet_plugins.bin.s2t_train"]
    tail = call[call.index("--dist_launcher") - 4 :]
    assert tail[:6] == ["--ngpu", "4", "--multiprocessing_distributed", "true", "--dist_launcher", "slurm"]
    assert tail[6] == "--dist_init_method" and tail[7].startswith(f"file://{dir_ / '.dist_init_'}")

    launcher = run(
        [*command[:-4], "--num_nodes", "2", "--ngpu", "1", "--train_launcher", "torchrun", "--stage", "3"]
    )
    assert launcher.returncode == 1
    assert (
        "--train_launcher and --num_nodes 2: the launcher places the processes; give one of them"
        in launcher.stderr
    )


def read_keys(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


def write_utt2domain(path: Path, domains: list[str]) -> Path:
    path.write_text("".join(f"utt{number} {domain}\n" for number, domain in enumerate(domains)))
    return path


def test_hdmole_gets_its_domains_from_utt2domain_and_a_rank_at_the_budget(
    prepared_owsm: Path, tmp_path: Path
) -> None:
    utt2domain = write_utt2domain(tmp_path / "utt2domain", ["korean", "arabic", "-", "korean", "hindi"])
    out = tmp_path / "peft"
    rows = equal_budget.write_blocks(
        prepared_owsm / "config.yaml", PEFT_CONF, ["hdmole", "lora"], "60000", out, utt2domain
    )
    block = yaml.safe_load((out / "hdmole.yaml").read_text())["peft_conf"]
    assert block["domains"] == ["arabic", "hindi", "korean"] and block["num_domains"] == 3
    model = build_meta_model(prepared_owsm / "config.yaml", "s2t")
    trainable = estimate_budget(model, "hdmole", **block).trainable
    assert rows[0] == {"method": "hdmole", "knob": "rank", "value": block["rank"], "trainable": trainable,
                       "budget": 60000, "sweep": "main", "point": "-"}  # fmt: skip
    step = estimate_budget(model, "hdmole", **{**block, "rank": block["rank"] + 1}).trainable - trainable
    assert abs(trainable - 60000) <= step
    assert "domains" not in yaml.safe_load((out / "lora.yaml").read_text())["peft_conf"]


def test_hdmole_needs_several_domains(prepared_owsm: Path, tmp_path: Path) -> None:
    """MyST is one domain (child): HDMoLE has nothing to route among there."""
    command = [sys.executable, "-m", "owsm.equal_budget", "--config", str(prepared_owsm / "config.yaml")]
    command += ["--peft_conf_dir", str(PEFT_CONF), "--methods", "lora hdmole", "--budget", "ssvd_o"]
    command += ["--out_dir", str(tmp_path / "peft")]
    utt2domain = write_utt2domain(tmp_path / "utt2domain", ["child", "child"])
    result = run([*command, "--utt2domain", str(utt2domain)])
    assert result.returncode == 1 and "names 1 (child): it needs two or more" in result.stderr
    result = run(command)
    assert result.returncode == 1 and "give --utt2domain" in result.stderr
    assert not (tmp_path / "peft").exists()


def write_l2arctic_corpus(root: Path) -> None:
    """Every L2-ARCTIC speaker reading two adaptation prompts, one dev and one test prompt (1 s, 16 kHz)."""
    speakers = l2arctic_speakers()
    prompts = {"arctic_a0001": "the cat sat", "arctic_a0002": "a big red ball",
               "arctic_b0001": "yes it is", "arctic_b0300": "no it isn't"}  # fmt: skip
    rng = np.random.default_rng(0)
    for speaker in speakers:
        (root / speaker / "wav").mkdir(parents=True)
        (root / speaker / "transcript").mkdir(parents=True)
        for utt, prompt in prompts.items():
            soundfile.write(root / speaker / "wav" / f"{utt}.wav", 0.1 * rng.standard_normal(16000), 16000)
            (root / speaker / "transcript" / f"{utt}.txt").write_text(prompt)


def l2arctic_speakers() -> list[str]:
    """The 24 speakers of the recipe's data preparation (its split names each of them)."""
    sys.path.insert(0, str(EGS / "l2arctic" / "asr1" / "local"))
    try:
        from data_prep import SPEAKERS
    finally:
        sys.path.pop(0)
    return list(SPEAKERS)


def test_l2arctic_run_trains_hdmole_over_the_first_languages_with_two_ddp_processes(
    owsm_dir: Path, tmp_path: Path
) -> None:
    """Stages 1-5 of egs/l2arctic/asr1 with HDMoLE, trained by torchrun's two processes (gloo, CPU)."""
    write_l2arctic_corpus(tmp_path / "corpus")
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 --no-python"
    command = [str(EGS / "l2arctic" / "asr1" / "run.sh"), "--corpus_dir", str(tmp_path / "corpus")]
    command += ["--owsm_dir", str(owsm_dir), "--model", "owsm_v3.1_ebf_base", "--methods", "hdmole"]
    command += ["--budget", "60000", "--train_launcher", launcher, "--ngpu", "0", "--gpu_inference", "false"]
    command += ["--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--python", sys.executable]
    command += ["--local_data_opts", f"--audio_dir {tmp_path / 'audio'} --nj 2"]
    command += ["--inference_nj", "2", "--inference_args", "--maxlenratio 0.01", "--s2t_args"]
    command += ["--use_amp false --num_workers 0 --max_epoch 1 --num_iters_per_epoch 2 --batch_size 4 "
                "--dist_backend gloo"]  # fmt: skip
    result = run(command, env_threads=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "exp"
    train_log = (exp / "hdmole" / "train.log").read_text()
    # ESPnet's log lines: [host:rank/world size]; rank 0 of two writes the epoch's results
    assert re.search(r"^\[[^\]]+:0/2\] .* 1epoch results: .*hdmole_domain_accuracy=", train_log, re.MULTILINE)
    config = yaml.safe_load((exp / "hdmole" / "config.yaml").read_text())
    languages = sorted({"arabic", "mandarin", "hindi", "korean", "spanish", "vietnamese"})
    assert config["peft_conf"]["domains"] == languages and config["peft_conf"]["num_domains"] == 6
    assert [str(tmp_path / "data" / "adapt" / "utt2domain"), "domain", "text"] in config[
        "train_data_path_and_name_and_type"
    ]
    assert set(read_keys(exp / "decode" / "hdmole" / "test" / "text")) == set(
        read_keys(tmp_path / "data" / "test" / "text")
    )
    with (exp / "results.csv").open() as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    router = (N_MELS + 1) * 6  # W_g and b_g of the domain router on the encoder's input features
    planned = int(budget_rows(exp / "peft")["hdmole"]["trainable"])
    assert int(rows["hdmole"]["trainable"].replace(",", "")) == planned + router


ATTENTION = ("linear_q", "linear_k", "linear_v", "linear_out")
PARTS = {
    "encoder": lambda name: name.startswith("encoder."),
    "decoder": lambda name: name.startswith("decoder."),
    "attention": lambda name: name.rsplit(".", 1)[-1] in ATTENTION,
    "feed_forward": lambda name: name.rsplit(".", 1)[-1] in ("w_1", "w_2"),
}


def knob_step(model: torch.nn.Module, method: str, conf: dict, knob: str, value: int) -> int:
    """The largest change of the trainable count one step of ``knob`` away from ``value``."""
    count = estimate_budget(model, method, **{**conf, knob: value}).trainable
    steps = []
    for other in (value - 1, value + 1):
        try:
            steps.append(abs(estimate_budget(model, method, **{**conf, knob: other}).trainable - count))
        except Exception:  # a value the layers do not allow (0, or k above min(in, out))
            continue
    return max(steps)


def test_sweeps_add_runs_at_their_budgets_outer_shares_and_parts(prepared_owsm: Path, tmp_path: Path) -> None:
    """The three sweeps of conf/sweeps.yaml on the tiny model, every method at SSVD-O's budget."""
    points = equal_budget.sweep_points(SWEEPS_CONF, ["budget", "split", "allocation"])
    out = tmp_path / "peft"
    equal_budget.write_blocks(
        prepared_owsm / "config.yaml", PEFT_CONF, ["lora", "ssvd_o"], "ssvd_o", out, None, points
    )
    rows = budget_rows(out)
    assert list(rows) == [
        "lora", "ssvd_o", "lora@x0.25", "ssvd_o@x0.25", "lora@x4", "ssvd_o@x4", "ssvd_o@outer0.0",
        "ssvd_o@outer0.125", "ssvd_o@outer0.5", "lora@encoder", "ssvd_o@encoder", "lora@decoder",
        "ssvd_o@decoder", "lora@attention", "ssvd_o@attention", "lora@feed_forward", "ssvd_o@feed_forward",
    ]  # fmt: skip
    model = build_meta_model(prepared_owsm / "config.yaml", "s2t")
    budget = int(rows["ssvd_o"]["trainable"])
    main = {m: yaml.safe_load((out / f"{m}.yaml").read_text())["peft_conf"] for m in ("lora", "ssvd_o")}
    everywhere = {module.name for module in estimate_budget(model, "lora", **main["lora"]).modules}
    for name, row in list(rows.items())[2:]:
        block = yaml.safe_load((out / f"{name}.yaml").read_text())
        method, conf = block["peft"], block["peft_conf"]
        assert name.startswith(f"{method}@")
        report = estimate_budget(model, method, **conf)
        assert int(row["trainable"]) == report.trainable
        if row["sweep"] == "split":
            # the main block's k_ratio (its k on every layer), only the split of the rotations changed
            assert conf == {**main["ssvd_o"], "outer_share": float(row["point"])}
            assert (row["knob"], row["value"], row["budget"]) == ("k_ratio", "0.4", str(budget))
            outer = sum(module.split.outer for module in report.modules)
            assert (outer == 0) == (row["point"] == "0.0")
            continue
        factor = float(row["point"][1:]) if row["sweep"] == "budget" else 1.0
        target = round(factor * budget)
        assert int(row["budget"]) == target and row["knob"] == get_method(method).knob
        value = int(row["value"])
        assert conf[row["knob"]] == value
        assert abs(report.trainable - target) <= knob_step(model, method, conf, row["knob"], value)
        adapted = {module.name for module in report.modules}
        if row["sweep"] == "allocation":
            assert adapted == {module for module in everywhere if PARTS[row["point"]](module)}
            assert {part for part in ("encoder", "decoder") if any(PARTS[part](m) for m in adapted)} == (
                {row["point"]} if row["point"] in ("encoder", "decoder") else {"encoder", "decoder"}
            )
        else:
            assert adapted == everywhere
    assert int(rows["lora@x4"]["value"]) > int(rows["lora"]["value"])
    assert int(rows["ssvd_o@x0.25"]["value"]) < int(rows["ssvd_o@x4"]["value"])


def test_an_unknown_sweep_an_unreachable_factor_and_a_sweep_method_not_run_are_refused(
    prepared_owsm: Path, tmp_path: Path
) -> None:
    def equal_budget_cli(methods: str, budget: str, *sweeps: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "owsm.equal_budget", "--config", str(prepared_owsm / "config.yaml")]
        command += ["--peft_conf_dir", str(PEFT_CONF), "--methods", methods, "--budget", budget]
        return run([*command, "--out_dir", str(tmp_path / "peft"), *sweeps])

    result = equal_budget_cli("lora ssvd_o", "ssvd_o", "--sweeps", "budget nosuchsweep")
    assert result.returncode == 1
    assert f"no sweep 'nosuchsweep' in {SWEEPS_CONF} (it has budget, split, allocation)" in result.stderr
    far = tmp_path / "far.yaml"
    far.write_text(yaml.safe_dump({"budget": {"methods": ["lora", "ssvd_o"], "factors": [4, 1000]}}))
    result = equal_budget_cli("lora ssvd_o", "ssvd_o", "--sweeps", "budget", "--sweeps_conf", str(far))
    assert result.returncode == 1
    assert "lora@x1000: lora: the budget of" in result.stderr and "is out of reach" in result.stderr
    result = equal_budget_cli("ssvd_o", "ssvd_o", "--sweeps", "split allocation")
    assert result.returncode == 1
    assert "sweep allocation: lora is not among --methods (ssvd_o)" in result.stderr
    result = equal_budget_cli("lora ssvd_o", "none", "--sweeps", "split")
    assert result.returncode == 1 and "give --budget a method or a number" in result.stderr
    assert not (tmp_path / "peft").exists()
    result = equal_budget_cli("ssvd_o", "ssvd_o", "--sweeps", "split")
    assert result.returncode == 0, result.stderr
    assert "ssvd_o@outer0.125 k_ratio = 0.4" in result.stdout
