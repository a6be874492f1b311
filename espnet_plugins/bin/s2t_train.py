#!/usr/bin/env python3
from espnet_plugins.tasks.s2t import PeftS2TTask


def get_parser():
    return PeftS2TTask.get_parser()


def main(cmd=None):
    r"""Speech-to-text (OWSM) training with adapters: ESPnet's s2t_train plus the peft block.

    Example:

        % python -m espnet_plugins.bin.s2t_train --config conf/finetune_owsm_ssvd_o.yaml \
            --peft_pretrained owsm_v3.1/exp/s2t_train/valid.total_count.ave.pth ...
    """
    PeftS2TTask.main(cmd=cmd)


if __name__ == "__main__":
    main()
