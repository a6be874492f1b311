# The environment of every recipe (sourced by each recipe's path.sh): the Python that runs it (the
# project's virtual environment when it exists, else --python or python3), the shared Python
# scripts of egs/common/pyscripts on PYTHONPATH and, when ESPNET_ROOT names an ESPnet checkout, its
# utils/ (run.pl, slurm.pl, queue.pl, ...) on PATH for cmd.sh's back-ends, and its tools/sctk/bin
# (sclite, for stage 5) when it was installed there.
COMMON_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MAIN_ROOT=$(cd "${COMMON_ROOT}/../.." && pwd)
if [ -z "${python:-}" ]; then
    if [ -x "${MAIN_ROOT}/.venv/bin/python" ]; then
        python="${MAIN_ROOT}/.venv/bin/python"
    else
        python=python3
    fi
fi
export PYTHONPATH="${COMMON_ROOT}/pyscripts${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
if [ -n "${ESPNET_ROOT:-}" ]; then
    [ -d "${ESPNET_ROOT}/utils" ] || { echo "path.sh: error: ESPNET_ROOT=${ESPNET_ROOT} has no utils/: give the root of an ESPnet checkout" >&2; return 1; }
    export PATH="${ESPNET_ROOT}/utils:${PATH}"
    [ ! -d "${ESPNET_ROOT}/tools/sctk/bin" ] || export PATH="${ESPNET_ROOT}/tools/sctk/bin:${PATH}"
fi
