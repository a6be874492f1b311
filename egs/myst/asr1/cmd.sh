# Where run.sh runs its jobs, as ESPnet's egs2/*/cmd.sh selects it: local (this machine), stdout,
# slurm or sge. slurm, sge and stdout run ESPnet's utils/slurm.pl, queue.pl and stdout.pl from a
# checkout (ESPNET_ROOT in path.sh); their options: ../../common/conf/{slurm,queue}.conf.
cmd_backend=${cmd_backend:-local}
. ../../common/cmd_backend.sh
