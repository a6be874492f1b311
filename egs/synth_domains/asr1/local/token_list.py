"""Stage 5: ESPnet's character token list from a Kaldi ``text`` file.

Order: ``<blank>``, ``<unk>``, the characters by decreasing count (ties by character; a space is
``<space>``, as ESPnet's char tokenizer writes it), ``<sos/eos>``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

SPACE = "<space>"


def character_counts(text_file: Path) -> Counter[str]:
    """Counts of every character of the transcripts (the utterance id dropped)."""
    counts: Counter[str] = Counter()
    for line in text_file.read_text(encoding="utf-8").splitlines():
        _, _, transcript = line.partition(" ")
        counts.update(SPACE if char == " " else char for char in transcript.strip())
    return counts


def token_list(counts: Counter[str]) -> list[str]:
    ranked = sorted(counts, key=lambda char: (-counts[char], char))
    return ["<blank>", "<unk>", *ranked, "<sos/eos>"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text", type=Path, required=True, help="Kaldi text file (utt transcript)")
    parser.add_argument("--out", type=Path, required=True, help="token list, one token a line")
    args = parser.parse_args()
    tokens = token_list(character_counts(args.text))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    print(f"{len(tokens)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
