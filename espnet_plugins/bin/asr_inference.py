#!/usr/bin/env python3
import sys

import espnet2.bin.asr_inference as stock
from espnet.utils.cli_utils import get_commandline_args

from espnet_plugins.inference import add_merge_argument, run_with_task
from espnet_plugins.tasks.asr import PeftASRTask


def get_parser():
    parser = stock.get_parser()
    add_merge_argument(parser)
    return parser


def main(cmd=None):
    r"""ASR decoding with a base model + adapter: espnet2.bin.asr_inference plus --peft_merge.

    Example:

        % python -m espnet_plugins.bin.asr_inference --asr_train_config exp/ft/config.yaml \
            --asr_model_file exp/ft/valid.acc.best.pth --data_path_and_name_and_type \
            dump/test/wav.scp,speech,sound --output_dir exp/ft/decode --peft_merge true
    """
    print(get_commandline_args(), file=sys.stderr)
    kwargs = vars(get_parser().parse_args(cmd))
    kwargs.pop("config", None)
    merge = kwargs.pop("peft_merge")
    run_with_task(stock, "ASRTask", PeftASRTask, kwargs, merge)


if __name__ == "__main__":
    main()
