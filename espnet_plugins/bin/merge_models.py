#!/usr/bin/env python3
"""Merge per-domain ESPnet experiments (full fine-tunes, or adapters of any method) of one
pretrained model into one ordinary ESPnet model directory that stock inference decodes.

    % python -m espnet_plugins.bin.merge_models --base_dir exp/asr_base \\
        --exp_dirs exp/asr_accent exp/asr_child --method boosted_tsv_m --knob beta=0.3 \\
        --search scaling=0.4,0.6,0.8,1.0 \\
        --dev_data dump/raw/dev/wav.scp,speech,sound --dev_data dump/raw/dev/text,text,text \\
        --output_dir exp/asr_merged
    % python -m espnet2.bin.asr_inference --asr_train_config exp/asr_merged/config.yaml \\
        --asr_model_file exp/asr_merged/model.pth ...

With --as_adapter (adapter experiments only) the merge stays an adapter: the output dir is an
adapter experiment of the base that the plugin decodes:

    % python -m espnet_plugins.bin.merge_models --base_dir exp/asr_base \\
        --exp_dirs exp/ssvd_accent exp/ssvd_child --method ties --as_adapter ssvd_core \\
        --output_dir exp/ssvd_merged
    % python -m espnet_plugins.bin.asr_inference --asr_train_config exp/ssvd_merged/config.yaml \\
        --asr_model_file exp/ssvd_merged/model.pth --peft_merge true ...
"""

import argparse
import logging
import sys

from espnet.utils.cli_utils import get_commandline_args

from espnet_plugins.merging import merge_experiments, parse_grid, parse_knobs
from espnet_plugins.tasks.asr import PeftASRTask
from espnet_plugins.tasks.s2t import PeftS2TTask
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.registry import merge_method_names

TASKS = {"asr": PeftASRTask, "s2t": PeftS2TTask}


def get_parser():
    parser = argparse.ArgumentParser(
        description="Merge per-domain ESPnet experiments of one pretrained model into one ESPnet "
        "model (config.yaml + model.pth + merge.yaml) that stock espnet2 inference decodes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=list(TASKS), default="asr")
    parser.add_argument("--base_dir", required=True, help="the pretrained model's experiment dir")
    parser.add_argument(
        "--base_model_file", default=None, help="model file in --base_dir (default: the first found)"
    )
    parser.add_argument("--exp_dirs", nargs="+", required=True, help="the per-domain experiment dirs")
    parser.add_argument(
        "--model_file",
        default=None,
        help="model file in every --exp_dirs (default: the first of valid.acc.ave.pth, "
        "valid.acc.best.pth, valid.loss.ave.pth, valid.loss.best.pth, model.pth)",
    )
    parser.add_argument("--method", required=True, help=f"one of {', '.join(merge_method_names())}")
    parser.add_argument("--knob", action="append", default=[], help="KNOB=VALUE (repeatable)")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one per experiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--search",
        action="append",
        default=[],
        help="KNOB=V1,V2,... (repeatable): pick the knobs on --dev_data over the grid",
    )
    parser.add_argument(
        "--dev_data",
        action="append",
        default=[],
        help="path,name,type of the dev data (repeatable, as ESPnet's data_path_and_name_and_type)",
    )
    parser.add_argument(
        "--as_adapter",
        choices=("lora", "ssvd_core", "auto"),
        default=None,
        help="keep a merge of adapters as an adapter experiment of this form (auto: ssvd_core for "
        "SSVD-family inputs, else lora) instead of folding it into the model",
    )
    parser.add_argument("--rank", type=int, default=None, help="rank of the merged LoRA (--as_adapter lora)")
    parser.add_argument("--output_dir", required=True, help="where config.yaml, model.pth, merge.yaml go")
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
    try:
        output = merge_experiments(
            TASKS[args.task],
            args.base_dir,
            args.exp_dirs,
            args.output_dir,
            args.method,
            knobs=parse_knobs(args.knob),
            weights=args.weights,
            seed=args.seed,
            model_file=args.model_file,
            base_model_file=args.base_model_file,
            search=parse_grid(args.search),
            dev_data=args.dev_data,
            as_adapter=args.as_adapter,
            rank=args.rank,
        )
    except PeftConfigError as error:
        sys.exit(f"merge_models: error: {error}")
    print(output)


if __name__ == "__main__":
    main()
