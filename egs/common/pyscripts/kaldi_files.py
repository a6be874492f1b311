"""Kaldi-style two-column files (``utt value`` per line: wav.scp, text, utt2spk, ...), read as ESPnet
reads them (``espnet2.fileio.read_text.read_2columns_text``: the value is the rest of the line, an
empty value allowed) and written sorted by key, as Kaldi's tools expect."""

from __future__ import annotations

from pathlib import Path

from espnet2.fileio.read_text import read_2columns_text


def read_table(path: Path) -> dict[str, str]:
    """{key: value} of a two-column file."""
    return dict(read_2columns_text(path))


def write_table(path: Path, table: dict[str, str]) -> None:
    """``key value`` lines sorted by key (C locale order), a key alone when its value is empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{key} {table[key]}".rstrip() for key in sorted(table))
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
