"""ESPnet tasks with the peft block: ``PeftASRTask``, ``PeftS2TTask``."""

from espnet_plugins.offline import import_without_downloads

import_without_downloads("g2p_en")
