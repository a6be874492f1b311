#!/usr/bin/env python3
import argparse
import logging
import sys

from espnet.utils.cli_utils import get_commandline_args

from espnet_plugins.export import export_merged
from espnet_plugins.tasks.asr import PeftASRTask
from espnet_plugins.tasks.s2t import PeftS2TTask

TASKS = {"asr": PeftASRTask, "s2t": PeftS2TTask}


def get_parser():
    parser = argparse.ArgumentParser(
        description="Merge an adapter into its base model and write a plain ESPnet model "
        "(config.yaml + model.pth) that stock espnet2 inference loads",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=list(TASKS), default="asr")
    parser.add_argument(
        "--train_config",
        "--asr_train_config",
        "--s2t_train_config",
        required=True,
        help="config.yaml of the adapter training",
    )
    parser.add_argument(
        "--model_file",
        "--asr_model_file",
        "--s2t_model_file",
        required=True,
        help="model file of the adapter training (adapter-only or full)",
    )
    parser.add_argument("--output_dir", required=True, help="where config.yaml and model.pth are written")
    parser.add_argument(
        "--peft_domain",
        type=str,
        default=None,
        help="HDMoLE only: merge the experts of this domain, an id or a name from the training "
        "config's peft_hdmole.domains (the export serves that domain only)",
    )
    parser.add_argument(
        "--log_level", default="INFO", choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
    )
    return parser


def main(cmd=None):
    print(get_commandline_args(), file=sys.stderr)
    args = get_parser().parse_args(cmd)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"
    )
    config_path, model_path = export_merged(
        TASKS[args.task], args.train_config, args.model_file, args.output_dir, args.peft_domain
    )
    print(f"{config_path}\n{model_path}")


if __name__ == "__main__":
    main()
