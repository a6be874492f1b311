"""ESPnet's ASR task with adapters: every ``ASRTask`` option plus the peft block."""

from espnet2.tasks.asr import ASRTask

from espnet_plugins.task import PeftTaskMixin


class PeftASRTask(PeftTaskMixin, ASRTask):
    """``ASRTask`` whose model is a frozen pretrained base with trainable adapters."""
