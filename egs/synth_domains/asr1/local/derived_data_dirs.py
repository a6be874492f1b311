"""Stage 8 data: data dirs made from others, for the runs that need them.

    combine OUT SRC...   every utterance of the SRC dirs (HDMoLE trains once on all target domains;
                         each utterance keeps its utt2domain)
    subset OUT SRC N     the first N utterances of SRC taken round-robin over its speakers in sorted
                         order (few-shot adaptation sets; nested: a smaller N is a subset of a larger)

Each per-utterance file present in every source (wav.scp, text, utt2spk, utt2domain, utt2dur,
speech_shape) is written with the chosen utterances, keys sorted; spk2utt is rebuilt.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from kaldi_files import read_table

UTTERANCE_FILES = ("wav.scp", "text", "utt2spk", "utt2domain", "utt2dur", "speech_shape")


def read_dir(path: Path) -> dict[str, dict[str, str]]:
    if not (path / "wav.scp").is_file():
        raise SystemExit(f"{path} is not a data dir (no wav.scp): run stages 1-6 first")
    tables = {name: read_table(path / name) for name in UTTERANCE_FILES if (path / name).is_file()}
    for name, table in tables.items():
        missing = tables["wav.scp"].keys() - table.keys()
        if missing:
            raise SystemExit(
                f"{path / name} lacks {len(missing)} utterances of {path / 'wav.scp'} (e.g. {min(missing)}): "
                "it is older than the data dir; run stage 6 (speech_shape) or stages 3-6 again"
            )
    return tables


def write_dir(out: Path, tables: dict[str, dict[str, str]], utts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(utts)
    for name, table in tables.items():
        (out / name).write_text("".join(f"{utt} {table[utt]}\n" for utt in keys), encoding="utf-8")
    spk2utt: dict[str, list[str]] = defaultdict(list)
    for utt in keys:
        spk2utt[tables["utt2spk"][utt]].append(utt)
    (out / "spk2utt").write_text("".join(f"{spk} {' '.join(u)}\n" for spk, u in sorted(spk2utt.items())))


def combine(out: Path, sources: list[Path]) -> int:
    dirs = [read_dir(source) for source in sources]
    names = [name for name in UTTERANCE_FILES if all(name in d for d in dirs)]
    tables = {name: {utt: v for d in dirs for utt, v in d[name].items()} for name in names}
    if len(tables["wav.scp"]) != sum(len(d["wav.scp"]) for d in dirs):
        raise SystemExit(f"{' '.join(map(str, sources))}: the same utterance id in more than one dir")
    write_dir(out, tables, list(tables["wav.scp"]))
    return len(tables["wav.scp"])


def round_robin(utt2spk: dict[str, str], size: int) -> list[str]:
    """The first ``size`` utterances taking one of each speaker in turn (speakers and utts sorted)."""
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for utt in sorted(utt2spk):
        by_speaker[utt2spk[utt]].append(utt)
    queues = [by_speaker[speaker] for speaker in sorted(by_speaker)]
    chosen: list[str] = []
    depth = 0
    while len(chosen) < size:
        chosen += [queue[depth] for queue in queues if depth < len(queue)][: size - len(chosen)]
        depth += 1
    return chosen


def subset(out: Path, source: Path, size: int) -> int:
    tables = read_dir(source)
    if not 0 < size <= len(tables["wav.scp"]):
        raise SystemExit(f"{source} has {len(tables['wav.scp'])} utterances: cannot take {size}")
    write_dir(out, tables, round_robin(tables["utt2spk"], size))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    combine_parser = commands.add_parser("combine")
    combine_parser.add_argument("out", type=Path)
    combine_parser.add_argument("sources", type=Path, nargs="+")
    subset_parser = commands.add_parser("subset")
    subset_parser.add_argument("out", type=Path)
    subset_parser.add_argument("source", type=Path)
    subset_parser.add_argument("size", type=int)
    args = parser.parse_args()
    if args.command == "combine":
        count = combine(args.out, args.sources)
    else:
        count = subset(args.out, args.source, args.size)
    print(f"{args.out}: {count} utterances", file=sys.stderr)


if __name__ == "__main__":
    main()
