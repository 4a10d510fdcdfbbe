#!/usr/bin/env bash
# The one-command GPU check on a machine where hf_seqpar is not installed (e.g. a lent GPU with
# torch and transformers but no network): lays the package out from this checkout in a scratch
# folder (hf_seqpar/ + kernels/ and patches/ as hf_seqpar.kernels / hf_seqpar.patches, as
# pyproject.toml installs them) and runs `hf-seqpar selftest --gpu` through it. With the package
# installed, `hf-seqpar selftest --gpu --out DIR` is the same check.
# Usage: bash recipes/gpu_check.sh [OUT_DIR] [BUDGET_SECONDS]   (report: OUT_DIR/selftest.md)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$PWD}}
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the check runs from the scratch copy
budget=${2:-540}
scratch=$(mktemp -d)
cp -r "$root/hf_seqpar" "$scratch/hf_seqpar"
cp -r "$root/kernels" "$scratch/hf_seqpar/kernels"
cp -r "$root/patches" "$scratch/hf_seqpar/patches"
export PYTHONPATH="$scratch:$root/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# from the copy: Python puts the working folder first on its path, and a checkout's hf_seqpar/ has no kernels/
cd "$scratch"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "from hf_seqpar.tools.cli import main; import sys; sys.exit(main(['selftest', '--gpu', '--out', '$out', '--budget', '$budget', '--tests', '$root/tests']))"
