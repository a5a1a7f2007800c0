#!/usr/bin/env bash
# GPU check, run on the GPU machine from the repository root:
#   tests/gpu/check.sh [OUTDIR]
# Needs: nvidia-smi, a Python with torch (CUDA), the wheels in .gpu/wheels (made by
# tests/gpu/prepare.sh here, since the GPU machine has no network) and CRIU in .gpu/criu.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.}
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # model processes import llmuxd.sim from the tree
"$py" -m pip install --quiet --no-index --find-links .gpu/wheels \
    tomlkit psutil click watchfiles sdnotify h11 2>&1 | tail -2 || true
criu=$PWD/.gpu/criu/bin/criu
"$criu" --version | head -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ngpu=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
"$py" tests/gpu/check.py --criu "$criu" --levels 1,2,3,4 --out "$out/gpu-table.md"
if [ "$ngpu" -ge 2 ]; then
  "$py" tests/gpu/check.py --criu "$criu" --tp 2 --mb 4096 --levels 3,4 --out "$out/gpu-table-tp2.md"
fi
