#!/usr/bin/env python3
import sys

import espnet2.bin.s2t_inference as stock
from espnet.utils.cli_utils import get_commandline_args

from espnet_plugins.inference import add_merge_argument, run_with_task
from espnet_plugins.tasks.s2t import PeftS2TTask


def get_parser():
    parser = stock.get_parser()
    add_merge_argument(parser)
    return parser


def main(cmd=None):
    r"""Speech-to-text decoding with a base model + adapter: espnet2.bin.s2t_inference plus --peft_merge."""
    print(get_commandline_args(), file=sys.stderr)
    kwargs = vars(get_parser().parse_args(cmd))
    kwargs.pop("config", None)
    merge = kwargs.pop("peft_merge")
    run_with_task(stock, "S2TTask", PeftS2TTask, kwargs, merge)


if __name__ == "__main__":
    main()
