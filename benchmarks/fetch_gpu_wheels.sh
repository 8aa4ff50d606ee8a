#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels the GPU machine lacks: imageio-ffmpeg (0.6.0: 29 MB;
# 0.8.x is 68 MB, over the 64 MiB a device call may carry), ftfy and its wcwidth, and pytest with its
# pluggy, iniconfig, packaging and pygments (pytest 9 needs pygments >= 2.15; the machine has it only
# through rich, version unknown). CPython 3.12, manylinux x86_64, as on the GPU machine.
# Run from anywhere: benchmarks/fetch_gpu_wheels.sh; then carry ".whl" with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl imageio-ffmpeg==0.6.0 ftfy wcwidth pytest pluggy iniconfig packaging pygments
ls -l .whl
size_kib=$(du -sk .whl | cut -f1)
echo "${size_kib} KiB in .whl"
if ((size_kib > 56 * 1024)); then
  echo "error: .whl holds more than 56 MiB; a device call carries 64 MiB in all (remove stale wheels)" >&2
  exit 1
fi
