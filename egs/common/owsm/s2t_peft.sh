#!/usr/bin/env bash
# Fine-tuning of a pretrained OWSM model on one corpus, one run per method: full fine-tuning and each
# PEFT method, every PEFT method at one budget of trainable parameters.
# Shared by the recipes egs/myst/asr1 and egs/l2arctic/asr1: each one's run.sh runs it from the
# recipe's directory (its path.sh, local/data_prep.py and conf/tuning/) and names its data sets.
# The peft blocks (conf/peft/<method>.yaml) and decoding options are this folder's, unless given.
#   stage 1  data prep   the corpus -> ${data}/<set>/ (Kaldi-style, OWSM text prefix)    local/data_prep.py
#   stage 2  OWSM model  its config with absolute paths, token list, model link -> ${exp}/owsm/
#   stage 3  fine-tune   each method on ${train_set}, ${valid_set} validates          -> ${exp}/<method>/
#                        (PEFT blocks at --budget: ${exp}/peft/<method>.yaml, ${exp}/peft/budget.csv;
#                        full: stock espnet2.bin.s2t_train --init_param, options + --full_conf)
#   stage 4  decode      the base model (zero-shot) and each method on ${test_sets} (and --source_test)
#                        -> ${exp}/decode/<base|method>/<set>/text
#   stage 5  score       WER per model and test set (per domain, grade or speaker: --score_breakdowns;
#                        forgetting on source; also after ESPnet's whisper_en cleaner, and by sclite as
#                        ESPnet scores, decode/<name>/<set>/score_wer/) -> ${exp}/results.{md,csv}
# --sweeps "budget split allocation" adds the SSVD-O paper's sweeps (--sweeps_conf, default
# egs/common/owsm/conf/sweeps.yaml): stage 3 writes each point as one more run, ${exp}/peft/<run>.yaml
# and a budget.csv row (lora@x4, ssvd_o@outer0.5, lora@encoder, ...), and stages 3-5 train, decode and
# score those runs like the PEFT methods.
# Options shared with ESPnet's egs2/TEMPLATE/s2t1/s2t.sh carry its names (train_set, valid_set,
# test_sets, local_data_opts, ngpu, num_nodes, s2t_args, inference_config, inference_args,
# inference_nj, gpu_inference, inference_s2t_model); the trainer is the plugin's
# espnet_plugins.bin.s2t_train in place of espnet2.bin.s2t_train (full fine-tuning: the stock one).
# Jobs run as s2t.sh runs them: training through ESPnet's launcher (espnet2.bin.launch) with the
# recipe's cmd.sh's ${cuda_cmd}, decoding as a JOB=1:N array of ${decode_cmd} (cmd.sh: local, slurm, sge).
# Nothing is downloaded: --owsm_dir is a local copy of the pretrained model (e.g. espnet/owsm_v3.1_ebf).
set -euo pipefail

stage=1
stop_stage=5
corpus_dir=""        # stage 1: the corpus root (the recipe's run.sh passes the one db.sh names)
owsm_dir=""          # stage 2: the downloaded OWSM model directory
model=owsm_v3.1_ebf  # training options conf/tuning/${model}.yaml: owsm_v3.1_ebf, _small or _base
methods="full lora dora pissa ssvd ssvd_o"   # full, and ${peft_conf_dir}/<method>.yaml each (hdmole:
                                             # the training set's utt2domain names its domains)
peft_conf_dir=""     # default: egs/common/owsm/conf/peft
budget=ssvd_o        # one budget for every PEFT method (owsm/equal_budget.py): what this method's block
                     # trains as written, a number of trainable parameters, or none (blocks as written)
full_conf=""         # full fine-tuning's own options; default: egs/common/owsm/conf/full.yaml
sweeps=""            # sweeps of ${sweeps_conf} run on top of --methods: any of budget, split, allocation
sweeps_conf=""       # default: egs/common/owsm/conf/sweeps.yaml
inference_config=""  # default: egs/common/owsm/conf/decode.yaml
ngpu=1               # GPUs per node of a fine-tuning run (ESPnet's DDP when > 1), or per process with --train_launcher
num_nodes=1          # nodes of a fine-tuning run (espnet2.bin.launch; cmd.sh's slurm or sge back-end when > 1)
train_launcher=""    # a launcher put before the trainer, one process per GPU (ESPnet's DDP reads RANK,
                     # WORLD_SIZE and LOCAL_RANK), e.g. "torchrun --nproc_per_node 4 --no-python"; on
                     # several nodes, --num_nodes with cmd_backend=slurm instead
gpu_inference=true   # decoding on one GPU per job (false: on the CPU)
inference_s2t_model=valid.acc.ave.pth  # the model file of each run that stage 4 decodes
inference_nj=1       # decoding jobs per model and test set, run at once
source_test=""       # optional Kaldi-style dir (wav.scp, text or text.ctc) of the base model's own domain
score_cleaners=whisper_en  # stage 5: ESPnet text cleaners scored beside the plain WER (none: the plain one only)
score_breakdowns="domain grade"  # stage 5: a WER per value of each utt2<label> a test set holds (spk: speakers)
score_sclite=auto    # stage 5: also NIST's sclite as ESPnet scores (auto: when installed; true; false)
train_set=""
valid_set=""
test_sets=""
local_data_opts=""   # extra options of local/data_prep.py
s2t_args=""          # extra options of espnet_plugins.bin.s2t_train, e.g. "--max_epoch 5"
inference_args=""    # extra options of the s2t_inference programs
data=data
exp=""               # default exp/${model}
python=""            # default: the project's .venv (path.sh)

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
help_message='usage: ./run.sh --corpus_dir DIR --owsm_dir DIR [--model owsm_v3.1_ebf|owsm_v3.1_ebf_small|owsm_v3.1_ebf_base] [--stage N] [--stop_stage M]
          [--methods "full lora dora pissa ssvd ssvd_o"] [--budget METHOD|N|none] [--full_conf FILE]
          [--sweeps "budget split allocation"] [--sweeps_conf FILE]
          [--ngpu N] [--num_nodes N] [--train_launcher "torchrun --nproc_per_node N --no-python"] [--gpu_inference true|false] [--inference_nj N]
          [--source_test DIR] [--score_cleaners whisper_en|none] [--score_breakdowns "domain grade spk"|none] [--score_sclite auto|true|false] [--s2t_args "..."] [--inference_args "..."] [--local_data_opts "..."]
          [--peft_conf_dir DIR] [--inference_config FILE] [--inference_s2t_model FILE] [--data D] [--exp E] [--python P]'

. ./path.sh
. ./cmd.sh
. "${COMMON_ROOT}/parse_options.sh"
peft_conf_dir=${peft_conf_dir:-${COMMON_ROOT}/owsm/conf/peft}
inference_config=${inference_config:-${COMMON_ROOT}/owsm/conf/decode.yaml}
case "${gpu_inference}" in
    true) inference_ngpu=1 ;;
    false) inference_ngpu=0 ;;
    *) die "--gpu_inference is true or false, not ${gpu_inference}" ;;
esac
full_conf=${full_conf:-${COMMON_ROOT}/owsm/conf/full.yaml}
sweeps_conf=${sweeps_conf:-${COMMON_ROOT}/owsm/conf/sweeps.yaml}
exp=${exp:-exp/${model}}
owsm=${exp}/owsm
[ -n "${train_set}" ] && [ -n "${valid_set}" ] && [ -n "${test_sets}" ] \
    || die "--train_set, --valid_set and --test_sets are set by the recipe's run.sh"
[ -f "conf/tuning/${model}.yaml" ] || die "no training options conf/tuning/${model}.yaml for --model ${model}"
peft_methods=""
for method in ${methods}; do
    [ "${method}" = full ] && continue
    [ -f "${peft_conf_dir}/${method}.yaml" ] || die "no peft block ${peft_conf_dir}/${method}.yaml for method ${method}"
    peft_methods+="${method} "
done
[ -f "${full_conf}" ] || die "no full fine-tuning options ${full_conf} (--full_conf)"
if [ -n "${sweeps}" ]; then
    [ -f "${sweeps_conf}" ] || die "no sweeps file ${sweeps_conf} (--sweeps_conf)"
    [ -n "${peft_methods}" ] || die "--sweeps ${sweeps} varies PEFT methods of --methods; --methods has none"
fi

# s2t_data_args PREFIX DATA_DIR: ESPnet's S2T inputs (speech, target, prompt, CTC target) and shape file.
s2t_data_args() {
    echo "--$1_data_path_and_name_and_type $2/wav.scp,speech,sound" \
        "--$1_data_path_and_name_and_type $2/text,text,text" \
        "--$1_data_path_and_name_and_type $2/text.prev,text_prev,text" \
        "--$1_data_path_and_name_and_type $2/text.ctc,text_ctc,text" \
        "--$1_shape_file $2/speech_shape"
}

# exact_merge CONFIG: whether the peft method of a training config folds into the weights exactly.
exact_merge() {
    ${python} -c 'import sys, yaml; from ssvd_peft.registry import get_method
sys.exit(0 if get_method(yaml.safe_load(open(sys.argv[1]))["peft"]).exact_merge else 1)' "$1"
}

# sweep_methods: the run names of the sweeps --sweeps names, from ${exp}/peft/budget.csv (stage 3);
# use it as runs=$(sweep_methods), so that its error stops the script.
sweep_methods() {
    [ -n "${sweeps}" ] || return 0
    [ -f "${exp}/peft/budget.csv" ] || die "no ${exp}/peft/budget.csv: run stage 3 with --sweeps \"${sweeps}\""
    ${python} -c 'import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], encoding="utf-8")))
for sweep in sys.argv[2].split():
    runs = [row["method"] for row in rows if row.get("sweep") == sweep]
    if not runs:
        sys.exit(f"{sys.argv[3]}: error: no run of sweep {sweep} in {sys.argv[1]}: run stage 3 with --sweeps {sweep}")
    print(*runs)' "${exp}/peft/budget.csv" "${sweeps}" "$(basename "$0")"
}

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
    [ -n "${corpus_dir}" ] || die "stage 1 needs the corpus root: set it in the recipe's db.sh or pass --corpus_dir (see README.md)"
    log "Stage 1: data dirs of ${corpus_dir} -> ${data}"
    ${python} local/data_prep.py --corpus_dir "${corpus_dir}" --data_dir "${data}" ${local_data_opts}
fi

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
    [ -n "${owsm_dir}" ] || die "stage 2 needs --owsm_dir (the downloaded OWSM model directory)"
    log "Stage 2: OWSM model ${owsm_dir} -> ${owsm}"
    ${python} -m owsm.model --owsm_dir "${owsm_dir}" --out_dir "${owsm}"
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 3 ]; then
    [ -e "${owsm}/model.pth" ] || die "no ${owsm}/model.pth: run stage 2 with --owsm_dir first"
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
    if [ -n "${train_launcher}" ]; then
        [ "${ngpu}" -le 1 ] || die "--train_launcher starts one process per GPU: give --ngpu 1 (or 0 on CPU), not ${ngpu}"
        [ "${num_nodes}" -eq 1 ] || die "--train_launcher and --num_nodes ${num_nodes}: the launcher places the processes; give one of them"
    fi
    if [ -n "${peft_methods}" ]; then
        log "Stage 3: PEFT blocks at budget ${budget} -> ${exp}/peft/budget.csv"
        ${python} -m owsm.equal_budget --config "${owsm}/config.yaml" --peft_conf_dir "${peft_conf_dir}" \
            --methods "${peft_methods}" --budget "${budget}" --out_dir "${exp}/peft" \
            --utt2domain "${data}/${train_set}/utt2domain" --sweeps "${sweeps}" --sweeps_conf "${sweeps_conf}"
    fi
    sweep_runs=$(sweep_methods)
    for method in ${methods} ${sweep_runs}; do
        dir=${exp}/${method}
        if [ -e "${dir}/valid.acc.ave.pth" ]; then
            log "Stage 3: ${method} done (${dir}/valid.acc.ave.pth), skipped"
            continue
        fi
        log "Stage 3: fine-tune ${method} on ${data}/${train_set} -> ${dir} (log ${dir}/train.log)"
        if [ "${method}" = full ]; then
            ${python} -m owsm.finetune_config --tuning "conf/tuning/${model}.yaml" \
                --full_from "${owsm}/config.yaml" --full_conf "${full_conf}" --out "${exp}/conf/full.yaml"
            trainer="espnet2.bin.s2t_train --init_param ${owsm}/model.pth"
        else
            ${python} -m owsm.finetune_config --tuning "conf/tuning/${model}.yaml" \
                --peft "${exp}/peft/${method}.yaml" --out "${exp}/conf/${method}.yaml"
            trainer="espnet_plugins.bin.s2t_train --peft_pretrained ${owsm}/model.pth"
        fi
        labels=""  # a method that routes among domains (HDMoLE) learns them from utt2domain
        if [ "${method}" != full ] && [ -n "$(${python} -m yaml_get "${exp}/peft/${method}.yaml" peft_conf.domains)" ]; then
            labels="--train_data_path_and_name_and_type ${data}/${train_set}/utt2domain,domain,text"
            labels+=" --valid_data_path_and_name_and_type ${data}/${valid_set}/utt2domain,domain,text"
        fi
        train_args="--config ${exp}/conf/${method}.yaml --output_dir ${dir} --resume true"
        train_args+=" $(s2t_data_args train "${data}/${train_set}") $(s2t_data_args valid "${data}/${valid_set}")"
        train_args+=" ${labels} ${s2t_args}"
        mkdir -p "${dir}"
        if [ -n "${train_launcher}" ]; then
            ${cuda_cmd} --gpu "${ngpu}" "${dir}/train.log" ${train_launcher} ${python} -m ${trainer} \
                ${train_args} --ngpu "${ngpu}" --multiprocessing_distributed false \
                || { tail -n 30 "${dir}/train.log" >&2; die "training ${method} failed, see ${dir}/train.log"; }
        else
            # as s2t.sh: ESPnet's launcher, one process per node, ESPnet's own DDP over the node's GPUs
            ${python} -m espnet2.bin.launch --cmd "${cuda_cmd} --name s2t_${method}" --log "${dir}/train.log" \
                --ngpu "${ngpu}" --num_nodes "${num_nodes}" --init_file_prefix "${dir}/.dist_init_" \
                --multiprocessing_distributed true -- ${python} -m ${trainer} ${train_args} \
                > "${dir}/launch.log" 2>&1 \
                || { tail -n 30 "${dir}/train.log" >&2; die "training ${method} failed, see ${dir}/train.log"; }
        fi
    done
fi

set_names=${test_sets}
declare -A test_dirs=()
for set in ${test_sets}; do test_dirs[${set}]=${data}/${set}; done
if [ -n "${source_test}" ]; then
    set_names+=" source"
    test_dirs[source]=${source_test}
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
    # decode NAME MODULE CONFIG MODEL [OPTIONS]: every test set, ${inference_nj} jobs each (a JOB array of
    # ${decode_cmd}, logs in logdir/) -> decode/NAME/<set>/text
    decode() {
        local name=$1 module=$2 config=$3 model_file=$4 extra=${5:-} set out nj
        for set in ${set_names}; do
            out=${exp}/decode/${name}/${set}
            if [ -f "${out}/text" ] && [ "${out}/text" -nt "${model_file}" ]; then
                log "Stage 4: ${name} on ${set} decoded, skipped"
                continue
            fi
            [ -f "${test_dirs[${set}]}/wav.scp" ] || die "no ${test_dirs[${set}]}/wav.scp to decode"
            log "Stage 4: decode ${set} with ${name} -> ${out}/text"
            rm -rf "${out}"
            mkdir -p "${out}/logdir"
            nj=$(wc -l < "${test_dirs[${set}]}/wav.scp")
            [ "${nj}" -le "${inference_nj}" ] || nj=${inference_nj}
            awk -v nj="${nj}" -v dir="${out}/logdir" '{ print $1 > (dir "/keys." ((NR - 1) % nj + 1) ".scp") }' \
                "${test_dirs[${set}]}/wav.scp"
            ${decode_cmd} --gpu "${inference_ngpu}" JOB=1:"${nj}" "${out}/logdir/s2t_inference.JOB.log" \
                ${python} -m "${module}" --config "${inference_config}" \
                --s2t_train_config "${config}" --s2t_model_file "${model_file}" \
                --data_path_and_name_and_type "${test_dirs[${set}]}/wav.scp,speech,sound" \
                --key_file "${out}/logdir/keys.JOB.scp" --output_dir "${out}/logdir/output.JOB" \
                --ngpu "${inference_ngpu}" ${extra} ${inference_args} \
                || { tail -n 30 "${out}"/logdir/s2t_inference.*.log >&2; die "decoding ${set} with ${name} failed, see ${out}/logdir"; }
            cat "${out}"/logdir/output.*/1best_recog/text_nospecial | LC_ALL=C sort > "${out}/text"
        done
    }
    decode base espnet2.bin.s2t_inference "${owsm}/config.yaml" "${owsm}/model.pth"
    sweep_runs=$(sweep_methods)
    for method in ${methods} ${sweep_runs}; do
        [ -e "${exp}/${method}/${inference_s2t_model}" ] || die "no ${exp}/${method}/${inference_s2t_model}: run stage 3"
        if [ "${method}" = full ]; then
            decode full espnet2.bin.s2t_inference "${exp}/full/config.yaml" "${exp}/full/${inference_s2t_model}"
            continue
        fi
        # adapters folded into the weights where that is exact; HDMoLE's routing stays per utterance
        merge="--peft_merge true"
        exact_merge "${exp}/${method}/config.yaml" || merge=""
        decode "${method}" espnet_plugins.bin.s2t_inference "${exp}/${method}/config.yaml" \
            "${exp}/${method}/${inference_s2t_model}" "${merge}"
    done
fi

if [ ${stage} -le 5 ] && [ ${stop_stage} -ge 5 ]; then
    sets=""
    for set in ${set_names}; do sets+="${set}=${test_dirs[${set}]} "; done
    log "Stage 5: WER -> ${exp}/results.md, ${exp}/results.csv"
    sweep_runs=$(sweep_methods)
    ${python} -m owsm.score --exp "${exp}" --sets "${sets}" --names "base ${methods} ${sweep_runs}" \
        --cleaners "${score_cleaners}" --breakdowns "${score_breakdowns}" --sclite "${score_sclite}"
fi

log "Successfully finished stages ${stage}-${stop_stage}"
