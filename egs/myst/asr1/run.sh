#!/usr/bin/env bash
# MyST children's speech (LDC2021S05): OWSM v3.1 adapted with each PEFT method on MyST train,
# validated on development (dev), tested on test. Stages and options: ../../common/owsm/s2t_peft.sh.
# The corpus root: MYST in db.sh, or --corpus_dir. Examples:
#   ./run.sh --corpus_dir /corpora/myst --owsm_dir /models/owsm_v3.1_ebf
#   ./run.sh --model owsm_v3.1_ebf_base --owsm_dir /models/owsm_v3.1_ebf_base --stage 2 --methods "lora ssvd_o"
set -euo pipefail
cd "$(dirname "$0")"
. ./db.sh
exec ../../common/owsm/s2t_peft.sh --corpus_dir "${MYST}" --train_set train --valid_set dev --test_sets test "$@"
