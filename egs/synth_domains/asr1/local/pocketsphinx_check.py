"""Stage 4: an independent recognizer on a sample of each test split, to show the domains really differ.

pocketsphinx (PyPI wheel, its bundled en-us acoustic model, language model and dictionary) decodes
every k-th utterance of data/<split> (n per split, spread over the sorted ids so every voice appears);
a split whose hypothesis file holds exactly those utterances and is newer than their wavs is not
decoded again.
WER = (substitutions + deletions + insertions) / reference words, by the recipes' one scorer
(``scoring.error_rates``, egs/common/pyscripts: the same normalisation on both sides). Writes
<out_dir>/pocketsphinx/<split>.hyp and the table <out_dir>/pocketsphinx_wer.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
from kaldi_files import read_table
from scoring import error_rates

DECODER = None


def decode(path: str) -> str:
    global DECODER
    if DECODER is None:
        from pocketsphinx import Decoder

        DECODER = Decoder(samprate=16000, loglevel="FATAL")
    audio, rate = sf.read(path, dtype="int16")
    if rate != 16000 or audio.ndim != 1:
        raise SystemExit(f"{path}: pocketsphinx needs 16 kHz mono, got {rate} Hz with shape {audio.shape}")
    DECODER.start_utt()
    DECODER.process_raw(np.ascontiguousarray(audio).tobytes(), full_utt=True)
    DECODER.end_utt()
    hyp = DECODER.hyp()
    return hyp.hypstr if hyp else ""


def sample(utts: list[str], n: int) -> list[str]:
    """n utterances evenly spread over the sorted ids (so over the voices), or all when there are fewer."""
    return [utts[i * len(utts) // n] for i in range(n)] if n < len(utts) else utts


def wav_path(entry: str) -> str:
    if entry.endswith("|"):
        raise SystemExit(f"wav.scp pipe entries are not supported by stage 4: {entry}")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--splits", required=True, help="space-separated test splits")
    parser.add_argument("--n", type=int, default=100, help="utterances decoded per split")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--nj", type=int, default=os.cpu_count())
    args = parser.parse_args()
    (args.out_dir / "pocketsphinx").mkdir(parents=True, exist_ok=True)
    lines = ["| split | domain | utts | words | WER % |", "| --- | --- | ---: | ---: | ---: |"]
    per_voice_lines = ["| split | voice | utts | WER % |", "| --- | --- | ---: | ---: |"]
    with multiprocessing.get_context("fork").Pool(args.nj) as pool:
        for split in args.splits.split():
            data = args.data_dir / split
            text, wav, utt2spk = (read_table(data / f) for f in ("text", "wav.scp", "utt2spk"))
            domain = read_table(data / "utt2domain")
            utts = sample(sorted(text), args.n)
            hyp_file = args.out_dir / "pocketsphinx" / f"{split}.hyp"
            paths = [wav_path(wav[u]) for u in utts]
            fresh = hyp_file.exists() and hyp_file.stat().st_mtime > max(map(os.path.getmtime, paths))
            cached = read_table(hyp_file) if fresh else {}
            if sorted(cached) == utts:
                hyps = [cached[u] for u in utts]
            else:
                hyps = pool.map(decode, paths)
                hyp_file.write_text("".join(f"{u} {h}\n" for u, h in zip(utts, hyps, strict=True)))
            hyp_table = dict(zip(utts, hyps, strict=True))
            wer, _ = error_rates(text, hyp_table, utts)
            lines.append(f"| {split} | {domain[utts[0]]} | {len(utts)} | {wer.length} | {wer.percent:.1f} |")
            by_voice = defaultdict(list)
            for u in utts:
                by_voice[utt2spk[u]].append(u)
            for voice, voice_utts in sorted(by_voice.items()):
                voice_wer, _ = error_rates(text, hyp_table, voice_utts)
                per_voice_lines.append(f"| {split} | {voice} | {len(voice_utts)} | {voice_wer.percent:.1f} |")
            print(lines[-1], flush=True)
    report = [
        "# pocketsphinx WER per domain (independent recognizer, bundled en-us model)",
        "",
        *lines,
        "",
        "## per voice",
        "",
        *per_voice_lines,
        "",
    ]
    (args.out_dir / "pocketsphinx_wer.md").write_text("\n".join(report))
    print(f"wrote {args.out_dir / 'pocketsphinx_wer.md'}")


if __name__ == "__main__":
    main()
