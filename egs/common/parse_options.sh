# Options of a recipe script, as Kaldi's and ESPnet's utils/parse_options.sh read them: every
# "--name value" sets the shell variable "name", which the script must have declared (with its
# default) before sourcing this file; "--help" prints ${help_message} and exits. A name the script
# did not declare, or a missing value, is an error that prints the usage.
#     stage=1; help_message="usage: $0 [--stage N]"; . ../../common/parse_options.sh
while [ $# -gt 0 ]; do
    if [ "$1" = --help ] || [ "$1" = -h ]; then
        echo "${help_message:-}"
        exit 0
    fi
    _option=${1#--}
    if [ "${_option}" = "$1" ] || [ $# -lt 2 ] || [ "${_option}" = _option ] \
        || ! declare -p "${_option}" >/dev/null 2>&1; then
        echo "$(basename "$0"): error: unknown option or missing value: $1" >&2
        echo "${help_message:-}" >&2
        exit 1
    fi
    printf -v "${_option}" '%s' "$2"
    shift 2
done
unset _option
