#!/usr/bin/env bash
# Offline multi-domain benchmark: learning vs forgetting per PEFT method on synthetic speech domains.
#   stage 1  prepare text       restricted-vocabulary sentences, disjoint per split  -> ${data}/local/text
#   stage 2  synthesize         TTS, voice transforms, noise; both cores; resumable  -> ${synth}/<split>/*.wav
#   stage 3  data dirs          Kaldi-style ${data}/<split>/{wav.scp,text,utt2spk,spk2utt,utt2domain,utt2dur}
#   stage 4  recognizer check   pocketsphinx WER per domain on each test split        -> ${exp}/pocketsphinx_wer.md
# Later stages (tokens, stats, pretrain, fine-tune, decode, score) append below. They read
# ${data}/source_{train,dev,test} and, for each domain d in ${data}/target_domains.txt (synthetic and
# user-given), ${data}/${d}_{adapt,dev,test}.
# Usage: ./run.sh [--stage N] [--stop_stage M] [--profile ci|quick|full] [--nj J]
#                 [--target_data_dirs "accent=/path child=/path"]   (each path holds adapt/ and test/, dev/ optional)
#                 [--data D] [--synth S] [--exp E] [--python P]      (relative paths are relative to this directory)
set -euo pipefail

stage=1
stop_stage=100
profile=quick
nj=$(nproc)
target_data_dirs=""
data=""    # default data/${profile}
synth=""   # default synth/${profile}
exp=""     # default exp/${profile}
python=""  # default: the project's .venv (path.sh)

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }

while [ $# -gt 0 ]; do
    name=${1#--}
    if [ "${name}" = "$1" ] || [ $# -lt 2 ] || ! declare -p "${name}" >/dev/null 2>&1; then
        echo "usage: $0 [--stage N] [--stop_stage M] [--profile ci|quick|full] [--nj J] [--target_data_dirs 'name=/path ...'] [--data D] [--synth S] [--exp E] [--python P]" >&2
        exit 1
    fi
    printf -v "${name}" '%s' "$2"
    shift 2
done

cd "$(dirname "$0")"
. ./path.sh
profile_conf=conf/profiles/${profile}.yaml
[ -f "${profile_conf}" ] || { echo "no profile ${profile_conf}" >&2; exit 1; }
data=${data:-data/${profile}}
synth=${synth:-synth/${profile}}
exp=${exp:-exp/${profile}}
splits=$(${python} -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["splits"]))' "${profile_conf}")
source_splits=$(printf '%s\n' ${splits} | grep '^source_' | tr '\n' ' ')
user_domains=$(printf '%s\n' ${target_data_dirs} | cut -d= -f1 | tr '\n' ' ')

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
    log "Stage 1: text for profile ${profile}"
    ${python} local/prepare_text.py --profile "${profile_conf}" --out "${data}/local/text"
fi

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
    log "Stage 2: synthesize speech into ${synth} with ${nj} jobs"
    ${python} local/synthesize.py --profile "${profile_conf}" --domains conf/domains.yaml \
        --text_dir "${data}/local/text" --synth_dir "${synth}" --nj "${nj}" --skip_domains "${user_domains}"
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
    log "Stage 3: Kaldi-style data dirs in ${data}"
    ${python} local/make_data_dirs.py --synth_dir "${synth}" --data_dir "${data}" --splits "${splits}" \
        --target_data_dirs "${target_data_dirs}"
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
    log "Stage 4: pocketsphinx WER per domain"
    n=$(${python} -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["pocketsphinx_utts"])' "${profile_conf}")
    eval_splits="$(printf '%s\n' ${source_splits} | grep '_test$' || true) $(sed 's/$/_test/' "${data}/target_domains.txt" | tr '\n' ' ')"
    ${python} local/pocketsphinx_check.py --data_dir "${data}" --splits "${eval_splits}" --n "${n}" \
        --out_dir "${exp}" --nj "${nj}"
fi

log "Successfully finished stages ${stage}-${stop_stage}"
