"""Tests of the ESPnet integration import ``espnet_plugins`` from this repository.

This directory shares the package's name; putting the repository root first on ``sys.path``
makes ``import espnet_plugins`` find the real package (a regular package wins over this
directory, which has no ``__init__.py``) whether or not it is installed.
"""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
