#!/usr/bin/env bash
# L2-ARCTIC non-native English: OWSM v3.1 adapted with each PEFT method on 12 speakers (2 per first
# language), validated on 6 others and tested on 6 more (1 per L1). Stages and options:
# ../../common/owsm/s2t_peft.sh. HDMoLE routes among the six first languages (utt2domain).
# The corpus root: L2ARCTIC in db.sh, or --corpus_dir. Examples:
#   ./run.sh --corpus_dir /corpora/l2arctic_release_v5.0 --owsm_dir /models/owsm_v3.1_ebf
#   ./run.sh --model owsm_v3.1_ebf_base --owsm_dir /models/owsm_v3.1_ebf_base --stage 2 --methods "lora ssvd_o"
set -euo pipefail
cd "$(dirname "$0")"
. ./db.sh
exec ../../common/owsm/s2t_peft.sh --corpus_dir "${L2ARCTIC}" --train_set adapt --valid_set dev --test_sets test --local_data_opts "--nj 4" \
    --methods "full lora dora pissa ssvd ssvd_o hdmole" "$@"
