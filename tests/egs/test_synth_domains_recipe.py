"""Training, decoding and scoring stages of egs/synth_domains/asr1: the `ci` profile end to end.

``run.sh --profile ci`` runs every stage (data, tokens, shapes, pretraining, fine-tuning with the
profile's default methods on every target domain, a feature-fusion row among them, HDMoLE and the
joint runs once on all of them, one run of each sweep, decoding, scoring, merging with each kind of
merge, decoding and scoring the merges, the layer analysis) once per module in a temporary
directory: about 9-10 minutes on 2 cores.
The models are tiny and barely trained, so the tests check that the pipeline produced complete,
well-formed results and sweep tables, not their numbers.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("espnet2")
pytest.importorskip("matplotlib")

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
TOOLS = ("flite", "text2wave", "espeak-ng")
ERROR_RATES = ("target WER", "target CER", "source WER", "source CER")


def run_recipe(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """run.sh of the ci profile with its data, synth and exp dirs under root."""
    command = ["bash", str(RECIPE / "run.sh"), "--profile", "ci", "--python", sys.executable]
    command += ["--data", str(root / "data"), "--synth", str(root / "synth"), "--exp", str(root / "exp")]
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    assert result.returncode == 0, (
        f"run.sh {' '.join(options)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run egs/synth_domains/asr1/local/install_deps.sh"
    root = tmp_path_factory.mktemp("synth_domains_recipe")
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


def test_every_number_parses_and_is_in_range(rows: list[dict[str, str]]) -> None:
    for row in rows:
        adapted = row["method"] != "base"
        for column in ERROR_RATES:
            assert float(row[column]) >= 0.0, (row, column)
        if adapted:
            assert int(row["trainable params"]) > 0, row
            assert float(row["train seconds"]) > 0.0 and float(row["peak memory MB"]) > 0.0, row
        else:
            assert int(row["trainable params"]) == 0, row
            assert row["train seconds"] == row["peak memory MB"] == "", row


def test_forgetting_is_the_change_of_source_wer_from_the_base(rows: list[dict[str, str]]) -> None:
    base_source_wer = {row["domain"]: float(row["source WER"]) for row in rows if row["method"] == "base"}
    assert len(set(base_source_wer.values())) == 1
    for row in rows:
        change = float(row["source WER"]) - base_source_wer[row["domain"]]
        assert float(row["forgetting (source WER change)"]) == pytest.approx(change, abs=0.011), row


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
    assert (exp / "layers" / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_trains_at_the_rate_frozen_on_dev_before_any_test(exp: Path, methods: list[str]) -> None:
    adapters = yaml.safe_load((RECIPE / "conf" / "asr" / "ci" / "adapters.yaml").read_text())
    rates = [float(rate) for rate in adapters["tuning"]["lr"]]
    frozen = yaml.safe_load((exp / "frozen" / "current.yaml").read_text())
    assert sorted(frozen["choices"]) == sorted(methods)
    assert all(sorted(frozen["scores"][method]) == rates for method in methods)
    dated = exp / "frozen" / frozen["file"]
    assert dated.read_text() == (exp / "frozen" / "current.yaml").read_text()
    for method in methods:
        tuned = [exp / ("all" if method == "hdmole" else "child") / f"{method}@lr{rate:g}" for rate in rates]
        assert all((run / "checkpoint.pth").is_file() for run in tuned), method
        main = exp / ("all/hdmole" if method == "hdmole" else f"accent/{method}")
        trained = yaml.safe_load((main / "config.yaml").read_text())["optim_conf"]["lr"]
        assert trained == frozen["choices"][method], method
        assert dated.stat().st_mtime < (exp / "decode" / main.relative_to(exp) / "splits").stat().st_mtime
    assert f"frozen on dev in `{dated}`" in (exp / "results.md").read_text()


def test_every_cell_is_the_mean_of_its_seeds_with_intervals(exp: Path, rows: list[dict[str, str]]) -> None:
    with (exp / "results_seeds.csv").open() as f:
        per_seed = list(csv.DictReader(f))
    for row in rows:
        if row["method"] == "base":
            assert row["seeds"] == "" and row["forgetting (source WER change) 95% low"] == ""
            continue
        assert row["seeds"] == "2", row
        runs = [r for r in per_seed if (r["domain"], r["method"]) == (row["domain"], row["method"])]
        assert [r["seed"] for r in runs] == ["0", "1"]
        main, decoded = (
            runs[0]["run"].split("@oracle_") if "@oracle_" in runs[0]["run"] else (runs[0]["run"], "")
        )
        assert runs[1]["run"] == main + "@seed1" + (f"@oracle_{decoded}" if decoded else "")
        mean = sum(float(r["target WER"]) for r in runs) / 2
        assert float(row["target WER"]) == pytest.approx(mean, abs=0.01)
        for column in ("target WER", "forgetting (source WER change)"):
            low, high = float(row[f"{column} 95% low"]), float(row[f"{column} 95% high"])
            assert low <= float(row[column]) <= high, (row, column)
    seeded = yaml.safe_load((exp / "child" / "ssvd_o@seed1" / "config.yaml").read_text())
    assert (
        seeded["seed"] == yaml.safe_load((exp / "child" / "ssvd_o" / "config.yaml").read_text())["seed"] + 1
    )


def test_a_seed_reproduces_its_run_bit_for_bit_and_another_seed_differs(exp: Path, tmp_path: Path) -> None:
    """child/fusion_grouped_lora (randomly initialised LoRA A and fusion head, then trained) trained
    again by the command line its log records (its config and seed, data and base), on one thread as
    stage 8 trains it: the same trained tensors, bit for bit; its seed-1 run differs."""
    run = exp / "child" / "fusion_grouped_lora"
    config = yaml.safe_load((run / "config.yaml").read_text())
    logged = next(line for line in (run / "finetune.log").read_text().splitlines() if "asr_train" in line)
    command = shlex.split(logged)  # ESPnet logs its command line first
    command[command.index("--output_dir") + 1] = str(tmp_path / "again")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = f"{config['max_epoch']}epoch.pth"

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    original, again = weights(run / last), weights(tmp_path / "again" / last)
    assert original.keys() == again.keys() and original
    assert all(torch.equal(original[key], again[key]) for key in original)
    other = weights(exp / "child" / "fusion_grouped_lora@seed1" / last)
    assert any(not torch.equal(original[key], other[key]) for key in original)


def test_a_test_decode_of_a_run_at_another_rate_is_refused(recipe_root: Path, exp: Path) -> None:
    config = exp / "child" / "ssvd_o" / "config.yaml"
    original = config.read_text()
    changed = yaml.safe_load(original)
    changed["optim_conf"]["lr"] *= 3
    config.write_text(yaml.safe_dump(changed))
    try:
        command = [
            "bash",
            str(RECIPE / "run.sh"),
            "--profile",
            "ci",
            "--python",
            sys.executable,
            "--stage",
            "9",
        ]
        command += ["--stop_stage", "9", "--exp", str(exp), "--data", str(recipe_root / "data")]
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        config.write_text(original)
    assert result.returncode != 0
    assert (
        "child/ssvd_o: " in result.stderr
        and "a test is decoded only for a frozen configuration" in result.stderr
    )
    assert "Stage 9: decode" not in result.stdout


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
    assert (exp / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_against_full_fine_tuning_cover_every_method_and_test(
    exp: Path, domains: list[str], methods: list[str]
) -> None:
    with (exp / "differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    others = [method for method in methods if method != "full"]  # the ci profile has no LoRA reference
    tests = ("target", "source")
    assert [(r["domain"], r["test"], r["method"], r["reference"]) for r in rows] == [
        (domain, test, method, "full") for domain in domains for test in tests for method in others
    ]
    for r in rows:
        low, difference, high = float(r["95% low"]), float(r["WER difference"]), float(r["95% high"])
        assert low <= difference <= high, r
        assert (r["verdict"] == "no difference") == (low <= 0 <= high), r


def test_markdown_table_and_plot_are_written(exp: Path, rows: list[dict[str, str]]) -> None:
    text = (exp / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert f"Base model (the zero-shot rows, the start of every run): `{exp}/base/valid.acc.ave.pth`" in text
    assert "| domain | method | seeds | trainable params | target WER | target CER |" in table[0]
    report = (exp / "report.md").read_text()
    assert "./run.sh --profile ci --python" in report and "| fusion_grouped_lora | **" in report
    for section in ("## Learning vs forgetting", "## Paired differences", "## HDMoLE routing", "## Sweeps"):
        assert section in report
    assert table[0] in report  # the results table itself
    plot = exp / "learning_vs_forgetting.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_decoding_covers_every_test_utterance(
    exp: Path, recipe_root: Path, domains: list[str], methods: list[str]
) -> None:
    def keys(path: Path) -> set[str]:
        return {line.split(maxsplit=1)[0] for line in path.read_text().splitlines() if line.strip()}

    data = recipe_root / "data"
    source = keys(data / "source_test" / "text")
    everything = [*domains, "phone"]  # the target domains and the out-of-distribution one
    assert keys(exp / "decode" / "base" / "1best_recog" / "text") == source.union(
        *(keys(data / f"{domain}_test" / "text") for domain in everything)
    )
    for domain in domains:
        for method in methods:
            run = "all/hdmole" if method == "hdmole" else f"{domain}/{method}"
            tests = everything if method == "hdmole" else [domain]
            hypotheses = keys(exp / "decode" / run / "1best_recog" / "text")
            assert hypotheses == source.union(*(keys(data / f"{d}_test" / "text") for d in tests)), run


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
    assert "Stage 11: merged/full/ties merged, skipped" in result.stdout
    assert "Stage 12: merged/ssvd_o/task_arithmetic@core decoded, skipped" in result.stdout
    assert "Stage 11: merge merged/" not in result.stdout and "Stage 12: decode " not in result.stdout
    assert stats.stat().st_mtime_ns == before
    assert layer_hypotheses.stat().st_mtime_ns == layer_decoded  # stage 14 trains and decodes nothing again


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


def test_merging_table_has_each_one_model_system_beside_the_per_domain_ones(
    merging_rows: list[dict[str, str]], exp: Path
) -> None:
    assert [row["system"] for row in merging_rows] == MERGING_SYSTEMS
    for row in merging_rows:
        per_domain = row["system"].startswith("per-domain")
        rates = [c for c in row if c.endswith(("WER", "CER")) and c != "WER_ft / WER"]
        columns = [c for c in rates if not (per_domain and c.startswith("phone"))]
        assert all(float(row[c]) >= 0.0 for c in columns), row
        assert (row["phone WER"] == "") == per_domain, row
        searched = row["system"].startswith("merged")
        assert bool(row["knobs"]) == searched and (row["knobs"].startswith("scaling=") or not searched), row
        if row["kind"] in ("full", "ssvd_o") and not per_domain:
            assert float(row["WER_ft / WER"]) > 0.0, row
    text = (exp / "merging.md").read_text()
    assert f"Base model: `{exp}/base/valid.acc.ave.pth`" in text
    assert "| merged/full/ties | scaling=0.5 density=0.5 -> " in (exp / "merging_knobs.md").read_text()


def test_merged_models_are_ordinary_espnet_dirs_or_one_subspace_adapter(exp: Path) -> None:
    for name in ("full/ties", "full/tsv_m", "ssvd_o/ties"):
        config = yaml.safe_load((exp / "merged" / name / "config.yaml").read_text())
        assert not [key for key in config if key.startswith("peft")], name
        record = yaml.safe_load((exp / "merged" / name / "merge.yaml").read_text())
        assert [row["knobs"]["scaling"] for row in record["search"]["grid"]][:2] == [0.5, 1.0], name
        assert record["experiments"] == [
            str(exp / domain / name.split("/")[0] / "valid.acc.best.pth")
            for domain in ("accent", "child", "noisy")
        ]
    core = yaml.safe_load((exp / "merged" / "ssvd_o" / "task_arithmetic@core" / "config.yaml").read_text())
    assert core["peft"] == "ssvd_core" and core["peft_pretrained"] == str(
        (exp / "base" / "valid.acc.ave.pth").resolve()
    )


def test_joint_runs_train_on_every_domain_and_the_lambda_curve_is_decoded(exp: Path) -> None:
    for method in ("full", "ssvd_o"):
        assert (exp / "all" / method / "train_stats.json").is_file()
        assert "data/combined/adapt" in (exp / "all" / method / "config.yaml").read_text()
    with (exp / "merging_lambda.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [(row["algorithm"], float(row["scaling"])) for row in curve] == [
        ("task_arithmetic", 0.5),
        ("task_arithmetic", 1.0),
    ]
    assert all(float(row["OOD WER"]) >= 0.0 and float(row["in-domain WER"]) >= 0.0 for row in curve)
    assert (exp / "merging_lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
