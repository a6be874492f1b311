"""Scoring of egs/synth_domains/asr1 (local/score.py): error rates summed over a test split."""

from __future__ import annotations

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
