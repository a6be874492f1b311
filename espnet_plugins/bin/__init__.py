"""Entry points: ``python -m espnet_plugins.bin.<task>_<stage>``, drop-in replacements of espnet2.bin's."""

from espnet_plugins.offline import import_without_downloads

import_without_downloads("g2p_en")
