"""Print values of a YAML file for a shell script (one ``python -c`` fewer per value).

    python -m yaml_get conf/profiles/quick.yaml base_model                 # a value ("" if missing)
    python -m yaml_get conf/asr/ci/adapters.yaml default_methods           # a list: space-separated
    python -m yaml_get conf/profiles/quick.yaml tokens.type tokens.size    # several keys: one line
    python -m yaml_get conf/profiles/quick.yaml splits --without text_only # a list minus another

Keys are dot-separated paths into nested mappings.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml


def lookup(document: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(document, dict) or part not in document:
            return None
        document = document[part]
    return document


def shell_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("keys", nargs="+")
    parser.add_argument("--without", help="a list key whose items are left out of the (single) list key")
    args = parser.parse_args()
    document = yaml.safe_load(args.file.read_text(encoding="utf-8")) or {}
    values = [lookup(document, key) for key in args.keys]
    if args.without:
        excluded = set(lookup(document, args.without) or [])
        values = [[item for item in value if item not in excluded] for value in values]
    print(" ".join(shell_value(value) for value in values))


if __name__ == "__main__":
    main()
