"""Importing ESPnet without network access.

``espnet2.text.phoneme_tokenizer`` imports ``g2p_en``, whose import calls ``nltk.download`` for
two corpora when they are missing: offline that prints errors (or waits for a network timeout)
on every start, although only the ``g2p_en`` tokenizer ever reads them. Importing such a module
here first, with ``nltk.download`` switched off, makes every later import silent; a tokenizer
that really needs the data still fails with NLTK's own LookupError when it is built.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def import_without_downloads(module_name: str) -> None:
    """Import ``module_name`` (if installed) while NLTK downloads are disabled."""
    with _nltk_downloads_disabled():
        try:
            importlib.import_module(module_name)
        except ImportError:
            return


@contextmanager
def _nltk_downloads_disabled() -> Iterator[None]:
    try:
        import nltk
    except ImportError:
        yield
        return
    original = nltk.download

    def skip(info_or_id: object = None, *_args: object, **_kwargs: object) -> bool:
        logger.debug("skipping nltk.download(%r) while importing espnet", info_or_id)
        return False

    nltk.download = skip
    try:
        yield
    finally:
        nltk.download = original
