#!/usr/bin/env bash
# The one-command GPU check on a machine where hf_seqpar is not installed (e.g. a lent GPU with
# torch and transformers but no network): lays the package out from this checkout in a scratch
# folder (hf_seqpar/ + kernels/ and patches/ as hf_seqpar.kernels / hf_seqpar.patches, as
# pyproject.toml installs them) and runs, each part time-limited and writing its results to OUT_DIR
# as it goes (a part cut by its limit leaves what it had):
#   kernels   the attention kernel speed table (hf-seqpar bench --kernels): forward+backward TFLOP/s of
#             every CUDA backend, causal and packed rows at 8K/32K/128K, each checked against float64
#             -> kernel-speed.json (its "table_entry" is the row for kernels/speed.py)
#   mfu128k   the full Llama-3.1-8B shape (32 layers, bf16, random weights) at 131,072 tokens: step
#             time, tokens/s per GPU and MFU against the device's named peak -> mfu128k.json
#   longest   the same model at the longest row the memory model fits on this GPU with every memory
#             feature (or the longest whose predicted step fits the part's limit; both are named):
#             predicted vs measured peak and step time -> longest.json
#   selftest  `hf-seqpar selftest --gpu` with the budget left (gpu-marked tests, kernel sweep, long
#             rows, predicted peak) -> selftest.md / selftest.json
# With the package installed, `hf-seqpar selftest --gpu --out DIR` is the last part alone.
# Usage: bash recipes/gpu_check.sh [OUT_DIR] [BUDGET_SECONDS] [PARTS]
#   BUDGET_SECONDS (default 540) bounds the whole check; PARTS: comma list (default
#   kernels,mfu128k,longest,selftest). Without a GPU every part says so (nothing CUDA runs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$PWD}}
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the check runs from the scratch copy
budget=${2:-540}
parts=${3:-kernels,mfu128k,longest,selftest}
scratch=$(mktemp -d)
cp -r "$root/hf_seqpar" "$scratch/hf_seqpar"
cp -r "$root/kernels" "$scratch/hf_seqpar/kernels"
cp -r "$root/patches" "$scratch/hf_seqpar/patches"
export PYTHONPATH="$scratch:$root/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# from the copy: Python puts the working folder first on its path, and a checkout's hf_seqpar/ has no kernels/
cd "$scratch"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
selftest=(python3 -c "from hf_seqpar.tools.cli import main; import sys; sys.exit(main(['selftest', '--gpu', '--out', '$out', '--budget', sys.argv[1], '--tests', '$root/tests']))")
if [ "$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  echo "gpu_check: no CUDA device: the kernel table, mfu128k and longest parts need one (not run)"
  exec "${selftest[@]}" "$budget"  # dry mode: says what it would run, exits 0
fi
start=$SECONDS
status=0
# run_part NAME LIMIT_SECONDS COMMAND...: the command's output to OUT/NAME.log (and its tail here)
run_part() {
  local name=$1 limit=$2 rc=0
  shift 2
  case ",$parts," in *",$name,"*) ;; *) return 0 ;; esac
  local left=$((budget - (SECONDS - start)))
  if ((left < 30)); then
    echo "$name: not run (budget of ${budget}s spent)" | tee -a "$out/parts.txt"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)"
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  tail -n 25 "$out/$name.log"
  echo "$name: exit $rc after $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$out/parts.txt"
  ((rc == 0)) || status=1
}
: >"$out/parts.txt"
run_part kernels 100 python3 -m hf_seqpar.tools.kernelbench --json "$out/kernel-speed.json" --time-limit 75
run_part mfu128k 160 python3 -m hf_seqpar.tools.fullshape mfu128k "$out/mfu128k.json"
run_part longest 170 python3 -m hf_seqpar.tools.fullshape longest "$out/longest.json" --time-limit 100
left=$((budget - (SECONDS - start)))
run_part selftest "$left" "${selftest[@]}" "$((left - 15))"
for f in mfu128k longest; do
  [ -f "$out/$f.json" ] && python3 -c "import json; d = json.load(open('$out/$f.json')); print('$f:', d.get('summary') or d.get('status'), '| seq', d.get('seq_len') or d.get('run'), '| peak predicted/measured GiB', d.get('predicted_device_gib'), d.get('measured_device_gib'))"
done
echo "gpu_check: $( ((status == 0)) && echo passed || echo 'FAILED (see parts.txt)'); results in $out"
exit $status
