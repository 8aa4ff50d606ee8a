#!/usr/bin/env bash
# The GPU check (benchmarks/README.md, "GPU check"). On any machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh --out results/gpu_check.json   (or set $OUT: $OUT/gpu_check.json)
# Offline GPU machine: run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable and copy .whl/ along.
# CPU dry run (tiny sizes, a few minutes):
#   DEVICE=cpu benchmarks/gpu_check.sh --small --out /tmp/gpu_check/gpu_check.json
# 1. Installs into /tmp/site (GPU_CHECK_SITE) the wheels in .whl/ of the modules this Python lacks (pip --no-index).
# 2. Without a working ffmpeg (the offline wheel set leaves out imageio-ffmpeg's 80 MB binary), videos
#    are written by benchmarks/ffmpeg_standin.py (OpenCV, mp4v); the results say which ffmpeg ran.
# 3. Runs benchmarks/gpu_check.py with /tmp/site and the repository on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ $PYTHON == */* && $PYTHON != /* ]]; then PYTHON="$repo/$PYTHON"; fi
site=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"

wheels=()
for module in imageio_ffmpeg ftfy wcwidth pytest pluggy iniconfig packaging pygments; do
  "$PYTHON" -c "import $module" 2>/dev/null && continue
  found=$(compgen -G ".whl/${module}-*.whl" || true)
  if [[ -z $found ]]; then
    echo "error: $PYTHON lacks $module and .whl/ has no wheel of it (run benchmarks/fetch_gpu_wheels.sh and copy .whl/ here, or pip install it)" >&2
    exit 2
  fi
  wheels+=($found)
done
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
fi

ffmpeg_works='import imageio_ffmpeg, subprocess; subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-version"], check=True, capture_output=True)'
if ! "$PYTHON" -c "$ffmpeg_works" 2>/dev/null; then
  mkdir -p /tmp/gpu_check_bin
  printf '#!/bin/sh\nexec "%s" "%s/benchmarks/ffmpeg_standin.py" "$@"\n' "$PYTHON" "$repo" >/tmp/gpu_check_bin/ffmpeg
  chmod +x /tmp/gpu_check_bin/ffmpeg
  export IMAGEIO_FFMPEG_EXE=/tmp/gpu_check_bin/ffmpeg
  echo "note: no working ffmpeg here: videos are written by benchmarks/ffmpeg_standin.py (OpenCV, mp4v)" >&2
fi
exec "$PYTHON" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
