"""Tests of the ESPnet integration import ``espnet_plugins`` from this repository.

This directory shares the package's name; putting the repository root first on ``sys.path``
makes ``import espnet_plugins`` find the real package (a regular package wins over this
directory, which has no ``__init__.py``) whether or not it is installed.

``tone_corpus`` and ``tone_base`` are the tone corpus and its tiny pretrained base model, made once
per session for every end-to-end test that adapts it.
"""

import sys
from pathlib import Path

import pytest
from espnet_runs import pretrain_base
from tiny_corpus import write_data_dir, write_token_list

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PRETRAIN_EPOCHS = 20


@pytest.fixture(scope="session")
def tone_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source domain (train/valid) and a pitch-shifted target domain (adapt/test)."""
    root = tmp_path_factory.mktemp("espnet")
    write_data_dir(root / "data" / "train", 48, shift=1.0, seed=0)
    write_data_dir(root / "data" / "valid", 8, shift=1.0, seed=1)
    write_data_dir(root / "data" / "adapt", 32, shift=1.15, seed=2)
    write_data_dir(root / "data" / "test", 8, shift=1.15, seed=3)
    write_token_list(root / "data" / "tokens.txt")
    return root


@pytest.fixture(scope="session")
def tone_base(tone_corpus: Path) -> Path:
    """The base model file, trained by stock ESPnet on the source domain; config.yaml next to it."""
    return pretrain_base(tone_corpus, PRETRAIN_EPOCHS)
