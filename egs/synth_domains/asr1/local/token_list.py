"""Stage 5: ESPnet's token list (and, for subwords, the sentencepiece model) from a Kaldi ``text`` file.

- ``char``: ``<blank>``, ``<unk>``, the characters by decreasing count (ties by character; a space is
  ``<space>``, as ESPnet's char tokenizer writes it), ``<sos/eos>``.
- ``bpe``: a sentencepiece unigram model of ``--bpe_size`` pieces trained on the transcripts (full
  character coverage), written as ``<out dir>/bpe.model``; the list is ``<blank>``, ``<unk>``, the
  pieces in model order (its own ``<unk>``, ``<s>``, ``</s>`` left out), ``<sos/eos>``: ESPnet's
  ``--token_type bpe --bpemodel <out dir>/bpe.model``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

SPACE = "<space>"
BLANK, UNK, SOS_EOS = "<blank>", "<unk>", "<sos/eos>"


def transcripts(text_file: Path) -> list[str]:
    """The transcripts of a Kaldi text file (the utterance id dropped)."""
    lines = text_file.read_text(encoding="utf-8").splitlines()
    return [line.partition(" ")[2].strip() for line in lines]


def character_token_list(texts: list[str]) -> list[str]:
    counts = Counter(SPACE if char == " " else char for text in texts for char in text)
    ranked = sorted(counts, key=lambda char: (-counts[char], char))
    return [BLANK, UNK, *ranked, SOS_EOS]


def bpe_token_list(texts: list[str], size: int, model_file: Path) -> list[str]:
    """Train a unigram sentencepiece model of ``size`` pieces into ``model_file``; its token list."""
    import sentencepiece as spm

    model_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as corpus:
        corpus.write("".join(text + "\n" for text in texts))
        corpus.flush()
        try:
            spm.SentencePieceTrainer.train(
                input=corpus.name,
                model_prefix=str(model_file.with_suffix("")),
                vocab_size=size,
                model_type="unigram",
                character_coverage=1.0,
                input_sentence_size=100_000_000,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise SystemExit(f"sentencepiece cannot make {size} pieces: {error}; lower bpe_size") from error
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    specials = {processor.unk_id(), processor.bos_id(), processor.eos_id()}
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size()) if i not in specials]
    return [BLANK, UNK, *pieces, SOS_EOS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="Kaldi text file (utt transcript)")
    parser.add_argument("--out", type=Path, required=True, help="token list, one token a line")
    parser.add_argument("--token_type", choices=("char", "bpe"), default="char")
    parser.add_argument("--bpe_size", type=int, default=300, help="pieces of the bpe model")
    args = parser.parse_args()
    texts = transcripts(args.text)
    if args.token_type == "char":
        tokens = character_token_list(texts)
    else:
        tokens = bpe_token_list(texts, args.bpe_size, args.out.parent / "bpe.model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    print(f"{len(tokens)} {args.token_type} tokens -> {args.out}")


if __name__ == "__main__":
    main()
