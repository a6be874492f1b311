# The recipe's environment: egs/common/path.sh (the Python that runs it, the shared scripts).
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../common/path.sh"
