#!/usr/bin/env bash
# Put into .whl/ (ignored by git) the wheels the GPU check may need on a GPU machine that has no
# internet access, for CPython 3.12 on x86-64: ftfy and its wcwidth, imageio-ffmpeg 0.6.0 WITHOUT its
# ffmpeg binary (the static ffmpeg is 80 MB, 20 MB xz-compressed; gpu_check.sh uses an ffmpeg found on
# the GPU machine, or a stand-in), and pytest with pluggy, iniconfig, packaging and pygments (pytest 9
# needs pygments >= 2.15); gpu_check.sh installs only what that machine's python lacks. Run it on a
# machine that reaches PyPI, then copy the checkout with .whl/ to the GPU machine. COPY_LIMIT_MIB (if
# set) is the most the checkout and .whl/ may take together, for copies that have a size limit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p .whl
rm -f .whl/*.whl # one version of each: two would stop the whole install there
# imageio-ffmpeg publishes its binary-free build as an sdist only: build the py3-none-any wheel here
"$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w .whl imageio-ffmpeg==0.6.0
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl ftfy wcwidth pytest pluggy iniconfig packaging pygments
ls -l .whl
tree_kib=$(git ls-files -z | xargs -0 du -cbk | tail -n 1 | cut -f1)
whl_kib=$(du -sk .whl | cut -f1)
echo "${whl_kib} KiB in .whl, ${tree_kib} KiB of tracked files"
if [[ -n "${COPY_LIMIT_MIB:-}" ]] && ((tree_kib + whl_kib > COPY_LIMIT_MIB * 1024)); then
  echo "error: the tree and .whl/ together take more than COPY_LIMIT_MIB=${COPY_LIMIT_MIB} MiB" >&2
  exit 1
fi
