"""The recipes' shared scripts (egs/common/pyscripts) import as their path.sh makes them import."""

import sys
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "egs" / "common" / "pyscripts"
if str(COMMON) not in sys.path:
    sys.path.insert(0, str(COMMON))
