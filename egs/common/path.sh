# The environment of every recipe (sourced by each recipe's path.sh): the Python that runs it (the
# project's virtual environment when it exists, else --python or python3) and the shared Python
# scripts of egs/common/pyscripts on PYTHONPATH.
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
