"""Merging stages of egs/synth_domains/asr1: the plan of merges (local/merge_plan.py), the frozen knobs
and their guard (local/merge_freeze.py) and the merging tables (local/score_merging.py) on hand-made
runs, decodes and merge records."""

from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path

import pytest
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import merge_freeze  # noqa: E402
import merge_plan  # noqa: E402
import score_merging  # noqa: E402
from freeze import write_frozen  # noqa: E402
from runs import Run  # noqa: E402

DOMAINS = ["accent", "child", "noisy"]
METHODS = ["full", "lora", "dora", "pissa", "ssvd", "ssvd_o"]


def per_domain_runs(methods: list[str], seeds: int = 1) -> list[Run]:
    runs = [
        Run(f"{d}/{m}", m, "main", "-", f"{m}.yaml", f"{d}_adapt", f"{d}_dev", [d])
        for m in methods
        for d in DOMAINS
    ]
    runs += [
        Run(f"{d}/{m}@seed{i}", m, "seed", str(i), f"{m}@seed{i}.yaml", f"{d}_adapt", f"{d}_dev", [d])
        for i in range(1, seeds)
        for m in methods
        for d in DOMAINS
    ]
    runs.append(Run("all/hdmole", "hdmole", "main", "-", "h.yaml", "c/adapt", "c/dev", [*DOMAINS, "phone"]))
    runs.append(Run("child/lora@b2", "lora", "budget", "2", "l.yaml", "child_adapt", "child_dev", ["child"]))
    return runs


def full_profile_merging() -> dict:
    return yaml.safe_load((RECIPE / "conf" / "asr" / "full" / "adapters.yaml").read_text())["merging"]


def planner(merging: dict, methods: list[str] = METHODS) -> merge_plan.MergePlanner:
    return merge_plan.MergePlanner(merging, per_domain_runs(methods), DOMAINS, Path("exp"), Path("data/dev"))


def options(merge: merge_plan.Merge) -> dict[str, list[str]]:
    """The merge's options, repeated ones collected."""
    collected: dict[str, list[str]] = {}
    key = ""
    for item in merge.options:
        if item.startswith("--"):
            key = item
            collected.setdefault(key, [])
        else:
            collected[key].append(item)
    return collected


def frozen_choices(merges: list[merge_plan.Merge]) -> dict[str, dict]:
    """A choice for every tuning merge: the first point of its grid (what a frozen file holds)."""
    choices = {}
    for merge in merges:
        searched = [item.split("=") for item in options(merge)["--search"]]
        choices[merge.choice] = {key: float(values.split(",")[1]) for key, values in searched}
    return choices


def test_the_full_profile_tunes_every_algorithm_with_a_grid_on_the_seed_0_runs() -> None:
    merging = full_profile_merging()
    tuning = {merge.name: merge for merge in planner(merging, [*METHODS, "hdmole"]).tuning()}
    without_grid = {"soup", "model_stock", "karcher", "multislerp"}
    peft = [m for m in METHODS if m != "full"]
    expected = [f"merged/tune/full/{a}" for a in merging["full"] if a not in without_grid]
    expected += [f"merged/tune/{m}/{a}" for m in peft for a in merging["adapters"]] + [
        "merged/tune/lora/knots"
    ]
    expected += [f"merged/tune/{m}/{a}@core" for m in ("ssvd", "ssvd_o") for a in ("task_arithmetic", "ties")]
    assert sorted(tuning) == sorted(expected)
    assert not any("hdmole" in name for name in tuning)  # HDMoLE routes, it is not merged
    ta = options(tuning["merged/tune/full/task_arithmetic"])
    assert ta["--method"] == ["task_arithmetic"] and ta["--model_file"] == ["valid.acc.best.pth"]
    assert ta["--exp_dirs"] == [f"exp/{d}/full" for d in DOMAINS]
    assert ta["--search"] == ["scaling=0.25,0.5,0.75,1.0,1.25"]
    assert ta["--dev_data"] == ["data/dev/wav.scp,speech,sound", "data/dev/text,text,text"]
    assert options(tuning["merged/tune/full/ties"])["--search"] == [
        "scaling=0.25,0.5,0.75,1.0,1.25",
        "density=0.2,0.5",
    ]
    assert options(tuning["merged/tune/full/dare_ties"])["--knob"] == ["density=1.0", "dare_drop=0.5"]
    boosted = options(tuning["merged/tune/ssvd/boosted_tsv_m"])
    assert boosted["--search"][1] == "beta=0.1,0.3,0.5" and boosted["--exp_dirs"][0] == "exp/accent/ssvd"
    core = tuning["merged/tune/ssvd_o/ties@core"]
    assert core.form == "ssvd_core" and options(core)["--as_adapter"] == ["ssvd_core"]
    assert core.choice == "ssvd_o/ties@core" and all(merge.seed == 0 for merge in tuning.values())


def test_the_merges_of_the_table_take_the_frozen_knobs_at_every_seed() -> None:
    merging = full_profile_merging()
    plan = merge_plan.MergePlanner(
        merging, per_domain_runs(METHODS, seeds=2), DOMAINS, Path("exp"), Path("data/dev")
    )
    plan.frozen = frozen_choices(plan.tuning())
    merges = {merge.name: merge for merge in plan.plan(seeds=2)}
    systems = [f"merged/full/{a}" for a in merging["full"]]
    systems += [f"merged/{m}/{a}" for m in METHODS if m != "full" for a in merging["adapters"]] + [
        "merged/lora/knots"
    ]
    systems += [f"merged/{m}/{a}@core" for m in ("ssvd", "ssvd_o") for a in ("task_arithmetic", "ties")]
    curve = [
        f"merged/full/{a}@scaling{v:g}" for a in ("task_arithmetic", "tsv_m") for v in merging["scaling"]
    ]
    assert sorted(merges) == sorted([*systems, *(f"{s}@seed1" for s in systems), *curve])
    for merge in merges.values():
        assert "--search" not in options(merge) and "--dev_data" not in options(merge), merge.name
    ties, ties_seed1 = options(merges["merged/full/ties"]), options(merges["merged/full/ties@seed1"])
    assert ties["--knob"] == ties_seed1["--knob"] == ["scaling=0.5", "density=0.5"]
    assert ties_seed1["--exp_dirs"] == [f"exp/{d}/full@seed1" for d in DOMAINS]
    assert (
        merges["merged/full/ties@seed1"].seed == 1
        and merges["merged/full/ties@seed1"].system == "merged/full/ties"
    )
    assert options(merges["merged/full/soup"]).get("--knob") is None  # nothing to choose
    dare_ties = options(merges["merged/full/dare_ties@seed1"])["--knob"]
    assert dare_ties == ["density=1.0", "dare_drop=0.5", "scaling=0.5"]
    assert options(merges["merged/full/tsv_m@scaling0.5"])["--knob"] == ["scaling=0.5"]
    assert merges["merged/full/tsv_m@scaling0.5"].curve and not merges["merged/full/tsv_m"].curve


def test_a_merge_without_frozen_knobs_is_refused() -> None:
    plan = planner(full_profile_merging())
    plan.frozen = frozen_choices(plan.tuning())
    del plan.frozen["ssvd_o/ties@core"]
    with pytest.raises(
        SystemExit, match=r"no knobs frozen on dev for ssvd_o/ties@core: run stage 11 with --tune"
    ):
        plan.plan(seeds=1)


def test_merges_round_trip_through_their_file(tmp_path: Path) -> None:
    merges = planner(full_profile_merging()).tuning()
    path = tmp_path / "merges.tsv"
    path.write_text("".join(merge.line() for merge in merges))
    assert merge_plan.read_merges(path) == merges
    first = path.read_text().splitlines()[0].split("\t")
    assert shlex.split(first[5]) == merges[0].options  # what run.sh passes to merge_models


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"full": ["tiess"]}, "algorithm 'tiess' is not in merging.algorithms"),
        (
            {"algorithms": {"ties": {"method": "ties", "knobs": {"densty": 0.2}}}, "full": ["ties"]},
            "no knob 'densty'",
        ),
        ({"kept_as_adapter": {"lora": ["ties"]}}, "lora adapters have no shared subspace"),
    ],
)
def test_a_bad_merging_block_is_refused_with_one_message(change: dict, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        planner({**full_profile_merging(), **change}).tuning()


def test_a_kind_without_a_run_on_every_domain_is_refused() -> None:
    merging = {**full_profile_merging(), "adapters": [], "kept_as_adapter": {}, "lambda_curve": []}
    runs = [r for r in per_domain_runs(METHODS) if r.name != "noisy/full"]
    plan = merge_plan.MergePlanner(merging, runs, DOMAINS, Path("exp"), Path("data/dev"))
    with pytest.raises(SystemExit, match="no full run on noisy"):
        plan.tuning()


def write_record(exp: Path, name: str, record: dict) -> None:
    (exp / name).mkdir(parents=True, exist_ok=True)
    (exp / name / "merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False))


def test_the_dev_choices_are_frozen_and_the_guard_refuses_any_other_merge(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    tuning = merge_plan.Merge("merged/tune/full/ties", "full", "ties", "model", 0, [], [])
    grid = [
        {"knobs": {"scaling": s, "density": 0.2}, "metric": "acc", "score": a}
        for s, a in ((0.5, 0.8), (1.0, 0.9))
    ]
    write_record(
        exp,
        tuning.name,
        {"knobs": {"scaling": 1.0, "density": 0.2}, "search": {"grid": grid, "chosen": grid[1]}},
    )
    record = merge_freeze.choose([tuning], exp)
    assert record == {
        "scores": {"full/ties": {"scaling=0.5 density=0.2": 0.8, "scaling=1 density=0.2": 0.9}},
        "choices": {"full/ties": {"scaling": 1.0, "density": 0.2}},
    }
    assert merge_freeze.choose([], exp) == {"scores": {}, "choices": {}}  # no algorithm with a grid
    frozen = write_frozen(record, exp / "frozen" / "merging", merge_freeze.CRITERION)
    assert yaml.safe_load(frozen.read_text())["criterion"] == merge_freeze.CRITERION
    current = exp / "frozen" / "merging" / "current.yaml"
    merges = [
        merge_plan.Merge(name, "full", "ties", "model", seed, [], [])
        for name, seed in (
            ("merged/full/ties", 0),
            ("merged/full/ties@seed1", 1),
            ("merged/full/ties@scaling2", 0),
        )
    ]
    made = {"scaling": 1.0, "density": 0.2, "dare_drop": 0.0}
    write_record(exp, "merged/full/ties", {"knobs": made})
    write_record(exp, "merged/full/ties@seed1", {"knobs": made})
    write_record(exp, "merged/full/ties@scaling2", {"knobs": {**made, "scaling": 2.0}})  # the curve: a sweep
    merge_freeze.check(current, merges, exp)

    write_record(exp, "merged/full/ties", {"knobs": made, "search": {"grid": grid, "chosen": grid[1]}})
    write_record(exp, "merged/full/ties@seed1", {"knobs": {**made, "density": 0.5}})
    with pytest.raises(SystemExit) as refusal:
        merge_freeze.check(current, merges, exp)
    message = str(refusal.value)
    assert "merged/full/ties: its knobs were searched when it was made" in message
    assert (
        "merged/full/ties@seed1: made with scaling=1 density=0.5, but the knobs frozen on dev for full/ties"
        in message
    )
    assert "a test is decoded only for a merge at frozen knobs" in message and "scaling2" not in message
    with pytest.raises(SystemExit, match="no frozen merging knobs"):
        merge_freeze.check(tmp_path / "missing.yaml", merges, exp)


def write_decode(exp: Path, system: str, hypotheses: dict[str, str]) -> None:
    path = exp / "decode" / system / "1best_recog" / "text"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"{utt} {text}\n" for utt, text in hypotheses.items()))


SCORED_RUNS = [
    Run("accent/full", "full", "main", "-", "f.yaml", "", "", ["accent"]),
    Run("child/full", "full", "main", "-", "f.yaml", "", "", ["child"]),
    Run("all/full", "full", "joint", "-", "f.yaml", "", "", ["accent", "child", "phone"]),
    Run("all/hdmole", "hdmole", "main", "-", "h.yaml", "", "", ["accent", "child", "phone"]),
    Run("accent/full@seed1", "full", "seed", "1", "f@seed1.yaml", "", "", ["accent"]),
    Run("child/full@seed1", "full", "seed", "1", "f@seed1.yaml", "", "", ["child"]),
    Run("all/full@seed1", "full", "seed", "1", "f@seed1.yaml", "", "", ["accent", "child", "phone"]),
    Run("all/hdmole@seed1", "hdmole", "seed", "1", "h@seed1.yaml", "", "", ["accent", "child", "phone"]),
]
SCORED_MERGES = [
    merge_plan.Merge("merged/full/ties", "full", "ties", "model", 0, [], []),
    merge_plan.Merge("merged/full/ties@seed1", "full", "ties", "model", 1, [], []),
    merge_plan.Merge("merged/full/ties@scaling0.5", "full", "ties", "model", 0, [], []),
]


def scored_exp(tmp_path: Path) -> tuple[Path, Path]:
    """Data and decodes of two domains, one OOD test and the source, one 4-word utterance each, two seeds."""
    data, exp = tmp_path / "data", tmp_path / "exp"
    references = {d: {f"{d}-1": "one two three four"} for d in ["accent", "child", "phone", "source"]}
    for domain, table in references.items():
        (data / f"{domain}_test").mkdir(parents=True)
        (data / f"{domain}_test" / "text").write_text("".join(f"{u} {t}\n" for u, t in table.items()))
    every = {utt: text for table in references.values() for utt, text in table.items()}
    write_decode(exp, "base", {u: "one" for u in every})  # 3 of 4 words wrong everywhere
    write_decode(exp, "accent/full", {"accent-1": "one two three four", "source-1": "one two"})
    write_decode(exp, "accent/full@seed1", {"accent-1": "one two three", "source-1": "one two three four"})
    write_decode(exp, "child/full", {"child-1": "one two three", "source-1": "one two three four"})
    write_decode(exp, "child/full@seed1", {"child-1": "one two three four", "source-1": "one two"})
    write_decode(exp, "all/full", {**every, "accent-1": "one two"})
    write_decode(exp, "all/full@seed1", every)
    write_decode(exp, "merged/full/ties", {**every, "child-1": "one two"})
    write_decode(exp, "merged/full/ties@seed1", {**every, "child-1": "one two"})
    write_decode(exp, "merged/full/ties@scaling0.5", {**every, "phone-1": "one"})
    write_decode(exp, "all/hdmole", every)
    write_decode(exp, "all/hdmole@seed1", every)
    return data, exp


def test_the_merging_table_is_over_seeds_with_intervals(tmp_path: Path) -> None:
    data, exp = scored_exp(tmp_path)
    scorer = score_merging.MergingScorer(data, exp, ["accent", "child"], ["phone"])
    systems = score_merging.Systems(SCORED_RUNS, SCORED_MERGES, ["accent", "child"])
    rows = score_merging.system_rows(scorer, systems, {"full/ties": {"scaling": 1.0, "density": 0.2}})
    table = {r["system"]: r for r in rows}
    assert list(table) == ["base", "per-domain full", "joint full", "merged full ties", "joint hdmole"]
    assert all(table[name]["seeds"] == 2 for name in list(table)[1:]) and table["base"]["seeds"] == 1
    per_domain = table["per-domain full"]
    # accent 0 and 1 errors, child 1 and 0: 12.5 % each and 1 error of 8 words per seed in-domain
    assert (per_domain["accent WER"], per_domain["child WER"], per_domain["in-domain WER"]) == (
        12.5,
        12.5,
        12.5,
    )
    assert per_domain["phone WER"] == "" and per_domain["source WER"] == 25.0  # 2, 0, 0, 2 errors of 4
    merged = table["merged full ties"]
    assert (merged["accent WER"], merged["child WER"], merged["in-domain WER"]) == (0.0, 50.0, 25.0)
    assert (merged["phone WER"], merged["source WER"], merged["knobs"]) == (0.0, 0.0, "scaling=1 density=0.2")
    assert merged[score_merging.NORMALISED] == 0.25  # child 12.5 / 50; accent's 0 is left out
    joint = table["joint full"]
    assert (joint["accent WER"], joint["child WER"], joint["in-domain WER"]) == (25.0, 0.0, 12.5)
    for row in rows:
        for column in ("in-domain WER", "source WER"):
            assert row[column + " 95% low"] <= row[column] <= row[column + " 95% high"], (row, column)
    assert table["base"]["in-domain WER"] == 75.0 and table["joint hdmole"][score_merging.NORMALISED] == ""
    curve = score_merging.curve_rows(scorer, SCORED_MERGES)
    assert curve == [
        {"algorithm": "ties", "scaling": 0.5, "in-domain WER": 0.0, "OOD WER": 75.0, "source WER": 0.0}
    ]


def test_the_merging_differences_pair_every_one_model_system_with_its_references(tmp_path: Path) -> None:
    data, exp = scored_exp(tmp_path)
    scorer = score_merging.MergingScorer(data, exp, ["accent", "child"], ["phone"])
    systems = score_merging.Systems(SCORED_RUNS, SCORED_MERGES, ["accent", "child"])
    rows = score_merging.difference_rows(scorer, systems, resamples=200)
    compared = [(r["system"], r["reference"], r["test"], r["WER difference"], r["seeds"]) for r in rows]
    assert compared == [
        ("joint full", "per-domain full", "in-domain", 0.0, "2 / 2"),
        ("joint full", "per-domain full", "source", -25.0, "2 / 4"),  # every per-domain model's seeds
        ("merged full ties", "per-domain full", "in-domain", 12.5, "2 / 2"),
        ("merged full ties", "per-domain full", "source", -25.0, "2 / 4"),
        ("merged full ties", "joint full", "in-domain", 12.5, "2 / 2"),
        ("merged full ties", "joint full", "source", 0.0, "2 / 2"),
        ("merged full ties", "joint full", "OOD", 0.0, "2 / 2"),
    ]
    assert rows[-1]["verdict"] == "no difference"  # both perfect on phone: an interval of [0, 0]
    for r in rows:
        assert r["95% low"] <= r["WER difference"] <= r["95% high"], r


def test_stage_13_writes_the_tables_the_knobs_and_the_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    data, exp = scored_exp(tmp_path)
    (exp / "finetune_conf").mkdir()
    runs = exp / "finetune_conf" / "runs.tsv"
    runs.write_text("".join(run.line() for run in SCORED_RUNS))
    merges = exp / "merges.tsv"
    merges.write_text("".join(merge.line() for merge in SCORED_MERGES))
    record = {
        "scores": {"full/ties": {"scaling=0.5": 0.8, "scaling=1": 0.9}},
        "choices": {"full/ties": {"scaling": 1.0}},
    }
    assert merge_freeze.choose([], exp) == {"scores": {}, "choices": {}}  # no algorithm with a grid
    frozen = write_frozen(record, exp / "frozen" / "merging", merge_freeze.CRITERION)
    argv = [
        "score_merging.py",
        "--data",
        str(data),
        "--exp",
        str(exp),
        "--runs",
        str(runs),
        "--merges",
        str(merges),
    ]
    argv += ["--frozen", str(exp / "frozen" / "merging" / "current.yaml"), "--domains", "accent child"]
    argv += ["--ood_domains", "phone", "--base_model", "b.pth", "--resamples", "200"]
    monkeypatch.setattr(sys, "argv", argv)
    score_merging.main()
    with (exp / "merging.csv").open() as f:
        assert [row["system"] for row in csv.DictReader(f)] == [
            "base",
            "per-domain full",
            "joint full",
            "merged full ties",
            "joint hdmole",
        ]
    text = (exp / "merging.md").read_text()
    assert "Base model: `b.pth`" in text and f"merge knobs frozen on dev in `{frozen}`" in text
    assert "| merged full ties | full | 2 | 0.0 |" in text and "25.0 [" in text
    assert (
        "| full/ties | scaling=0.5 -> 0.8000; scaling=1 -> 0.9000 | scaling=1 |"
        in (exp / "merging_knobs.md").read_text()
    )
    with (exp / "merging_differences.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 7
    assert (exp / "merging_lambda.png").stat().st_size > 0
