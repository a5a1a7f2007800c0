#!/usr/bin/env bash
# The real-vLLM GPU check, run on the offline GPU machine from the repository root.
# Here first: ../shared/gpu/fetch-vllm.sh .vllm (the wheel set in 7 parts) and
# tests/gpu/prepare.sh (llmux's own wheels and the CRIU prefix with its CUDA plugin, in .gpu/).
# There, in back-to-back calls (the machine forgets /tmp once idle for 30 s):
#   tests/gpu/vllm_check.sh part N        (N = 0..6, carrying .vllm/parts/N)
#   tests/gpu/vllm_check.sh cycle OUTDIR  (carrying .gpu: installs, then levels 1-4, adoption)
#   tests/gpu/vllm_check.sh weights OUTDIR [VARIANTS] (KV-heavy model, both CRIU modes)
#   tests/gpu/vllm_check.sh resident OUTDIR (three models, two resident, the front + openai)
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:?part N | cycle OUT | weights OUT [VARIANTS] | resident OUT}

setup() {
    if [ ! -x /tmp/site/bin/vllm ]; then
        mkdir -p /tmp/whl && cat /tmp/parts/w.* | tar x -C /tmp/whl || return 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl \
            || return 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            .gpu/wheels/tomlkit-*.whl .gpu/wheels/sdnotify-* || return 1
    fi
    [ -x /tmp/criu/bin/criu ] || cp -a .gpu/criu /tmp/criu
    export PYTHONPATH=$PWD:/tmp/site LLMUX_VLLM=/tmp/site/bin/vllm PYTHONUNBUFFERED=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    /tmp/criu/bin/criu --version | head -1
    ls -la /tmp/criu/lib/criu/ 2>&1 | tail -2
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
}

case $what in
part)
    mkdir -p /tmp/parts && cp .vllm/parts/"$2"/w.* /tmp/parts/ && ls -la /tmp/parts | tail -n +2 ;;
cycle)
    setup || exit 1
    out=${2:?OUT}
    python3 tests/gpu/vllm_check.py cycle --criu /tmp/criu/bin/criu --plugin-dir /tmp/llmux-vllm/no-plugin \
        --out "$out/cycle.jsonl" --budget 520 ;;
resident)
    setup || exit 1
    out=${2:?OUT}
    python3 tests/gpu/vllm_check.py resident --criu /tmp/criu/bin/criu --plugin-dir /tmp/criu/lib/criu \
        --out "$out/resident.jsonl" --budget 540 ;;
weights)
    setup || exit 1
    out=${2:?OUT}
    python3 tests/gpu/vllm_check.py weights --criu /tmp/criu/bin/criu --plugin-dir /tmp/criu/lib/criu \
        --variants "${3:-0,1,2}" --out "$out/weights.jsonl" --budget 540 ;;
*) echo "unknown: $what" >&2; exit 2 ;;
esac
