# The job commands of a recipe's cmd.sh (sourced by it, after it sets cmd_backend), as ESPnet's
# egs2/*/cmd.sh defines them: train_cmd (other jobs), cuda_cmd (training, "--gpu N" added by
# s2t_peft.sh) and decode_cmd (decoding, "JOB=1:N" arrays). Each takes Kaldi's calling convention:
#   <cmd> [--gpu N] [--num_threads N] [--max-jobs-run N] [JOB=1:N] <log> <command...>
# Back-ends:
#   local  this machine: ESPnet's run.pl when a checkout's utils/ is on the PATH (ESPNET_ROOT, path.sh),
#          else egs/common/utils/local_run.py, which runs jobs the same way (logs, JOB arrays, exit code)
#   stdout this machine, the output on the terminal as well: ESPnet's stdout.pl (a checkout)
#   slurm  sbatch jobs: ESPnet's slurm.pl (a checkout) with egs/common/conf/slurm.conf (partitions and
#          options to edit for a cluster; "--gpu N" asks for N GPUs)
#   sge    qsub jobs (SGE and friends): ESPnet's queue.pl (a checkout) with egs/common/conf/queue.conf
# ESPnet's multi-node training (espnet2.bin.launch, --num_nodes > 1) needs slurm or sge.
case "${cmd_backend:-local}" in
    local)
        if command -v run.pl > /dev/null; then
            export train_cmd=run.pl
        else
            export train_cmd="${COMMON_ROOT}/utils/local_run.py"
        fi
        ;;
    stdout) export train_cmd=stdout.pl ;;
    slurm) export train_cmd="slurm.pl --config ${COMMON_ROOT}/conf/slurm.conf" ;;
    sge) export train_cmd="queue.pl --config ${COMMON_ROOT}/conf/queue.conf" ;;
    *)
        echo "cmd.sh: error: unknown cmd_backend=${cmd_backend}: local, stdout, slurm or sge" >&2
        return 1
        ;;
esac
if ! command -v "${train_cmd%% *}" > /dev/null; then
    echo "cmd.sh: error: cmd_backend=${cmd_backend} runs ESPnet's ${train_cmd%% *}, which is not on the PATH:" \
        "set ESPNET_ROOT to an ESPnet checkout (its utils/ holds it), or use cmd_backend=local" >&2
    return 1
fi
export cuda_cmd=${train_cmd}
export decode_cmd=${train_cmd}
