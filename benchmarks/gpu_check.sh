#!/usr/bin/env bash
# The one GPU check for issues 8 and 9 (README, "GPU check"). On the GPU machine, with .whl/ carried:
#   timeout -k 15 470 bash benchmarks/gpu_check.sh          -> $OUT/gpu_check.json (+ $OUT/gpu_check_logs/)
# CPU dry run (tiny sizes, a few minutes):
#   DEVICE=cpu benchmarks/gpu_check.sh --small --out /tmp/gpu_check/gpu_check.json
# Installs the wheels in .whl/ into /tmp/site when this Python lacks them (once per machine), puts
# /tmp/site and the repository on PYTHONPATH, then runs benchmarks/gpu_check.py with the arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
needs='import imageio_ffmpeg, ftfy, pytest'
if ! PYTHONPATH="/tmp/site:$PWD" "$PYTHON" -c "$needs" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: $PYTHON lacks imageio-ffmpeg/ftfy/pytest and there is no .whl/ (run benchmarks/fetch_gpu_wheels.sh and carry .whl)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  chmod +x /tmp/site/imageio_ffmpeg/binaries/* 2>/dev/null || true
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
