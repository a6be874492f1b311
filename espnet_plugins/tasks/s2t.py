"""ESPnet's speech-to-text (OWSM) task with adapters: every ``S2TTask`` option plus the peft block."""

from espnet2.tasks.s2t import S2TTask

from espnet_plugins.task import PeftTaskMixin


class PeftS2TTask(PeftTaskMixin, S2TTask):
    """``S2TTask`` whose model is a frozen pretrained base (e.g. OWSM) with trainable adapters."""
