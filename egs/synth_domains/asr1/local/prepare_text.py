"""Stage 1: restricted-vocabulary English sentences from Debian packages, split disjointly.

Pool = WordNet gloss examples (wordnet-base) + fortune sentences (fortunes, fortunes-min). Each sentence
is lower-cased and stripped of punctuation; it is kept when it has min_words..max_words words, all of
them among the vocab_size most frequent words of the pool. With ``fragments`` (full, quick) a sentence
is instead cut at every word outside the vocabulary, and each run of in-vocabulary words becomes
utterances: the whole run when it has min_words..max_words words, a longer run in equal consecutive
parts of at most max_words. Fragments give many more distinct utterances over a small vocabulary, so a
small model hears each word often enough to learn it. The de-duplicated pool is shuffled (seed)
and cut into the splits of the profile plus the babble text: every split's text is disjoint from every
other's (each test set from all training and adaptation text). With closed_vocabulary (quick, full)
every word of every split but the babble occurs in source_train, so a small model can learn the source
task; the ci profile is too small for that and turns it off.

Writes <out>/<split>.txt (one sentence a line), <out>/vocab.txt (the task vocabulary: the words of
source_train) and <out>/stats.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
PICTURE_FORTUNES = {"art", "ascii-art"}
WORD = re.compile(r"[a-z]+('[a-z]+)?")
REJECT = re.compile(r"[0-9@#$%&*=+<>/\\_|~^\[\]{}]")
PUNCTUATION = re.compile(r"[\"(),.;:!?\-]+")


def wordnet_examples() -> Iterator[str]:
    """The quoted usage examples of every synset gloss (data.noun, data.verb, data.adj, data.adv)."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(WORDNET / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if not line.startswith("  "):
                    yield from re.findall(r'"([^"]+)"', line.split("|", 1)[-1])


def fortune_sentences() -> Iterator[str]:
    """Sentences of the text fortune databases (entries split at sentence-final punctuation)."""
    for path in sorted(FORTUNES.iterdir()):
        if path.is_dir() or "." in path.name or path.name in PICTURE_FORTUNES:
            continue
        for entry in path.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
            yield from re.split(r"(?<=[.!?])\s+", " ".join(entry.split()))


def normalise(sentence: str) -> list[str] | None:
    """Lower-case words without punctuation, or None when the sentence has digits, symbols or odd tokens."""
    sentence = sentence.lower().replace("`", "'")
    if REJECT.search(sentence):
        return None
    words = [w.strip("'") for w in PUNCTUATION.sub(" ", sentence).split()]
    if not words or not all(WORD.fullmatch(w) for w in words):
        return None
    return words


def word_runs(words: list[str], allowed: set[str]) -> Iterator[list[str]]:
    """The maximal runs of consecutive words of ``words`` that are all in ``allowed``."""
    run: list[str] = []
    for word in words:
        if word in allowed:
            run.append(word)
        elif run:
            yield run
            run = []
    if run:
        yield run


def fragments(run: list[str], min_words: int, max_words: int) -> list[list[str]]:
    """``run`` as it is, or cut into ceil(len / max_words) equal consecutive parts; parts shorter than
    min_words are dropped."""
    parts = math.ceil(len(run) / max_words)
    size = math.ceil(len(run) / parts)
    return [run[i : i + size] for i in range(0, len(run), size) if len(run[i : i + size]) >= min_words]


def select(
    pool: list[list[str]], vocab_size: int, min_words: int, max_words: int, cut_fragments: bool
) -> tuple[list[str], list[str]]:
    """(vocabulary: the vocab_size most frequent words, sorted utterances made only of those words):
    the pool sentences of min_words..max_words words, or with ``cut_fragments`` their fragments."""
    counts = collections.Counter(w for words in pool for w in words)
    vocab = [w for w, _ in counts.most_common(vocab_size)]
    allowed = set(vocab)
    if cut_fragments:
        kept = {
            " ".join(part)
            for words in pool
            for run in word_runs(words, allowed)
            for part in fragments(run, min_words, max_words)
        }
    else:
        kept = {
            " ".join(words)
            for words in pool
            if min_words <= len(words) <= max_words and allowed.issuperset(words)
        }
    return sorted(vocab), sorted(kept)


def cut(
    sentences: list[str], sizes: dict[str, int], closed_vocabulary: bool, train: str = "source_train"
) -> dict[str, list[str]]:
    """Disjoint splits: the first sizes[train] sentences train; with closed_vocabulary every other split
    but the babble uses only words that occur in the training text; the babble takes the rest, sentences
    with unseen words first (it is noise, never transcribed)."""
    chosen = {train: sentences[: sizes[train]]}
    seen = {w for s in chosen[train] for w in s.split()}
    rest = sentences[sizes[train] :]
    closed = [s for s in rest if seen.issuperset(s.split()) or not closed_vocabulary]
    in_closed = set(closed)
    babble_pool = [s for s in rest if s not in in_closed]
    for split, size in sizes.items():
        if split in (train, "babble"):
            continue
        chosen[split], closed = closed[:size], closed[size:]
        if len(chosen[split]) < size:
            raise SystemExit(
                f"only {len(chosen[split])} sentences left for {split} (wants {size}) whose words all "
                f"occur in {train}: raise vocab_size or lower the split sizes"
            )
    chosen["babble"] = (babble_pool + closed)[: sizes["babble"]]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    profile = yaml.safe_load(args.profile.read_text())

    pool = [w for s in [*wordnet_examples(), *fortune_sentences()] if (w := normalise(s))]
    vocab, sentences = select(
        pool,
        profile["vocab_size"],
        profile["min_words"],
        profile["max_words"],
        profile.get("fragments", False),
    )
    random.Random(profile["seed"]).shuffle(sentences)
    sizes = {**profile["splits"], "babble": profile["babble_sentences"]}
    splits = cut(sentences, sizes, profile["closed_vocabulary"])
    task_vocab = sorted({w for s in splits["source_train"] for w in s.split()})
    stats = {
        "pool_sentences": len(pool),
        "frequent_words": len(vocab),
        "eligible_sentences": len(sentences),
        "fragments": profile.get("fragments", False),
        "closed_vocabulary": profile["closed_vocabulary"],
        "task_vocab_size": len(task_vocab),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for split, chosen in splits.items():
        (args.out / f"{split}.txt").write_text("".join(s + "\n" for s in chosen))
        stats[split] = {"sentences": len(chosen), "words": sum(len(s.split()) for s in chosen)}
    (args.out / "vocab.txt").write_text("".join(w + "\n" for w in task_vocab))
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(
        f"{len(sentences)} {'fragments' if profile.get('fragments') else 'sentences'} use only the "
        f"{len(vocab)} most frequent words; the task vocabulary "
        f"(words of source_train) has {len(task_vocab)} words; wrote {len(splits)} splits to {args.out}"
    )


if __name__ == "__main__":
    main()
