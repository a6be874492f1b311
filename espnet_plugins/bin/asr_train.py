#!/usr/bin/env python3
from espnet_plugins.tasks.asr import PeftASRTask


def get_parser():
    return PeftASRTask.get_parser()


def main(cmd=None):
    r"""ASR training with adapters: ESPnet's asr_train plus the peft block.

    Example:

        % python -m espnet_plugins.bin.asr_train --config conf/finetune_ssvd_o.yaml \
            --peft_pretrained exp/asr_base/valid.acc.ave.pth ...
    """
    PeftASRTask.main(cmd=cmd)


if __name__ == "__main__":
    main()
