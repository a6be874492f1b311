# The Python that runs the recipe: the project's virtual environment when it exists.
MAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
if [ -z "${python:-}" ]; then
    if [ -x "${MAIN_ROOT}/.venv/bin/python" ]; then
        python="${MAIN_ROOT}/.venv/bin/python"
    else
        python=python3
    fi
fi
export PYTHONUNBUFFERED=1
