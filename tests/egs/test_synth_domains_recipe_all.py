"""The whole `ci` profile of egs/synth_domains/asr1 (slow: about 10 minutes on 2 cores).

``run.sh --profile ci`` runs every stage once per module in a temporary directory: data, tokens,
shapes, pretraining, rates tuned on dev and frozen, fine-tuning with the profile's default methods on
every target domain at two seeds (a feature-fusion row among them, HDMoLE and the joint runs once on
all of them), one run of each sweep, decoding, scoring, the merge knobs tuned on dev and frozen, every
kind of merge at both seeds, decoding and scoring the merges, the layer analysis.
test_synth_domains_recipe.py runs stages 1-10 of the profile's core in the default suite. The models
are tiny and barely trained, so the tests check that the pipeline produced complete, well-formed
results and sweep tables, not their numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from synth_recipe import (
    PNG,
    RECIPE,
    assert_reproduced,
    check_forgetting,
    check_numbers,
    check_tools,
    refused_stage,
    run_recipe,
)

pytest.importorskip("espnet2")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    check_tools()
    root = tmp_path_factory.mktemp("synth_domains_recipe_all")
    run_recipe(root)
    return root


@pytest.fixture(scope="module")
def exp(recipe_root: Path) -> Path:
    return recipe_root / "exp"


@pytest.fixture(scope="module")
def domains(recipe_root: Path) -> list[str]:
    return (recipe_root / "data" / "target_domains.txt").read_text().split()


@pytest.fixture(scope="module")
def methods() -> list[str]:
    return yaml.safe_load((RECIPE / "conf" / "asr" / "ci" / "adapters.yaml").read_text())["default_methods"]


@pytest.fixture(scope="module")
def rows(exp: Path) -> list[dict[str, str]]:
    with (exp / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_results_have_one_row_per_domain_and_method_plus_the_base(
    rows: list[dict[str, str]], domains: list[str], methods: list[str]
) -> None:
    assert domains == ["accent", "child", "noisy"]
    assert methods == ["full", "ssvd_o", "hdmole", "fusion_grouped_lora"]
    shown = [
        "base",
        "full",
        "ssvd_o",
        "hdmole",
        "hdmole@oracle",
        "fusion_grouped_lora",
    ]  # the true domain given
    expected = [(domain, method) for domain in domains for method in shown]
    assert [(row["domain"], row["method"]) for row in rows] == expected


def test_every_number_parses_is_in_range_and_forgetting_is_the_source_change(
    rows: list[dict[str, str]],
) -> None:
    check_numbers(rows)
    check_forgetting(rows)


def test_peft_methods_train_fewer_parameters_than_full_fine_tuning(
    rows: list[dict[str, str]], exp: Path
) -> None:
    planned = json.loads((exp / "finetune_conf" / "trainable.json").read_text())
    fusion = {"fusion_grouped_lora", "layer_analysis"}  # the head, the decoder and CTC (and LoRA) trained
    main = {"full", "ssvd_o", "hdmole", "fusion_grouped_lora"}
    seeded = {f"{method}@seed1" for method in main}
    sweeps = {"ssvd_o@b1", "ssvd_o@outer0.75", "ssvd_o@decoder"}
    assert set(planned) == {*main, *seeded, *sweeps, "layer_analysis"}
    assert all(planned[name] == planned[name.split("@")[0]] for name in seeded)
    peft = [count for name, count in planned.items() if name.split("@")[0] not in {"full", *fusion}]
    assert max(peft) < 0.1 * planned["full"] and max(planned[name] for name in fusion) < planned["full"]
    assert planned["ssvd_o@b1"] < planned["ssvd_o"] < planned["hdmole"]
    for row in rows:
        if row["method"].startswith(
            "hdmole"
        ):  # the logged count adds the model-level domain router to the plan's
            assert planned["hdmole"] < int(row["trainable params"]) < 1.05 * planned["hdmole"], row
        elif row["method"] != "base":  # the logged counts (peft_budget.json, fusion_budget.json) as planned
            assert int(row["trainable params"]) == planned[row["method"]], row


def test_the_fusion_row_fuses_the_frozen_encoder_with_lora_in_its_blocks(exp: Path) -> None:
    config = yaml.safe_load((exp / "child" / "fusion_grouped_lora" / "config.yaml").read_text())
    assert config["fusion"]["variant"] == "grouped" and config["peft"] == "lora"
    assert all(target.startswith("encoder") for target in config["peft_conf"]["target_modules"])
    state = torch.load(exp / "child" / "fusion_grouped_lora" / "valid.acc.best.pth", map_location="cpu")
    adapted = {key.split(".peft_adapters.")[0] for key in state if ".peft_adapters." in key}
    assert adapted and all(key.startswith("encoder.taps.") for key in adapted)
    assert any(key.startswith("encoder.head.") for key in state)
    merges = (exp / "merged" / "merges.tsv").read_text()
    assert "fusion" not in merges  # a head over the encoder: not merged


def test_the_layer_analysis_scores_a_head_on_each_tap_on_every_dev_set(exp: Path, domains: list[str]) -> None:
    with (exp / "layers" / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(row["layer"]), row["test"]) for row in rows] == [
        (layer, domain) for layer in range(3) for domain in domains
    ]
    assert all(float(row["WER"]) >= 0.0 and int(row["words"]) > 0 for row in rows)
    for layer in range(3):
        config = yaml.safe_load((exp / "layers" / f"layer{layer}" / "config.yaml").read_text())
        assert config["fusion"]["taps"] == [layer] and config["fusion"]["variant"] == "weighted_sum"
    assert (exp / "layers" / "layers.png").read_bytes()[:8] == PNG


def test_hdmole_routing_of_every_test_and_its_oracle_rows(exp: Path, domains: list[str]) -> None:
    with (exp / "hdmole_routing.csv").open() as f:
        routing = list(csv.DictReader(f))
    assert [row["split"] for row in routing] == [*domains, "phone", "source"]
    for row in routing:
        shares = [float(row[f"to {domain} %"]) for domain in domains]
        assert sum(shares) == pytest.approx(100.0, abs=0.2) and row["seeds"] == "2", row
        assert (row["routing accuracy %"] == "") == (row["split"] not in domains), row
    for domain in domains:
        oracle = exp / "all" / "hdmole" / "oracle" / domain
        assert (oracle / "model.pth").is_file()
        assert not any(
            ".peft_adapters." in key for key in torch.load(oracle / "model.pth", map_location="cpu")
        )
        decoded = (exp / "decode" / f"all/hdmole@oracle_{domain}" / "splits").read_text().split()
        assert decoded == [f"{domain}_test", "source_test"]


def test_hdmole_is_trained_once_on_every_domain_with_their_labels(exp: Path, recipe_root: Path) -> None:
    hdmole = exp / "all" / "hdmole"
    assert (hdmole / "train_stats.json").is_file()
    combined = (recipe_root / "data" / "combined" / "adapt" / "utt2domain").read_text().split()[1::2]
    assert sorted(set(combined)) == ["accent", "child", "noisy"]
    assert "hdmole_domain" in (hdmole / "finetune.log").read_text()


def test_sweep_table_has_each_sweep_with_its_main_point(exp: Path) -> None:
    with (exp / "sweeps.csv").open() as f:
        swept = [(row["sweep"], row["value"], row["domain"], row["method"]) for row in csv.DictReader(f)]
    assert swept == [
        ("budget", "2", "child", "ssvd_o"),
        ("budget", "1", "child", "ssvd_o"),
        ("split", "0.25", "child", "ssvd_o"),
        ("split", "0.75", "child", "ssvd_o"),
        ("allocation", "all", "child", "ssvd_o"),
        ("allocation", "decoder", "child", "ssvd_o"),
        ("fewshot", "4", "child", "ssvd_o"),
        ("fewshot", "2", "child", "ssvd_o"),
    ]
    assert (exp / "sweeps.png").read_bytes()[:8] == PNG


def test_rerun_skips_finished_fine_tuning_and_decoding(recipe_root: Path, exp: Path) -> None:
    stats = exp / "accent" / "ssvd_o" / "train_stats.json"
    before = stats.stat().st_mtime_ns
    layer_hypotheses = exp / "layers" / "layer0" / "decode_accent" / "1best_recog" / "text"
    layer_decoded = layer_hypotheses.stat().st_mtime_ns
    result = run_recipe(recipe_root, "--stage", "7")
    assert "Stage 7: base model" in result.stdout and "reused" in result.stdout
    assert "Stage 9: base decoded, skipped" in result.stdout
    assert "Stage 8: accent/ssvd_o done, skipped" in result.stdout
    assert "Stage 8: child/ssvd_o@n2 done, skipped" in result.stdout
    assert "Stage 8: child/ssvd_o@lr0.001 done, skipped" in result.stdout
    assert len(list((exp / "frozen").glob("*.yaml"))) == 2  # the same choices: no new dated file
    assert "Stage 9: accent/ssvd_o decoded, skipped" in result.stdout
    assert "Stage 9: all/hdmole decoded, skipped" in result.stdout
    assert "Stage 8: fine-tune" not in result.stdout and "Stage 9: decode " not in result.stdout
    assert "Stage 11: merged/tune/full/ties merged, skipped" in result.stdout
    assert "Stage 11: merged/full/ties@seed1 merged, skipped" in result.stdout
    assert len(list((exp / "frozen" / "merging").glob("*.yaml"))) == 2  # the same merge knobs again
    assert "Stage 12: merged/ssvd_o/task_arithmetic@core decoded, skipped" in result.stdout
    assert "Stage 11: merge merged/" not in result.stdout and "Stage 12: decode " not in result.stdout
    assert stats.stat().st_mtime_ns == before
    assert layer_hypotheses.stat().st_mtime_ns == layer_decoded  # stage 14 trains and decodes nothing again


def test_a_seed_reproduces_a_randomly_initialised_run_bit_for_bit(exp: Path, tmp_path: Path) -> None:
    """child/fusion_grouped_lora (randomly initialised LoRA A and fusion head, then trained)."""
    run = exp / "child" / "fusion_grouped_lora"
    assert_reproduced(run, exp / "child" / "fusion_grouped_lora@seed1", tmp_path)


MERGING_SYSTEMS = [
    "base",
    "per-domain full",
    "joint full",
    "merged full ties",
    "merged full tsv_m",
    "per-domain ssvd_o",
    "joint ssvd_o",
    "merged ssvd_o ties",
    "merged ssvd_o task_arithmetic@core",
    "joint hdmole",
]


@pytest.fixture(scope="module")
def merging_rows(exp: Path) -> list[dict[str, str]]:
    with (exp / "merging.csv").open() as f:
        return list(csv.DictReader(f))


def test_merging_table_has_each_one_model_system_over_both_seeds(
    merging_rows: list[dict[str, str]], exp: Path
) -> None:
    assert [row["system"] for row in merging_rows] == MERGING_SYSTEMS
    frozen = yaml.safe_load((exp / "frozen" / "merging" / "current.yaml").read_text())
    for row in merging_rows:
        per_domain = row["system"].startswith("per-domain")
        assert row["seeds"] == ("1" if row["system"] == "base" else "2"), row
        rates = [c for c in row if c.endswith(("WER", "CER")) and c != "WER_ft / WER"]
        columns = [c for c in rates if not (per_domain and c.startswith("phone"))]
        assert all(float(row[c]) >= 0.0 for c in columns), row
        assert (row["phone WER"] == "") == per_domain, row
        for column in ("in-domain WER", "source WER"):
            assert float(row[column + " 95% low"]) <= float(row[column]) <= float(row[column + " 95% high"])
        merged = row["system"].startswith("merged")
        assert bool(row["knobs"]) == merged and (row["knobs"].startswith("scaling=") or not merged), row
        if row["kind"] in ("full", "ssvd_o") and not per_domain:
            assert float(row["WER_ft / WER"]) > 0.0, row
    assert sorted(frozen["choices"]) == [
        "full/ties",
        "full/tsv_m",
        "ssvd_o/task_arithmetic@core",
        "ssvd_o/ties",
    ]
    text = (exp / "merging.md").read_text()
    assert f"Base model: `{exp}/base/valid.acc.ave.pth`" in text
    assert f"merge knobs frozen on dev in `{exp}/frozen/merging/{frozen['file']}`" in text
    assert "| full/ties | scaling=0.5 density=0.5 -> " in (exp / "merging_knobs.md").read_text()


def test_merging_differences_pair_each_merge_with_the_per_domain_and_joint_models(exp: Path) -> None:
    with (exp / "merging_differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    compared = {(r["system"], r["reference"], r["test"]) for r in rows}
    for kind, merges in (("full", ["ties", "tsv_m"]), ("ssvd_o", ["ties", "task_arithmetic@core"])):
        for system in [f"joint {kind}", *(f"merged {kind} {m}" for m in merges)]:
            assert {(system, f"per-domain {kind}", test) for test in ("in-domain", "source")} <= compared
        for merge in merges:
            tests = ("in-domain", "source", "OOD")
            assert {(f"merged {kind} {merge}", f"joint {kind}", test) for test in tests} <= compared
    for r in rows:
        assert float(r["95% low"]) <= float(r["WER difference"]) <= float(r["95% high"]), r
        assert r["seeds"] in ("2 / 2", "2 / 6"), r  # per-domain on the source: three models' two seeds


def test_merged_models_are_made_at_the_frozen_knobs_at_each_seed(exp: Path) -> None:
    frozen = yaml.safe_load((exp / "frozen" / "merging" / "current.yaml").read_text())["choices"]
    for name in ("full/ties", "full/tsv_m", "ssvd_o/ties"):
        tuning = yaml.safe_load((exp / "merged" / "tune" / name / "merge.yaml").read_text())
        assert [row["knobs"]["scaling"] for row in tuning["search"]["grid"]][:2] == [0.5, 1.0], name
        assert tuning["search"]["chosen"]["knobs"] == frozen[name]
        for seed in ("", "@seed1"):
            config = yaml.safe_load((exp / "merged" / f"{name}{seed}" / "config.yaml").read_text())
            assert not [key for key in config if key.startswith("peft")], name
            record = yaml.safe_load((exp / "merged" / f"{name}{seed}" / "merge.yaml").read_text())
            assert "search" not in record and {k: record["knobs"][k] for k in frozen[name]} == frozen[name]
            assert record["experiments"] == [
                str(exp / domain / f"{name.split('/')[0]}{seed}" / "valid.acc.best.pth")
                for domain in ("accent", "child", "noisy")
            ]
    core = yaml.safe_load((exp / "merged" / "ssvd_o" / "task_arithmetic@core" / "config.yaml").read_text())
    assert core["peft"] == "ssvd_core" and core["peft_pretrained"] == str(
        (exp / "base" / "valid.acc.ave.pth").resolve()
    )


def test_a_test_decode_of_a_merge_at_other_knobs_is_refused(recipe_root: Path, exp: Path) -> None:
    record_file = exp / "merged" / "full" / "ties@seed1" / "merge.yaml"
    original = record_file.read_text()
    changed = yaml.safe_load(original)
    changed["knobs"]["scaling"] = 7.0
    record_file.write_text(yaml.safe_dump(changed))
    try:
        result = refused_stage(recipe_root, 12)
    finally:
        record_file.write_text(original)
    assert result.returncode != 0
    assert "merged/full/ties@seed1: made with scaling=7" in result.stderr
    assert "a test is decoded only for a merge at frozen knobs" in result.stderr
    assert "Stage 12: decode" not in result.stdout


def test_joint_runs_train_on_every_domain_at_each_seed_and_the_lambda_curve_is_decoded(exp: Path) -> None:
    for run in ("full", "ssvd_o", "full@seed1", "ssvd_o@seed1"):
        assert (exp / "all" / run / "train_stats.json").is_file()
        assert "data/combined/adapt" in (exp / "all" / run / "config.yaml").read_text()
    with (exp / "merging_lambda.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [(row["algorithm"], float(row["scaling"])) for row in curve] == [
        ("task_arithmetic", 0.5),
        ("task_arithmetic", 1.0),
    ]
    assert all(float(row["OOD WER"]) >= 0.0 and float(row["in-domain WER"]) >= 0.0 for row in curve)
    assert (exp / "merging_lambda.png").read_bytes()[:8] == PNG
