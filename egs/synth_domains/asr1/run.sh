#!/usr/bin/env bash
# Offline multi-domain benchmark: learning vs forgetting per PEFT method on synthetic speech domains.
#   stage 1  prepare text       restricted-vocabulary sentences, disjoint per split  -> ${data}/local/text
#   stage 2  synthesize         TTS, voice transforms, noise; both cores; resumable  -> ${synth}/<split>/*.wav
#   stage 3  data dirs          Kaldi-style ${data}/<split>/{wav.scp,text,utt2spk,spk2utt,utt2domain,utt2dur}
#   stage 4  recognizer check   pocketsphinx WER per domain on each test split        -> ${exp}/pocketsphinx_wer.md
#   stage 5  tokens             token list (chars or sentencepiece) of source_train  -> ${data}/token_list/<type>/tokens.txt
#   stage 6  shapes             speech_shape of every data dir (utterance_mvn: no stats) -> ${data}/<split>/speech_shape
#   stage 7  pretrain           base model, stock espnet2.bin.asr_train on source_train -> ${exp}/base/valid.acc.ave.pth
#   stage 8  fine-tune          each method on each domain's adapt split; equal PEFT budget -> ${exp}/<domain>/<method>/
#                               (--tune true: first every method at each rate on dev, rates frozen -> ${exp}/frozen/;
#                               --seeds n: every main run at n seeds)
#   stage 9  decode             base (zero-shot) and each adapted model on target + source test -> ${exp}/decode/<name>/
#                               (HDMoLE also with each domain's experts merged, <name>@oracle_<domain>, and its routing)
#                               (with a frozen file: refused for a run not trained at its method's frozen rate)
#   stage 10 score              WER, CER, forgetting, cost per (domain, method) over seeds, paired differences,
#                               HDMoLE's routing   -> ${exp}/{results,differences,hdmole_routing}.{md,csv}, .png,
#                               and the report of them all -> ${exp}/report.md
#   stage 11 merge              per-domain models of each kind merged into one, at each seed, knobs chosen on dev
#                               and frozen first (--tune true, or no ${exp}/frozen/merging/current.yaml: a dev
#                               search on seed 0's runs) -> ${exp}/frozen/merging/, ${exp}/merged/<kind>/<algorithm>/
#   stage 12 decode merges      every merged model on every target test, the OOD tests, source -> ${exp}/decode/merged/
#                               (refused for a merge not made at its frozen knobs)
#   stage 13 score merges       merged vs base, per-domain, joint and HDMoLE models over seeds, paired differences
#                               -> ${exp}/merging{,_differences}.{md,csv}, ${exp}/merging_lambda.png
#   stage 14 layer analysis     a fusion head on each single tap of the frozen base, dev WER/CER -> ${exp}/layers/
# Stages 5-10 read ${data}/source_{train,dev,test} and, for each domain d in ${data}/target_domains.txt
# (synthetic and user-given), ${data}/${d}_{adapt,dev,test}; ${data}/ood_domains.txt lists domains that are
# only tested (out of distribution: the base and every model for all domains are decoded on them).
# Stages 11-13 run with --merging true (with it, stage 8 also trains each of merging.joint_methods that --methods
# lists on every domain together). Model configs: conf/asr/<profile>/.
# Usage: ./run.sh [--stage N] [--stop_stage M] [--profile ci|quick|full] [--nj J]
#                 [--target_data_dirs "accent=/path child=/path"]   (each path holds adapt/ and test/, dev/ optional)
#                 [--data D] [--synth S] [--exp E] [--python P]      (relative paths are relative to this directory)
#                 [--methods "full lora dora pissa ssvd ssvd_o"]    (default: the profile's default_methods)
#                 [--domains "accent child noisy"]                  (default: all of ${data}/target_domains.txt)
#                 [--sweeps "budget split allocation fewshot"]      (default: the profile's default_sweeps; or none)
#                 [--base_model path/valid.acc.ave.pth]             (config.yaml next to it; default ${exp}/base/...)
#                 [--merging true|false]                            (default: the profile's default_merging)
#                 [--layer_analysis true|false]                     (default: the profile's default_layer_analysis)
#                 [--tune true|false] [--frozen F]                  (default: the profile's default_tune; F: ${exp}/frozen/current.yaml,
#                                                                    else the profile's committed conf/asr/<profile>/frozen.yaml;
#                                                                    --tune true also chooses the merge knobs again in stage 11)
#                 [--seeds N]                                       (seeds per main, joint run and merge; default: the profile's default_seeds)
set -euo pipefail
command_line="./$(basename "$0")"  # into the report of stage 10, a value with spaces in quotes
for arg in "$@"; do
    case "${arg}" in
        *[[:space:]]*) command_line+=" \"${arg}\"" ;;
        *) command_line+=" ${arg}" ;;
    esac
done

stage=1
stop_stage=100
profile=quick
nj=$(nproc)
target_data_dirs=""
data=""    # default data/${profile}
synth=""   # default synth/${profile}
exp=""     # default exp/${profile}
python=""  # default: the project's .venv (path.sh)
methods=""     # default: default_methods of conf/asr/${profile}/adapters.yaml
domains=""     # default: ${data}/target_domains.txt
sweeps=""      # default: default_sweeps of conf/asr/${profile}/adapters.yaml ("none": no sweep)
base_model=""  # default: ${exp}/base/valid.acc.ave.pth (pretrained by stage 7 unless it exists)
merging=""     # default: default_merging of conf/asr/${profile}/adapters.yaml (stages 11-13, joint runs)
layer_analysis=""  # default: default_layer_analysis of conf/asr/${profile}/adapters.yaml (stage 14)
tune=""        # default: default_tune of conf/asr/${profile}/adapters.yaml (stage 8: rates chosen on dev)
frozen=""      # default: ${exp}/frozen/current.yaml, else ${asr_conf}/frozen.yaml (learning rates frozen on dev)
seeds=""       # default: default_seeds of conf/asr/${profile}/adapters.yaml (1 if absent)

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }

help_message="usage: $0 [--stage N] [--stop_stage M] [--profile ci|quick|full] [--nj J] [--target_data_dirs 'name=/path ...'] [--data D] [--synth S] [--exp E] [--python P] [--methods 'full lora ...'] [--domains 'accent ...'] [--sweeps 'budget split allocation fewshot'|none] [--base_model M] [--merging true|false] [--layer_analysis true|false] [--tune true|false] [--frozen F] [--seeds N]"
cd "$(dirname "$0")"
. ./path.sh
. "${COMMON_ROOT}/parse_options.sh"
profile_conf=conf/profiles/${profile}.yaml
[ -f "${profile_conf}" ] || { echo "no profile ${profile_conf}" >&2; exit 1; }
data=${data:-data/${profile}}
synth=${synth:-synth/${profile}}
exp=${exp:-exp/${profile}}
# splits: those synthesized (a profile's text_only splits are cut, so the others are drawn as for its base
# model, but never synthesized: the base was trained on them); profile_base: the profile's base model.
splits=$(${python} -m yaml_get "${profile_conf}" splits --without text_only)
profile_base=$(${python} -m yaml_get "${profile_conf}" base_model)
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
    n=$(${python} -m yaml_get "${profile_conf}" pocketsphinx_utts)
    eval_splits="$(printf '%s\n' ${source_splits} | grep '_test$' || true) $(cat "${data}/target_domains.txt" \
        "${data}/ood_domains.txt" | sed 's/$/_test/' | tr '\n' ' ')"
    ${python} local/pocketsphinx_check.py --data_dir "${data}" --splits "${eval_splits}" --n "${n}" \
        --out_dir "${exp}" --nj "${nj}"
fi

asr_conf=conf/asr/${profile}
base_model=${base_model:-${profile_base:-${exp}/base/valid.acc.ave.pth}}
read -r token_type bpe_size < <(${python} -m yaml_get "${profile_conf}" tokens.type tokens.size)
bpe_size=${bpe_size:-0}
token_dir=${data}/token_list/${token_type}
token_list=${token_dir}/tokens.txt
token_args="--token_type ${token_type} --token_list ${token_list}"
if [ "${token_type}" = bpe ]; then
    token_dir=${data}/token_list/bpe${bpe_size}
    token_list=${token_dir}/tokens.txt
    token_args="--token_type bpe --token_list ${token_list} --bpemodel ${token_dir}/bpe.model"
fi
threads=$(( $(nproc) / nj > 0 ? $(nproc) / nj : 1 ))  # per job when stages 8-9 run ${nj} jobs at once
if [ ${stop_stage} -ge 8 ]; then
    [ -n "${methods}" ] || methods=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_methods)
    [ -n "${domains}" ] || domains=$(tr '\n' ' ' < "${data}/target_domains.txt")
    [ -n "${sweeps}" ] || sweeps=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_sweeps)
    [ "${sweeps}" != none ] || sweeps=""
    [ -n "${merging}" ] || merging=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_merging)
    merging=$(echo "${merging}" | tr '[:upper:]' '[:lower:]')
    case "${merging}" in true | false) ;; "") merging=false ;; *) echo "--merging is true or false, got ${merging}" >&2; exit 1 ;; esac
    [ -n "${tune}" ] || tune=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_tune)
    tune=$(echo "${tune}" | tr '[:upper:]' '[:lower:]')
    case "${tune}" in true | false) ;; "") tune=false ;; *) echo "--tune is true or false, got ${tune}" >&2; exit 1 ;; esac
    [ -n "${seeds}" ] || seeds=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_seeds)
    seeds=${seeds:-1}
    [[ "${seeds}" =~ ^[1-9][0-9]*$ ]] || { echo "--seeds is a number of seeds (1 or more), got ${seeds}" >&2; exit 1; }
    [ -n "${layer_analysis}" ] || layer_analysis=$(${python} -m yaml_get "${asr_conf}/adapters.yaml" default_layer_analysis)
    layer_analysis=$(echo "${layer_analysis}" | tr '[:upper:]' '[:lower:]')
    case "${layer_analysis}" in
        true | false) ;; "") layer_analysis=false ;;
        *) echo "--layer_analysis is true or false, got ${layer_analysis}" >&2; exit 1 ;;
    esac
    ood_domains=""
    [ ! -f "${data}/ood_domains.txt" ] || ood_domains=$(tr '\n' ' ' < "${data}/ood_domains.txt")
fi

# run_logged LOG COMMAND...: run COMMAND with its output appended to LOG; on failure show the end of LOG.
run_logged() {
    local log_file=$1
    shift
    mkdir -p "$(dirname "${log_file}")"
    "$@" >> "${log_file}" 2>&1 || { tail -n 30 "${log_file}" >&2; echo "failed: see ${log_file}" >&2; return 1; }
}

# Jobs run in the background, ${nj} at a time: a job starts as soon as one of the running ones ends.
# wait_jobs waits for every job and fails if one failed; when one fails, start_job waits for the others
# and fails (nothing is left running).
pids=()
wait_jobs() {
    local pid failed=0
    for pid in "${pids[@]}"; do wait "${pid}" || failed=1; done
    pids=()
    return ${failed}
}
wait_one() {  # wait for the first running job to end and drop it from pids; fails as the job did
    local ended pid status=0 running=()
    wait -n -p ended "${pids[@]}" || status=$?
    for pid in "${pids[@]}"; do [ "${pid}" = "${ended}" ] || running+=("${pid}"); done
    pids=("${running[@]}")
    return ${status}
}
start_job() {
    "$@" &
    pids+=($!)
    if [ ${#pids[@]} -ge ${nj} ] && ! wait_one; then
        wait_jobs || true
        return 1
    fi
}

data_args() {  # data_args PREFIX DATA_DIR: ESPnet's speech + text inputs and shape file
    echo "--$1_data_path_and_name_and_type $2/wav.scp,speech,sound --$1_data_path_and_name_and_type $2/text,text,text --$1_shape_file $2/speech_shape"
}

if [ ${stage} -le 5 ] && [ ${stop_stage} -ge 5 ] && [ -f "${base_model}" ]; then
    log "Stage 5: base model ${base_model} exists: its token list is used"
elif [ ${stage} -le 5 ] && [ ${stop_stage} -ge 5 ]; then
    log "Stage 5: ${token_type} token list -> ${token_list}"
    ${python} local/token_list.py --text "${data}/source_train/text" --out "${token_list}" \
        --token_type "${token_type}" --bpe_size "${bpe_size}"
fi

if [ ${stage} -le 6 ] && [ ${stop_stage} -ge 6 ]; then
    log "Stage 6: speech_shape of every data dir in ${data}"
    ${python} local/shape_files.py $(dirname $(ls "${data}"/*/wav.scp))
fi

if [ ${stage} -le 7 ] && [ ${stop_stage} -ge 7 ]; then
    base_dir=$(dirname "${base_model}")
    if [ "${base_model}" != "${exp}/base/valid.acc.ave.pth" ] && [ -f "${base_model}" ]; then
        log "Stage 7: base model ${base_model} given, reused"
    elif [ -f "${base_dir}/train_stats.json" ]; then
        log "Stage 7: base model ${base_model} exists, reused"
    elif [ -n "${profile_base}" ]; then
        echo "the ${profile} profile adapts the base ${profile_base}, which is missing: pack one with" \
            "local/pack_base.py from a full-profile pretraining (./run.sh --profile full --stop_stage 7)" >&2
        exit 1
    else  # an unfinished pretraining resumes from its last epoch (ESPnet's --resume)
        log "Stage 7: pretrain the base model on source_train -> ${base_dir} (log ${base_dir}/pretrain.log)"
        run_logged "${base_dir}/pretrain.log" ${python} local/measure.py --out "${base_dir}/train_stats.json" -- \
            ${python} -m espnet2.bin.asr_train --config "${asr_conf}/pretrain.yaml" ${token_args} \
            --output_dir "${base_dir}" --ngpu 0 --use_matplotlib false --use_tensorboard false --resume true \
            $(data_args train "${data}/source_train") $(data_args valid "${data}/source_dev")
    fi
fi

conf_dir=${exp}/finetune_conf
runs=${conf_dir}/runs.tsv
frozen_dir=${exp}/frozen
if [ -z "${frozen}" ]; then
    frozen=${frozen_dir}/current.yaml
    [ -f "${frozen}" ] || [ ! -f "${asr_conf}/frozen.yaml" ] || frozen=${asr_conf}/frozen.yaml
fi
if [ ${stage} -le 8 ] && [ ${stop_stage} -ge 8 ]; then
    log "Stage 8: fine-tuning configs (every PEFT method at the same budget) and runs -> ${runs}"
    joint_methods=""
    if [ "${merging}" = true ]; then
        for method in $(${python} -m yaml_get "${asr_conf}/adapters.yaml" merging.joint_methods); do
            if [[ " ${methods} " == *" ${method} "* ]]; then joint_methods+="${method} "; fi  # of --methods only
        done
    fi
    plan() {  # plan [--tune | --frozen FILE]: the configs and ${runs}
        ${python} local/finetune_configs.py --base_config "$(dirname "${base_model}")/config.yaml" \
            --finetune "${asr_conf}/finetune.yaml" --adapters "${asr_conf}/adapters.yaml" --out_dir "${conf_dir}" \
            --data "${data}" --methods "${methods}" --domains "${domains}" --sweeps "${sweeps}" \
            --joint_methods "${joint_methods}" --ood_domains "${ood_domains}" --seeds "${seeds}" "$@"
        if grep -q '^all/' "${runs}"; then
            for role in adapt dev; do
                ${python} local/derived_data_dirs.py combine "${data}/combined/${role}" \
                    $(printf "${data}/%s_${role} " ${domains})
            done
        fi
        cut -f6 "${runs}" | { grep "/fewshot/" || true; } | sort -u | while read -r dir; do
            name=$(basename "${dir}")
            ${python} local/derived_data_dirs.py subset "${dir}" "${data}/${name%_n*}" "${name##*_n}"
        done
    }
    finetune() {  # finetune RUN METHOD CONFIG TRAIN_DIR DEV_DIR
        local dir=${exp}/${1:?finetune needs a run name} module=espnet_plugins.bin.asr_train labels=""
        local init="--peft_pretrained ${base_model}"
        if [ "$2" = full ]; then module=espnet2.bin.asr_train; init="--init_param ${base_model}"; fi
        if [ "$2" = hdmole ]; then
            labels="--train_data_path_and_name_and_type $4/utt2domain,domain,text"
            labels="${labels} --valid_data_path_and_name_and_type $5/utt2domain,domain,text"
        fi
        rm -rf "${dir}"
        OMP_NUM_THREADS=${threads} run_logged "${dir}/finetune.log" \
            ${python} local/measure.py --out "${dir}/train_stats.json" -- \
            ${python} -m ${module} --config "$3" ${init} --output_dir "${dir}" --ngpu 0 \
            --use_matplotlib false --use_tensorboard false \
            $(data_args train "$4") $(data_args valid "$5") ${labels} < /dev/null
    }
    train_runs() {  # train_runs tune|main: the tuning runs of ${runs}, or every other run
        local stale
        stale=$(${python} local/freeze.py stale --runs "${runs}" --exp "${exp}")
        while IFS=$'\t' read -r run method sweep value config train dev tests; do
            if { [ "$1" = tune ] && [ "${sweep}" != tune ]; } || { [ "$1" = main ] && [ "${sweep}" = tune ]; }; then
                continue
            fi
            if [ -f "${exp}/${run}/train_stats.json" ] && ! grep -qxF "${run}" <<< "${stale}"; then
                log "Stage 8: ${run} done, skipped"
                continue
            fi
            log "Stage 8: fine-tune ${run} on ${train} -> ${exp}/${run}"
            start_job finetune "${run}" "${method}" "${config}" "${train}" "${dev}"
        done < "${runs}"
        wait_jobs
    }
    if [ "${tune}" = true ]; then
        log "Stage 8: tuning runs (every method at each rate of tuning.lr), rates chosen on dev -> ${frozen_dir}"
        plan --tune
        train_runs tune
        ${python} local/freeze.py choose --runs "${runs}" --exp "${exp}" --out "${frozen_dir}"
        frozen=${frozen_dir}/current.yaml  # what this tuning froze
    fi
    if [ -f "${frozen}" ]; then
        log "Stage 8: learning rates frozen on dev: ${frozen}"
        plan --frozen "${frozen}"
    else
        log "Stage 8: no frozen learning rates (${frozen}): the adapters file's, not chosen on dev (--tune true)"
        plan
    fi
    train_runs main
fi

decode() {  # decode NAME MODULE CONFIG MODEL "EXTRA ARGS" TEST_SPLITS...: every test split at once
    local dir=${exp}/decode/${1:?decode needs a name} module=$2 config=$3 model=$4 extra=$5 split
    shift 5
    rm -rf "${dir}"
    mkdir -p "${dir}"
    for split in "$@"; do cat "${data}/${split}/wav.scp"; done > "${dir}/wav.scp"
    OMP_NUM_THREADS=${threads} run_logged "${dir}/decode.log" \
        ${python} -m ${module} --config "${asr_conf}/decode.yaml" --asr_train_config "${config}" \
        --asr_model_file "${model}" --data_path_and_name_and_type "${dir}/wav.scp,speech,sound" \
        --output_dir "${dir}" --ngpu 0 ${extra} < /dev/null
    echo "$*" > "${dir}/splits"
}
oracle_decode() {  # oracle_decode RUN DOMAIN: the HDMoLE run's DOMAIN experts merged, on DOMAIN's test and source
    local run=${1:?oracle_decode needs a run} domain=${2:?oracle_decode needs a domain}
    local dir=${exp}/${run}/oracle/${domain}
    OMP_NUM_THREADS=${threads} run_logged "${dir}/export.log" ${python} -m espnet_plugins.bin.export_merged \
        --train_config "${exp}/${run}/config.yaml" --model_file "${exp}/${run}/valid.acc.best.pth" \
        --output_dir "${dir}" --peft_domain "${domain}" < /dev/null
    decode "${run}@oracle_${domain}" espnet2.bin.asr_inference "${dir}/config.yaml" "${dir}/model.pth" "" \
        "${domain}_test" source_test
}
decoded() {  # decoded NAME MODEL TEST_SPLITS...: these splits decoded after the model was written
    local dir=${exp}/decode/${1:?decoded needs a name} model=$2
    shift 2
    [ -f "${dir}/splits" ] && [ "$(cat "${dir}/splits")" = "$*" ] && [ "${dir}/splits" -nt "${model}" ]
}

if [ ${stage} -le 9 ] && [ ${stop_stage} -ge 9 ]; then
    if [ -f "${frozen}" ]; then  # the guard: a test is decoded only for runs at their frozen rates
        ${python} local/freeze.py check --frozen "${frozen}" --runs "${runs}" --exp "${exp}"
    else
        log "Stage 9: learning rates not frozen on dev (no ${frozen}; --tune true freezes them)"
    fi
    base_splits="source_test $(printf '%s_test ' ${domains} ${ood_domains})"
    if decoded base "${base_model}" ${base_splits}; then
        log "Stage 9: base decoded, skipped"
    else
        log "Stage 9: decode the base model (zero-shot) -> ${exp}/decode/base"
        start_job decode base espnet2.bin.asr_inference "$(dirname "${base_model}")/config.yaml" "${base_model}" \
            "" ${base_splits}
    fi
    while IFS=$'\t' read -r run method sweep value config train dev tests; do
        dir=${exp}/${run}
        test_splits="$(printf '%s_test ' ${tests})source_test"
        if decoded "${run}" "${dir}/valid.acc.best.pth" ${test_splits}; then
            log "Stage 9: ${run} decoded, skipped"
            continue
        fi
        module=espnet_plugins.bin.asr_inference extra="--peft_merge true"
        if [ "${method}" = full ]; then module=espnet2.bin.asr_inference extra=""; fi
        if [ "${method}" = hdmole ]; then extra=""; fi  # routed per token: no exact merge
        log "Stage 9: decode ${run} -> ${exp}/decode/${run}"
        start_job decode "${run}" ${module} "${dir}/config.yaml" "${dir}/valid.acc.best.pth" "${extra}" \
            ${test_splits}
    done < "${runs}"
    wait_jobs
    # HDMoLE: the oracle-routing rows (the true domain given: its experts merged, local/hdmole_routing.py's
    # docstring) and where the domain router sends each test utterance.
    while IFS=$'\t' read -r run method sweep value config train dev tests; do
        [ "${method}" = hdmole ] || continue
        model=${exp}/${run}/valid.acc.best.pth
        for domain in ${domains}; do
            if decoded "${run}@oracle_${domain}" "${model}" "${domain}_test" source_test; then
                log "Stage 9: ${run} with ${domain}'s experts decoded, skipped"
                continue
            fi
            log "Stage 9: ${run} with ${domain}'s experts (oracle routing) -> ${exp}/decode/${run}@oracle_${domain}"
            start_job oracle_decode "${run}" "${domain}"
        done
        routing=${exp}/decode/${run}/routing
        if [ "${routing}/routing.csv" -nt "${model}" ]; then
            log "Stage 9: ${run}'s routing done, skipped"
            continue
        fi
        log "Stage 9: ${run}'s domain routing of every test -> ${routing}"
        tests_of_run=""
        for domain in ${tests} source; do tests_of_run="${tests_of_run} --test ${domain}=${data}/${domain}_test"; done
        start_job run_logged "${routing}/routing.log" env OMP_NUM_THREADS=${threads} ${python} local/hdmole_routing.py \
            --config "${exp}/${run}/config.yaml" --model "${model}" --out_dir "${routing}" ${tests_of_run}
    done < "${runs}"
    wait_jobs
fi

if [ ${stage} -le 10 ] && [ ${stop_stage} -ge 10 ]; then
    log "Stage 10: score -> ${exp}/{results,differences}.{md,csv}, ${exp}/learning_vs_forgetting.png, the sweeps"
    ${python} local/score.py --data "${data}" --exp "${exp}" --runs "${runs}" --domains "${domains}" \
        --base_model "${base_model}" --frozen "${frozen}"
    ${python} local/differences.py --data "${data}" --exp "${exp}" --runs "${runs}" --domains "${domains}"
    ${python} local/routing_report.py --exp "${exp}" --runs "${runs}"
    ${python} local/report.py --exp "${exp}" --frozen "${frozen}" --command "${command_line}"
fi

merged_dir=${exp}/merged
merges=${merged_dir}/merges.tsv
frozen_merging=${frozen_dir}/merging/current.yaml
if [ "${merging}" = true ] && [ ${stage} -le 11 ] && [ ${stop_stage} -ge 11 ]; then
    ${python} local/derived_data_dirs.py combine "${data}/combined/dev" $(printf "${data}/%s_dev " ${domains})
    mkdir -p "${merged_dir}"
    plan_merges() {  # plan_merges OUT --tune | --frozen F --seeds N: local/merge_plan.py's merges file
        local out=$1
        shift
        ${python} local/merge_plan.py --adapters "${asr_conf}/adapters.yaml" --runs "${runs}" --domains "${domains}" \
            --exp "${exp}" --dev "${data}/combined/dev" --out "${out}" "$@"
    }
    merge() {  # merge NAME OPTIONS: espnet_plugins.bin.merge_models into ${exp}/NAME (OPTIONS: shell-quoted)
        local dir=${exp}/${1:?merge needs a merge name} options=$2
        rm -rf "${dir}"
        eval "set -- ${options}"
        OMP_NUM_THREADS=${threads} run_logged "${dir}/merge.log" \
            ${python} -m espnet_plugins.bin.merge_models --base_dir "$(dirname "${base_model}")" \
            --base_model_file "$(basename "${base_model}")" --output_dir "${dir}" "$@" < /dev/null
        echo "${options}" > "${dir}/options"
    }
    make_merges() {  # make_merges FILE: every merge of FILE not yet made with its options from its inputs
        while IFS=$'\t' read -r name kind algorithm form seed options inputs; do
            if [ -f "${exp}/${name}/merge.yaml" ] && [ "$(cat "${exp}/${name}/options" 2>/dev/null)" = "${options}" ] \
                && ! find ${inputs} -newer "${exp}/${name}/merge.yaml" | grep -q .; then
                log "Stage 11: ${name} merged, skipped"
                continue
            fi
            log "Stage 11: merge ${name} (${algorithm} over ${kind}, seed ${seed})"
            start_job merge "${name}" "${options}"
        done < "$1"
        wait_jobs
    }
    if [ "${tune}" = true ] || [ ! -f "${frozen_merging}" ]; then
        log "Stage 11: merge knobs searched on the combined dev sets (seed 0's runs), frozen -> $(dirname "${frozen_merging}")"
        plan_merges "${merged_dir}/tune.tsv" --tune
        make_merges "${merged_dir}/tune.tsv"
        ${python} local/merge_freeze.py choose --merges "${merged_dir}/tune.tsv" --exp "${exp}" \
            --out "$(dirname "${frozen_merging}")"
    fi
    log "Stage 11: every merge at the knobs frozen in ${frozen_merging}, ${seeds} seed(s) -> ${merged_dir}"
    plan_merges "${merges}" --frozen "${frozen_merging}" --seeds "${seeds}"
    make_merges "${merges}"
fi

if [ "${merging}" = true ] && [ ${stage} -le 12 ] && [ ${stop_stage} -ge 12 ]; then
    # the guard: a test is decoded only for merges made at the knobs frozen on dev
    ${python} local/merge_freeze.py check --frozen "${frozen_merging}" --merges "${merges}" --exp "${exp}"
    merged_splits="$(printf '%s_test ' ${domains} ${ood_domains})source_test"
    while IFS=$'\t' read -r name kind algorithm form seed options inputs; do
        dir=${exp}/${name}
        if decoded "${name}" "${dir}/model.pth" ${merged_splits}; then
            log "Stage 12: ${name} decoded, skipped"
            continue
        fi
        module=espnet2.bin.asr_inference extra=""
        if [ "${form}" = ssvd_core ]; then module=espnet_plugins.bin.asr_inference extra="--peft_merge true"; fi
        log "Stage 12: decode ${name} -> ${exp}/decode/${name}"
        start_job decode "${name}" ${module} "${dir}/config.yaml" "${dir}/model.pth" "${extra}" ${merged_splits}
    done < "${merges}"
    wait_jobs
fi

if [ "${merging}" = true ] && [ ${stage} -le 13 ] && [ ${stop_stage} -ge 13 ]; then
    log "Stage 13: score the merges -> ${exp}/merging.{md,csv}, ${exp}/merging_differences.{md,csv}, .png"
    ${python} local/score_merging.py --data "${data}" --exp "${exp}" --runs "${runs}" --merges "${merges}" \
        --domains "${domains}" --ood_domains "${ood_domains}" --base_model "${base_model}" \
        --frozen "${frozen_merging}"
fi

layers_dir=${exp}/layers
if [ "${layer_analysis}" = true ] && [ ${stage} -le 14 ] && [ ${stop_stage} -ge 14 ]; then
    log "Stage 14: layer analysis, a fusion head on each tap of the base -> ${layers_dir}/layers.{csv,png}"
    ${python} local/derived_data_dirs.py combine "${data}/combined/adapt" $(printf "${data}/%s_adapt " ${domains})
    ${python} local/derived_data_dirs.py combine "${data}/combined/dev" $(printf "${data}/%s_dev " ${domains})
    [ -f "${conf_dir}/layer_analysis.yaml" ] || { echo "no ${conf_dir}/layer_analysis.yaml: run stage 8" >&2; exit 1; }
    dev_sets=""
    for domain in ${domains}; do dev_sets="${dev_sets} --test ${domain}=${data}/${domain}_dev"; done
    OMP_NUM_THREADS=$(nproc) run_logged "${layers_dir}/layers.log" \
        ${python} "${COMMON_ROOT}/pyscripts/fusion_layers.py" --config "${conf_dir}/layer_analysis.yaml" --layers all \
        --output_dir "${layers_dir}" --decode_config "${asr_conf}/decode.yaml" ${dev_sets} -- \
        --peft_pretrained "${base_model}" --ngpu 0 --use_matplotlib false --use_tensorboard false \
        $(data_args train "${data}/combined/adapt") $(data_args valid "${data}/combined/dev") < /dev/null
fi

log "Successfully finished stages ${stage}-${stop_stage}"
