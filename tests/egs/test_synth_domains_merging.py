"""Merging stages of egs/synth_domains/asr1: the plan of merges (local/merge_plan.py) and the merging
table (local/score_merging.py) on hand-made runs, decodes and merge records."""

from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path

import pytest
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import merge_plan  # noqa: E402
import score_merging  # noqa: E402
from runs import Run  # noqa: E402

DOMAINS = ["accent", "child", "noisy"]
METHODS = ["full", "lora", "dora", "pissa", "ssvd", "ssvd_o"]


def per_domain_runs(methods: list[str]) -> list[Run]:
    runs = [
        Run(f"{d}/{m}", m, "main", "-", f"{m}.yaml", f"{d}_adapt", f"{d}_dev", [d])
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


def test_the_full_profile_merges_every_kind_with_its_algorithms() -> None:
    merging = full_profile_merging()
    merges = {merge.name: merge for merge in planner(merging, [*METHODS, "hdmole"]).plan()}
    peft = [m for m in METHODS if m != "full"]
    expected = [f"merged/full/{a}" for a in merging["full"]]
    expected += [f"merged/{m}/{a}" for m in peft for a in merging["adapters"]] + ["merged/lora/knots"]
    expected += [f"merged/{m}/{a}@core" for m in ("ssvd", "ssvd_o") for a in ("task_arithmetic", "ties")]
    expected += [
        f"merged/full/{a}@scaling{v:g}" for a in ("task_arithmetic", "tsv_m") for v in merging["scaling"]
    ]
    assert sorted(merges) == sorted(expected) and len(merges) == 15 + 5 * 4 + 1 + 4 + 10
    assert not any("hdmole" in name for name in merges)  # per-domain HDMoLE runs route, not merge

    ta = options(merges["merged/full/task_arithmetic"])
    assert ta["--method"] == ["task_arithmetic"] and ta["--model_file"] == ["valid.acc.best.pth"]
    assert ta["--exp_dirs"] == [f"exp/{d}/full" for d in DOMAINS]
    assert ta["--search"] == ["scaling=0.25,0.5,0.75,1.0,1.25"]
    assert ta["--dev_data"] == ["data/dev/wav.scp,speech,sound", "data/dev/text,text,text"]
    assert merges["merged/full/task_arithmetic"].inputs == [
        f"exp/{d}/full/valid.acc.best.pth" for d in DOMAINS
    ]
    assert "--search" not in options(merges["merged/full/soup"])  # no knob to search
    assert options(merges["merged/full/ties"])["--search"] == [
        "scaling=0.25,0.5,0.75,1.0,1.25",
        "density=0.2,0.5",
    ]
    assert options(merges["merged/full/dare_ties"])["--knob"] == ["density=1.0", "dare_drop=0.5"]
    boosted = options(merges["merged/ssvd/boosted_tsv_m"])
    assert boosted["--search"][1] == "beta=0.1,0.3,0.5" and boosted["--exp_dirs"][0] == "exp/accent/ssvd"
    core = merges["merged/ssvd_o/ties@core"]
    assert core.form == "ssvd_core" and options(core)["--as_adapter"] == ["ssvd_core"]
    curve = options(merges["merged/full/tsv_m@scaling0.5"])
    assert curve["--knob"] == ["scaling=0.5"] and "--search" not in curve and "--dev_data" not in curve


def test_merges_round_trip_through_their_file(tmp_path: Path) -> None:
    merges = planner(full_profile_merging()).plan()
    path = tmp_path / "merges.tsv"
    path.write_text("".join(merge.line() for merge in merges))
    assert merge_plan.read_merges(path) == merges
    first = path.read_text().splitlines()[0].split("\t")
    assert shlex.split(first[4]) == merges[0].options  # what run.sh passes to merge_models


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
        planner({**full_profile_merging(), **change}).plan()


def test_a_kind_without_a_run_on_every_domain_is_refused() -> None:
    merging = {**full_profile_merging(), "adapters": [], "kept_as_adapter": {}, "lambda_curve": []}
    runs = [r for r in per_domain_runs(METHODS) if r.name != "noisy/full"]
    plan = merge_plan.MergePlanner(merging, runs, DOMAINS, Path("exp"), Path("data/dev"))
    with pytest.raises(SystemExit, match="no full run on noisy"):
        plan.plan()


def write_decode(exp: Path, system: str, hypotheses: dict[str, str]) -> None:
    path = exp / "decode" / system / "1best_recog" / "text"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"{utt} {text}\n" for utt, text in hypotheses.items()))


def test_the_merging_table_compares_one_model_with_the_per_domain_ones(tmp_path: Path) -> None:
    data, exp = tmp_path / "data", tmp_path / "exp"
    domains, ood = ["accent", "child"], ["phone"]
    references = {d: {f"{d}-1": "one two three four"} for d in [*domains, *ood, "source"]}
    for domain, table in references.items():
        (data / f"{domain}_test").mkdir(parents=True)
        (data / f"{domain}_test" / "text").write_text("".join(f"{u} {t}\n" for u, t in table.items()))
    every = {utt: text for table in references.values() for utt, text in table.items()}
    write_decode(exp, "base", {u: "one" for u in every})  # 3 of 4 words wrong everywhere
    write_decode(exp, "accent/full", {"accent-1": "one two three four", "source-1": "one two"})
    write_decode(exp, "child/full", {"child-1": "one two three", "source-1": "one two three four"})
    write_decode(exp, "all/full", {**every, "accent-1": "one two"})
    write_decode(exp, "merged/full/ties", {**every, "child-1": "one two"})
    write_decode(exp, "merged/full/ties@scaling0.5", {**every, "phone-1": "one"})
    write_decode(exp, "all/hdmole", every)
    for name in ("merged/full/ties", "merged/full/ties@scaling0.5"):
        (exp / name).mkdir(parents=True)
    grid = [
        {"knobs": {"scaling": s, "density": 0.2}, "metric": "acc", "score": a}
        for s, a in ((0.5, 0.8), (1.0, 0.9))
    ]
    record = {
        "knobs": {"scaling": 1.0, "density": 0.2, "dare_drop": 0.0},
        "search": {"grid": grid, "chosen": grid[1]},
    }
    (exp / "merged/full/ties/merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    (exp / "merged/full/ties@scaling0.5/merge.yaml").write_text(yaml.safe_dump({"knobs": {"scaling": 0.5}}))
    runs = [
        Run("accent/full", "full", "main", "-", "f.yaml", "", "", ["accent"]),
        Run("child/full", "full", "main", "-", "f.yaml", "", "", ["child"]),
        Run("all/full", "full", "joint", "-", "f.yaml", "", "", [*domains, *ood]),
        Run("all/hdmole", "hdmole", "main", "-", "h.yaml", "", "", [*domains, *ood]),
    ]
    merges = [
        merge_plan.Merge("merged/full/ties", "full", "ties", "model", [], []),
        merge_plan.Merge("merged/full/ties@scaling0.5", "full", "ties", "model", [], []),
    ]
    scorer = score_merging.MergingScorer(data, exp, domains, ood)
    rows, records = score_merging.system_rows(scorer, runs, merges)
    table = {r["system"]: r for r in rows}
    assert list(table) == ["base", "per-domain full", "joint full", "merged full ties", "joint hdmole"]
    per_domain = table["per-domain full"]
    assert (per_domain["accent WER"], per_domain["child WER"], per_domain["in-domain WER"]) == (
        0.0,
        25.0,
        12.5,
    )
    assert per_domain["phone WER"] == "" and per_domain["source WER"] == 25.0  # mean of 50 % and 0 %
    merged = table["merged full ties"]
    assert (merged["accent WER"], merged["child WER"], merged["phone WER"], merged["source WER"]) == (
        0.0,
        50.0,
        0.0,
        0.0,
    )
    assert merged["knobs"] == "scaling=1 density=0.2"
    # WER_ft / WER: accent 0/0 is left out; child 25/50
    assert merged[score_merging.NORMALISED] == 0.5 and table["joint hdmole"][score_merging.NORMALISED] == ""
    assert [name for name, _ in records] == ["merged/full/ties"]
    curve = score_merging.curve_rows(scorer, merges)
    assert curve == [
        {"algorithm": "ties", "scaling": 0.5, "in-domain WER": 0.0, "OOD WER": 75.0, "source WER": 0.0}
    ]
    knobs = score_merging.knobs_markdown(records)
    assert (
        "scaling=0.5 density=0.2 -> 0.8000; scaling=1.0 density=0.2 -> 0.9000 | scaling=1.0 density=0.2"
        in knobs
    )


def test_stage_13_writes_the_table_the_knobs_and_the_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    test_the_merging_table_compares_one_model_with_the_per_domain_ones(tmp_path)
    exp = tmp_path / "exp"
    (exp / "finetune_conf").mkdir()
    runs = exp / "finetune_conf" / "runs.tsv"
    runs.write_text(
        "".join(
            Run(n, m, s, "-", "f.yaml", "", "", t).line()
            for n, m, s, t in [
                ("accent/full", "full", "main", ["accent"]),
                ("child/full", "full", "main", ["child"]),
                ("all/full", "full", "joint", ["accent", "child", "phone"]),
            ]
        )
    )
    merges = exp / "merges.tsv"
    merges.write_text(
        merge_plan.Merge("merged/full/ties", "full", "ties", "model", [], []).line()
        + merge_plan.Merge("merged/full/ties@scaling0.5", "full", "ties", "model", [], []).line()
    )
    argv = ["score_merging.py", "--data", str(tmp_path / "data"), "--exp", str(exp), "--runs", str(runs)]
    argv += [
        "--merges",
        str(merges),
        "--domains",
        "accent child",
        "--ood_domains",
        "phone",
        "--base_model",
        "b.pth",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    score_merging.main()
    with (exp / "merging.csv").open() as f:
        assert [row["system"] for row in csv.DictReader(f)] == [
            "base",
            "per-domain full",
            "joint full",
            "merged full ties",
        ]
    assert "Base model: `b.pth`" in (exp / "merging.md").read_text()
    assert (exp / "merging_lambda.png").stat().st_size > 0 and (exp / "merging_knobs.md").exists()
