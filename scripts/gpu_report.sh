#!/usr/bin/env bash
# Every GPU table in one run (scripts/gpu_report.py): bash scripts/gpu_report.sh OUT_DIR [gpu_report.py flags]
#
# On a machine that has torch but not this project's other packages, carry them as wheels in .whl/ (or $WHEELS):
#   pip download --no-deps --only-binary=:all: -d .whl open_clip_torch==3.3.0 timm ... (see docs/benchmarks.md)
# they are installed into /tmp/site first; the project itself runs from this checkout (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_report.sh OUT_DIR [--quick] [--device cpu]}"
shift
WHEELS="${WHEELS:-.whl}"
SITE=""
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  SITE="/tmp/site:"
fi
export PYTHONPATH="${SITE}${PWD}${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import open_clip, open_clip_rank, webdataset" || { echo "gpu_report: missing packages (carry wheels in $WHEELS)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec python3 scripts/gpu_report.py --out "$OUT" "$@"
