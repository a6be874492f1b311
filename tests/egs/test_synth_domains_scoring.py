"""Scoring of egs/synth_domains/asr1 (local/score.py): error rates summed over a test split."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import score  # noqa: E402


@pytest.mark.parametrize(
    ("reference", "hypothesis", "distance"),
    [
        ("a b c", "a b c", 0),
        ("a b c", "a x c", 1),  # substitution
        ("a b c", "a c", 1),  # deletion
        ("a b c", "a b b c", 1),  # insertion
        ("a b c", "", 3),
        ("", "a b", 2),
        ("a b c d", "b c d a", 2),
    ],
)
def test_word_errors_count_substitutions_deletions_and_insertions(
    reference: str, hypothesis: str, distance: int
) -> None:
    wer, _ = score.error_rates({"u": reference}, {"u": hypothesis})
    assert (wer.errors, wer.length) == (distance, len(reference.split()))


def test_error_rates_sum_errors_over_the_split_and_count_missing_hypotheses_as_deletions() -> None:
    references = {"u1": "the cat sat", "u2": "on the mat"}
    wer, cer = score.error_rates(references, {"u1": "the cat sat", "u3": "ignored"})
    assert (wer.errors, wer.length) == (3, 6)
    assert wer.percent == pytest.approx(50.0)
    assert (cer.errors, cer.length) == (10, 21)  # spaces are characters


def test_forgetting_is_source_wer_minus_the_base_source_wer() -> None:
    base = (score.ErrorRate(1, 10), score.ErrorRate(2, 40))
    adapted = (score.ErrorRate(3, 10), score.ErrorRate(4, 40))
    target = (score.ErrorRate(5, 10), score.ErrorRate(6, 40))
    row = score.row("child", "lora", 123, target, adapted, base, {"seconds": 1.5, "peak_memory_mb": 99.0})
    assert row["forgetting (source WER change)"] == pytest.approx(20.0)
    assert (row["target WER"], row["source WER"], row["train seconds"]) == (50.0, 30.0, 1.5)
    base_row = score.row("child", "base", 0, target, base, base, None)
    assert base_row["forgetting (source WER change)"] == 0.0
    assert base_row["train seconds"] == base_row["peak memory MB"] == ""


def test_share_of_full_fine_tuning_gain_is_measured_from_the_base_of_the_same_domain() -> None:
    def result(domain: str, method: str, target_wer: float) -> dict[str, object]:
        return {"domain": domain, "method": method, "target WER": target_wer}

    main = [
        result("child", "base", 80.0), result("child", "full", 40.0), result("child", "lora", 60.0),
        result("noisy", "base", 50.0), result("noisy", "full", 55.0), result("noisy", "lora", 45.0),
        result("accent", "base", 30.0), result("accent", "ssvd", 25.0),
    ]  # fmt: skip
    score.fill_gain_shares(main, main)
    shares = {(r["domain"], r["method"]): r[score.GAIN_SHARE] for r in main}
    assert shares[("child", "full")] == 100.0
    assert shares[("child", "lora")] == 50.0
    assert shares[("child", "base")] == ""
    assert shares[("noisy", "lora")] == ""  # full fine-tuning made noisy worse: no gain to share
    assert shares[("accent", "ssvd")] == ""  # no full fine-tuning on accent
    sweep = [result("child", "lora", 90.0)]
    score.fill_gain_shares(sweep, main)
    assert sweep[0][score.GAIN_SHARE] == -25.0  # worse than the base


def write_split(directory: Path, texts: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "text").write_text("".join(f"{utt} {text}\n" for utt, text in texts.items()))


def test_paired_differences_name_a_real_gap_and_call_a_tie_no_difference(tmp_path: Path) -> None:
    """On 40 test utterances, `worse` drops the last word of each, `same` decodes as `full` does: the
    first is worse than full (interval above zero), the second is no different from it."""
    import differences
    from runs import Run, write_runs

    references = {f"u{index:02d}": "the cat sat on the mat" + " again" * (index % 3) for index in range(40)}
    sources = {f"s{index:02d}": "a dog ran" + " far" * (index % 2) for index in range(40)}
    write_split(tmp_path / "data" / "child_test", references)
    write_split(tmp_path / "data" / "source_test", sources)
    exact = {**references, **sources}
    clipped = {utt: text.rsplit(" ", 1)[0] for utt, text in references.items()}
    hypotheses = {"full": exact, "same": exact, "worse": {**clipped, **sources}}
    runs = []
    for method, texts in hypotheses.items():
        write_split(tmp_path / "exp" / "decode" / "child" / method / "1best_recog", texts)
        runs.append(Run(f"child/{method}", method, "main", "-", f"{method}.yaml", "", "", ["child"]))
    write_runs(tmp_path / "runs.tsv", runs)
    rows = differences.difference_rows(
        tmp_path / "data", tmp_path / "exp", runs, ["child"], ["full", "lora"], resamples=2000
    )
    found = {(row["test"], row["method"]): row for row in rows}
    assert set(found) == {(test, method) for test in ("target", "source") for method in ("same", "worse")}
    worse = found[("target", "worse")]
    words = sum(len(text.split()) for text in references.values())
    assert worse["WER difference"] == pytest.approx(100 * 40 / words, abs=0.005) and worse["95% low"] > 0
    assert worse["verdict"] == "worse worse than full"
    assert found[("target", "same")]["verdict"] == found[("source", "worse")]["verdict"] == "no difference"


def write_cell_exp(tmp_path: Path, wrong_words: dict[str, list[int]]) -> list:
    """A child test of 40 six-word utterances and a source test of 40 three-word ones; the base and each
    run of ``wrong_words`` (run name -> words wrong per child utterance, the source always right but
    for the base's one error per source utterance). Returns the runs."""
    import json

    from runs import Run

    references = {f"u{index:02d}": "one two three four five six" for index in range(40)}
    sources = {f"s{index:02d}": "seven eight nine" for index in range(40)}
    write_split(tmp_path / "data" / "child_test", references)
    write_split(tmp_path / "data" / "source_test", sources)
    base = {utt: "x two three four five six" for utt in references} | {utt: "x eight nine" for utt in sources}
    write_split(tmp_path / "exp" / "decode" / "base" / "1best_recog", base)
    runs = []
    for name, wrong in wrong_words.items():
        hyps = {
            utt: " ".join(["x"] * n + text.split()[n:])
            for (utt, text), n in zip(references.items(), wrong, strict=True)
        }
        write_split(tmp_path / "exp" / "decode" / name / "1best_recog", {**hyps, **sources})
        (tmp_path / "exp" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "exp" / name / "train_stats.json").write_text(
            '{"seconds": 10.0, "peak_memory_mb": 100.0}'
        )
        seed = name.split("@seed")[1] if "@seed" in name else None
        method = name.split("/")[1].split("@")[0]
        runs.append(
            Run(name, method, "seed" if seed else "main", seed or "-", f"{method}.yaml", "", "", ["child"])
        )
    (tmp_path / "exp" / "finetune_conf").mkdir(parents=True, exist_ok=True)
    (tmp_path / "exp" / "finetune_conf" / "trainable.json").write_text(json.dumps({"lora": 5, "full": 9}))
    return runs


def test_a_cell_is_the_mean_over_its_seeds_with_intervals_and_each_seed_has_its_row(tmp_path: Path) -> None:
    """lora: seeds with 1 and 2 wrong words of 6 on every child utterance (WER 16.7 and 33.3, mean 25);
    source perfect, against the base's one error in three words: forgetting -33.3 without spread."""
    runs = write_cell_exp(tmp_path, {"child/lora": [1] * 40, "child/lora@seed1": [2] * 40})
    scorer = score.Scorer(tmp_path / "data", tmp_path / "exp")
    base, lora = score.result_rows(scorer, runs, ["child"])
    assert (base["method"], base["seeds"], base["target WER"]) == (
        "base",
        "",
        pytest.approx(100 / 6, abs=0.01),
    )
    assert base["target WER 95% low"] == base["target WER 95% high"] == pytest.approx(100 / 6, abs=0.01)
    assert base["forgetting (source WER change) 95% low"] == ""
    assert (lora["seeds"], lora["target WER"]) == ("2", 25.0)
    # only the seed draw moves the WER: both seeds, one of them twice
    assert (lora["target WER 95% low"], lora["target WER 95% high"]) == (
        pytest.approx(16.67),
        pytest.approx(33.33),
    )
    assert lora["forgetting (source WER change)"] == pytest.approx(-33.33)
    assert lora["forgetting (source WER change) 95% low"] == pytest.approx(-33.33)
    per_seed = score.seed_rows(scorer, runs, ["child"])
    assert [(r["run"], r["seed"], r["target WER"]) for r in per_seed] == [
        ("child/lora", "0", pytest.approx(16.67)), ("child/lora@seed1", "1", pytest.approx(33.33)),
    ]  # fmt: skip
    shown = score.with_intervals([lora])[0]
    assert shown["target WER"] == "25.0 [16.67, 33.33]" and "target WER 95% low" not in shown


def test_a_joint_run_and_its_seeds_stay_out_of_the_per_domain_cells() -> None:
    from runs import Run

    runs = [
        Run("child/lora", "lora", "main", "-", "l.yaml", "", "", ["child"]),
        Run("all/lora", "lora", "joint", "-", "l.yaml", "", "", ["accent", "child"]),
        Run("all/lora@seed1", "lora", "seed", "1", "l@seed1.yaml", "", "", ["accent", "child"]),
        Run("child/lora@seed1", "lora", "seed", "1", "l@seed1.yaml", "", "", ["child"]),
    ]
    assert {method: [run.name for run in cell] for method, cell in score.cells(runs, "child").items()} == {
        "lora": ["child/lora", "child/lora@seed1"]
    }


def test_paired_differences_average_each_system_over_its_seeds(tmp_path: Path) -> None:
    """full: every child word right at both seeds; lora: one wrong word of six, at one seed of two (WER
    8.3 on average): lora worse than full by 8.3 points, with the seeds of each named."""
    import differences

    wrong = {
        "child/full": [0] * 40,
        "child/full@seed1": [0] * 40,
        "child/lora": [1] * 40,
        "child/lora@seed1": [0] * 40,
    }
    runs = write_cell_exp(tmp_path, wrong)
    rows = differences.difference_rows(tmp_path / "data", tmp_path / "exp", runs, ["child"], ["full"], 1000)
    target = next(r for r in rows if r["test"] == "target")
    assert target["WER difference"] == pytest.approx(100 / 12, abs=0.01) and target["seeds"] == "2 / 2"
    assert target["verdict"] == "lora worse than full"


def test_routing_rows_give_each_split_its_accuracy_over_seeds_and_its_confusion_row(tmp_path: Path) -> None:
    """Two seeds route child_test 80 % and 90 % to child (accuracy 85 [Student-t interval]); the phone
    test (out of distribution) has no own domain, so no accuracy."""
    pytest.importorskip("espnet2")
    import hdmole_routing
    import routing_report
    from runs import Run

    names = ["accent", "child"]
    for run, routed in (("all/hdmole", [1] * 8 + [0] * 2), ("all/hdmole@seed1", [1] * 9 + [0])):
        rows = [
            hdmole_routing.split_row("child", routed, names),
            hdmole_routing.split_row("phone", [0] * 10, names),
        ]
        out = tmp_path / "decode" / run / "routing"
        out.mkdir(parents=True)
        with (out / "routing.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    runs = [
        Run("all/hdmole", "hdmole", "main", "-", "h.yaml", "", "", ["accent", "child", "phone"]),
        Run("all/hdmole@seed1", "hdmole", "seed", "1", "h@seed1.yaml", "", "", ["accent", "child", "phone"]),
    ]
    child, phone = routing_report.routing_rows(tmp_path, runs)
    half = 12.706205 * 5.0  # t_{0.975,1} s / sqrt(2), s = 5 sqrt(2)
    assert child["routing accuracy %"] == f"85.0 [{85 - half:.1f}, 100.0]"  # cut to the range
    assert (child["to accent %"], child["to child %"], child["seeds"]) == (15.0, 85.0, 2)
    assert phone["routing accuracy %"] == "" and phone["to accent %"] == 100.0
