#!/usr/bin/env bash
# Here (with network): gather what tests/gpu/check.sh and vllm_check.sh need on the offline GPU
# machine, into .gpu/ (ignored by git, carried by the device tool): llmux's own wheels that the
# GPU machine lacks, and the CRIU prefix with its CUDA plugin (packaging/install-criu.sh).
# The vLLM wheel set itself comes from ../shared/gpu/fetch-vllm.sh .vllm (7 parts).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/wheels
python3 -m pip download --quiet --dest .gpu/wheels --no-deps --only-binary=:all: tomlkit
python3 -m pip wheel --quiet --wheel-dir .gpu/wheels --no-deps sdnotify  # an sdist: built here
prefix=${LLMUX_CRIU_PREFIX:-/opt/llmux-criu}
[ -x "$prefix/bin/criu" ] && [ -f "$prefix/lib/criu/cuda_plugin.so" ] || bash packaging/install-criu.sh "$prefix"
rm -rf .gpu/criu && cp -a "$prefix" .gpu/criu
du -sh .gpu
