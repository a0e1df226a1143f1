#!/usr/bin/env bash
# Installs everything tagd's tests need on a fresh Debian/Ubuntu machine:
# system packages (ffmpeg with libzmq, PortAudio, libsndfile, sox, Prometheus, the
# Liquidsoap and Icecast that the broadcast-chain tests run, and FluidSynth with every
# General MIDI soundfont Debian ships as .sf2 and espeak-ng, which render training music
# and speech) and a
# virtual environment in .venv with tagd, its training extra and the dev tools.
# PyTorch is pinned to the CPU build by constraints/ci.txt (any other version pulls
# gigabytes of CUDA packages); the package itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(ffmpeg libportaudio2 libsndfile1 sox alsa-utils prometheus systemd liquidsoap icecast2
              fluidsynth fluid-soundfont-gm timgm6mb-soundfont musescore-general-soundfont-lossless
              opl3-soundfont csound-soundfont espeak-ng sqlite3)

if [ "${TAGD_SKIP_APT:-0}" != 1 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints/ci.txt -e '.[train,dev]'
# A real Triton server for tests/test_triton.py: tritonserver from the nvidia-pytriton
# wheel, unpacked under ~/.cache/tagd/tritonserver (not installed: it pins numpy < 2)
.venv/bin/python -m trainer.triton_local
echo "installed: $(.venv/bin/python -c 'import tagd, torch, onnxruntime; print("tagd", tagd.__version__, "torch", torch.__version__, "onnxruntime", onnxruntime.__version__)')"
