"""Training, decoding and scoring stages of egs/synth_domains/asr1: the `ci` profile's stages 1-10.

``run.sh --profile ci --methods "full lora" --domains "child noisy"`` (no sweeps, merging or layer
analysis) runs once per module in a temporary directory: data, tokens, shapes, pretraining, the
learning rates tuned on dev and frozen, full fine-tuning and LoRA on two target domains at two seeds,
decoding behind the freeze guard, scoring with intervals and paired differences. The rest of the
profile (HDMoLE, a fusion row, the sweeps, merging, the layer analysis) is
test_synth_domains_recipe_all.py's, behind the slow marker. The models are tiny and barely trained,
so the tests check that the pipeline produced complete, well-formed results, not their numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
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

METHODS = ["full", "lora"]
DOMAINS = ["child", "noisy"]
OPTIONS = ("--methods", " ".join(METHODS), "--domains", " ".join(DOMAINS), "--sweeps", "none")
OPTIONS += ("--merging", "false", "--layer_analysis", "false")


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    check_tools()
    root = tmp_path_factory.mktemp("synth_domains_recipe")
    run_recipe(root, *OPTIONS)
    return root


@pytest.fixture(scope="module")
def exp(recipe_root: Path) -> Path:
    return recipe_root / "exp"


@pytest.fixture(scope="module")
def domains(recipe_root: Path) -> list[str]:
    assert (recipe_root / "data" / "target_domains.txt").read_text().split() == ["accent", "child", "noisy"]
    return DOMAINS


@pytest.fixture(scope="module")
def rows(exp: Path) -> list[dict[str, str]]:
    with (exp / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_results_have_one_row_per_domain_and_method_plus_the_base(
    rows: list[dict[str, str]], domains: list[str]
) -> None:
    expected = [(domain, method) for domain in domains for method in ["base", *METHODS]]
    assert [(row["domain"], row["method"]) for row in rows] == expected


def test_every_number_parses_and_is_in_range(rows: list[dict[str, str]]) -> None:
    check_numbers(rows)


def test_forgetting_is_the_change_of_source_wer_from_the_base(rows: list[dict[str, str]]) -> None:
    check_forgetting(rows)


def test_lora_trains_the_planned_count_far_below_full_fine_tuning(
    rows: list[dict[str, str]], exp: Path
) -> None:
    planned = json.loads((exp / "finetune_conf" / "trainable.json").read_text())
    assert set(planned) == {"full", "lora", "full@seed1", "lora@seed1", "layer_analysis"}
    assert planned["lora@seed1"] == planned["lora"] < 0.1 * planned["full"]
    for row in rows:
        if row["method"] != "base":  # the logged count (peft_budget.json) as planned
            assert int(row["trainable params"]) == planned[row["method"]], row


def test_every_method_trains_at_the_rate_frozen_on_dev_before_any_test(exp: Path) -> None:
    adapters = yaml.safe_load((RECIPE / "conf" / "asr" / "ci" / "adapters.yaml").read_text())
    rates = [float(rate) for rate in adapters["tuning"]["lr"]]
    frozen = yaml.safe_load((exp / "frozen" / "current.yaml").read_text())
    assert sorted(frozen["choices"]) == sorted(METHODS)
    assert all(sorted(frozen["scores"][method]) == rates for method in METHODS)
    dated = exp / "frozen" / frozen["file"]
    assert dated.read_text() == (exp / "frozen" / "current.yaml").read_text()
    for method in METHODS:
        tuned = [exp / "child" / f"{method}@lr{rate:g}" for rate in rates]
        assert all((run / "checkpoint.pth").is_file() for run in tuned), method
        main = exp / "noisy" / method
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
        assert [r["run"] for r in runs] == [
            f"{row['domain']}/{row['method']}",
            f"{row['domain']}/{row['method']}@seed1",
        ]
        mean = sum(float(r["target WER"]) for r in runs) / 2
        assert float(row["target WER"]) == pytest.approx(mean, abs=0.01)
        for column in ("target WER", "forgetting (source WER change)"):
            low, high = float(row[f"{column} 95% low"]), float(row[f"{column} 95% high"])
            assert low <= float(row[column]) <= high, (row, column)
    seeded = yaml.safe_load((exp / "child" / "lora@seed1" / "config.yaml").read_text())
    assert seeded["seed"] == yaml.safe_load((exp / "child" / "lora" / "config.yaml").read_text())["seed"] + 1


def test_a_seed_reproduces_its_run_bit_for_bit_and_another_seed_differs(exp: Path, tmp_path: Path) -> None:
    """child/lora (LoRA's A drawn from the seed) trained again from its logged command line."""
    assert_reproduced(exp / "child" / "lora", exp / "child" / "lora@seed1", tmp_path)


def test_a_test_decode_of_a_run_at_another_rate_is_refused(recipe_root: Path, exp: Path) -> None:
    config = exp / "child" / "lora" / "config.yaml"
    original = config.read_text()
    changed = yaml.safe_load(original)
    changed["optim_conf"]["lr"] *= 3
    config.write_text(yaml.safe_dump(changed))
    try:
        result = refused_stage(recipe_root, 9)
    finally:
        config.write_text(original)
    assert result.returncode != 0
    assert (
        "child/lora: " in result.stderr
        and "a test is decoded only for a frozen configuration" in result.stderr
    )
    assert "Stage 9: decode" not in result.stdout


def test_paired_differences_against_full_fine_tuning_cover_every_method_and_test(
    exp: Path, domains: list[str]
) -> None:
    with (exp / "differences.csv").open() as f:
        rows = list(csv.DictReader(f))
    tests = ("target", "source")
    assert [(r["domain"], r["test"], r["method"], r["reference"]) for r in rows] == [
        (domain, test, "lora", "full") for domain in domains for test in tests
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
    assert "./run.sh --profile ci --python" in report and '--methods "full lora"' in report
    assert "| lora | " in report and "**" in report  # the tuning grid, its choices in bold
    for section in ("## Learning vs forgetting", "## Paired differences"):
        assert section in report
    assert table[0] in report  # the results table itself
    plot = exp / "learning_vs_forgetting.png"
    assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 5000


def test_decoding_covers_every_test_utterance(exp: Path, recipe_root: Path, domains: list[str]) -> None:
    def keys(path: Path) -> set[str]:
        return {line.split(maxsplit=1)[0] for line in path.read_text().splitlines() if line.strip()}

    data = recipe_root / "data"
    source = keys(data / "source_test" / "text")
    everything = [*domains, "phone"]  # the target domains and the out-of-distribution one
    assert keys(exp / "decode" / "base" / "1best_recog" / "text") == source.union(
        *(keys(data / f"{domain}_test" / "text") for domain in everything)
    )
    for domain in domains:
        for run in (f"{domain}/{method}{seed}" for method in METHODS for seed in ("", "@seed1")):
            hypotheses = keys(exp / "decode" / run / "1best_recog" / "text")
            assert hypotheses == source | keys(data / f"{domain}_test" / "text"), run


def test_rerun_skips_finished_fine_tuning_and_decoding(recipe_root: Path, exp: Path) -> None:
    stats = exp / "noisy" / "lora" / "train_stats.json"
    before = stats.stat().st_mtime_ns
    result = run_recipe(recipe_root, "--stage", "7", *OPTIONS)
    assert "Stage 7: base model" in result.stdout and "reused" in result.stdout
    assert "Stage 9: base decoded, skipped" in result.stdout
    assert "Stage 8: noisy/lora done, skipped" in result.stdout
    assert "Stage 8: child/lora@lr0.001 done, skipped" in result.stdout
    assert len(list((exp / "frozen").glob("*.yaml"))) == 2  # the same choices: no new dated file
    assert "Stage 9: noisy/lora@seed1 decoded, skipped" in result.stdout
    assert "Stage 8: fine-tune" not in result.stdout and "Stage 9: decode " not in result.stdout
    assert stats.stat().st_mtime_ns == before
