"""ESPnet integration of ssvd-peft: tasks, training and inference entry points, export.

    python -m espnet_plugins.bin.asr_train --config train.yaml ...   # ESPnet options + peft block
    python -m espnet_plugins.bin.asr_inference ... --peft_merge true
    python -m espnet_plugins.bin.export_merged --asr_train_config ... --asr_model_file ... --output_dir ...

Everything here imports espnet; the core library ``ssvd_peft`` never does. The ``tasks`` and
``bin`` packages import ESPnet's text front-ends without network access (``offline.py``).
"""
