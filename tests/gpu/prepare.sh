#!/usr/bin/env bash
# Here (with network): gather what tests/gpu/check.sh needs on the offline GPU machine,
# into .gpu/ (ignored by git, carried by the device tool): wheels and the CRIU prefix.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/wheels
for v in 3.10 3.11 3.12 3.13; do
  python3 -m pip download --quiet --dest .gpu/wheels --only-binary=:all: \
      --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      tomlkit psutil click watchfiles h11 || true
done
python3 -m pip download --quiet --dest .gpu/wheels --no-deps sdnotify
[ -x /opt/llmux-criu/bin/criu ] || bash packaging/install-criu.sh /opt/llmux-criu
rm -rf .gpu/criu && cp -a /opt/llmux-criu .gpu/criu
du -sh .gpu
