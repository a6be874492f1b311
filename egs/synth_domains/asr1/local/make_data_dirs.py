"""Stage 3: Kaldi-style data directories, data/<split>/{wav.scp,text,utt2spk,spk2utt,utt2domain,utt2dur}.

Synthetic splits come from the stage-2 plan (speaker = voice). A user's own target domain replaces or
adds to the synthetic ones with --target_data_dirs "name=/path ...": /path holds Kaldi data dirs
adapt/ and test/ (dev/ optional: without it every 10th adaptation utterance becomes dev). Their wav.scp,
text and utt2spk are copied as they are; spk2utt and utt2domain are (re)written. data/target_domains.txt
lists the target domains the later stages adapt to, one a line; data/ood_domains.txt the synthetic
domains that have a test split but no adapt split (out of distribution: tested, never adapted to).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import soundfile as sf
from kaldi_files import read_table, write_table

ROLES = ("adapt", "dev", "test")


def write_data_dir(
    out: Path, wav: dict, text: dict, utt2spk: dict, domain: str, utt2dur: dict | None
) -> None:
    """The five files (and utt2dur when known), keys sorted in C order; speakers must prefix utt ids."""
    missing = set(wav) ^ set(text) | set(wav) ^ set(utt2spk)
    if missing:
        raise SystemExit(
            f"{out}: wav.scp, text and utt2spk disagree on {len(missing)} utts, e.g. {sorted(missing)[:3]}"
        )
    spk2utt = defaultdict(list)
    for utt in sorted(utt2spk):
        spk2utt[utt2spk[utt]].append(utt)
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "wav.scp", wav)
    write_table(out / "text", text)
    write_table(out / "utt2spk", utt2spk)
    write_table(out / "spk2utt", {spk: " ".join(utts) for spk, utts in spk2utt.items()})
    write_table(out / "utt2domain", dict.fromkeys(wav, domain))
    if utt2dur is not None:
        write_table(out / "utt2dur", utt2dur)
    for name in ("utt2dur", "speech_shape"):  # left by an earlier version of this dir: stage 6 remakes it
        path = out / name
        if path.is_file() and read_table(path).keys() != wav.keys():
            path.unlink()
            print(f"{path}: other utterances than the new wav.scp: deleted (stage 6 writes speech_shape)")


def synthetic_split(synth_dir: Path, split: str, out: Path) -> None:
    rows = [json.loads(line) for line in (synth_dir / "plan" / f"{split}.jsonl").read_text().splitlines()]
    wav, text, utt2spk, utt2dur = {}, {}, {}, {}
    for row in rows:
        path = (synth_dir / split / f"{row['utt']}.wav").resolve()
        if not path.exists():
            raise SystemExit(f"{path} is missing: run stage 2 first")
        wav[row["utt"]] = str(path)
        text[row["utt"]] = row["text"]
        utt2spk[row["utt"]] = row["voice"]
        utt2dur[row["utt"]] = f"{sf.info(path).duration:.3f}"
    write_data_dir(out, wav, text, utt2spk, row["domain"], utt2dur)


def user_domain(name: str, source: Path, data_dir: Path) -> None:
    for role in ("adapt", "test"):
        if not (source / role / "wav.scp").exists():
            raise SystemExit(
                f"--target_data_dirs {name}={source}: expected Kaldi data dirs "
                f"{source}/adapt and {source}/test"
            )
    tables = {
        role: {f: read_table(source / role / f) for f in ("wav.scp", "text", "utt2spk")}
        for role in ROLES
        if (source / role / "wav.scp").exists()
    }
    if "dev" not in tables:
        adapt = tables["adapt"]
        held = set(sorted(adapt["wav.scp"])[::10])
        tables["dev"] = {f: {u: v for u, v in t.items() if u in held} for f, t in adapt.items()}
        tables["adapt"] = {f: {u: v for u, v in t.items() if u not in held} for f, t in adapt.items()}
    for role, t in tables.items():
        write_data_dir(data_dir / f"{name}_{role}", t["wav.scp"], t["text"], t["utt2spk"], name, None)


def parse_user_dirs(spec: str) -> dict[str, Path]:
    pairs = {}
    for item in spec.split():
        name, sep, path = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9.]+", name):
            raise SystemExit(
                f"--target_data_dirs expects 'name=/path ...' with a name of letters, digits or dots "
                f"(no '_': split names are <name>_<role>), got {item!r}"
            )
        pairs[name] = Path(path)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth_dir", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--splits", required=True, help="space-separated synthetic splits")
    parser.add_argument("--target_data_dirs", default="", help="'name=/path ...' user target domains")
    args = parser.parse_args()
    user = parse_user_dirs(args.target_data_dirs)
    splits = args.splits.split()
    targets, out_of_distribution = [], []
    for split in splits:
        domain = split.partition("_")[0]
        if domain not in user:
            synthetic_split(args.synth_dir, split, args.data_dir / split)
            kind = targets if f"{domain}_adapt" in splits else out_of_distribution
            if domain != "source" and domain not in kind:
                kind.append(domain)
    for name, source in user.items():
        user_domain(name, source, args.data_dir)
        targets.append(name)
    (args.data_dir / "target_domains.txt").write_text("".join(t + "\n" for t in targets))
    (args.data_dir / "ood_domains.txt").write_text("".join(d + "\n" for d in out_of_distribution))
    print(
        f"data dirs in {args.data_dir}; target domains: {' '.join(targets)}; "
        f"out of distribution: {' '.join(out_of_distribution) or 'none'}"
    )


if __name__ == "__main__":
    main()
