#!/usr/bin/env bash
# The accuracy benchmark on a GPU machine that has only this repository and no internet, in one call with
# a deadline: many training runs at once on one GPU, so a learning-curve point that takes a day of two CPU
# cores takes minutes.
#
#   bash benchmarks/gpu_accuracy.sh --wheels DIR --out DIR --deadline-s S -- ARGS...
#
# ARGS go to benchmarks/accuracy.py as they are (e.g. --protocol toy --learning-curve 8 --seeds 5 --jobs 10);
# --out and --work are added. DIR holds the wheels of what ltuda needs beside the machine's own CUDA torch
# (monai, SimpleITK, pynrrd: `bash benchmarks/gpu_check.sh --prepare-wheels DIR`). Without --wheels the
# interpreter must import them already (a dry run on a CPU machine: add --smoke to ARGS).
#
# Every run is saved to OUT/accuracy.json as it finishes (the runs record the GPU in `packages`, so they
# pair only with each other). At the deadline the benchmark is stopped, and OUT/progress.json says how far
# each unfinished run got (stage, epoch, seconds), so the next call can be sized.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
WHEELS=""
OUT=""
WORK="${TMPDIR:-/tmp}/ltuda_gpu_accuracy"
DEADLINE_S=500
fail() { echo "gpu_accuracy: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:-}"; shift 2 ;;
    --out) OUT="${2:-}"; shift 2 ;;
    --work) WORK="${2:-}"; shift 2 ;;
    --python) PY="${2:-}"; shift 2 ;;
    --deadline-s) DEADLINE_S="${2:-}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument: $1 (accuracy.py's arguments go after --; see --help)" ;;
  esac
done
[ -n "$OUT" ] || fail "--out DIR is required"
[[ "$DEADLINE_S" =~ ^[0-9]+$ ]] || fail "--deadline-s takes whole seconds, got '$DEADLINE_S'"
[ $# -gt 0 ] || fail "no accuracy.py arguments after -- (e.g. -- --protocol toy --learning-curve 8 --seeds 5)"
mkdir -p "$OUT" "$WORK" || fail "cannot create $OUT or $WORK"

if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || fail "the wheels in $WHEELS did not install"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO/LTUDATrainer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$PY" -c "import torch, monai, SimpleITK, nrrd, ltuda" || fail "ltuda's packages do not import (pass --wheels DIR)"
"$PY" -c "import torch; print('torch', torch.__version__, 'GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

started=$(date +%s)
"$PY" "$REPO/benchmarks/accuracy.py" "$@" --out "$OUT" --work "$WORK/work" > "$OUT/accuracy.log" 2>&1 &
leader=$!
while kill -0 "$leader" 2> /dev/null && [ $(( $(date +%s) - started )) -lt "$DEADLINE_S" ]; do sleep 1; done
if kill -0 "$leader" 2> /dev/null; then  # its pool's workers are its children, and only they are stopped
  echo "gpu_accuracy: deadline of ${DEADLINE_S}s reached; stopping the benchmark" >> "$OUT/accuracy.log"
  workers=$(pgrep -P "$leader")  # read before the leader goes: then they are no longer its children
  kill -TERM $workers "$leader"; sleep 5; kill -KILL $workers "$leader"
fi 2> /dev/null
wait "$leader" 2> /dev/null
cat "$OUT/accuracy.log"

# How far each run got: finished ones are in accuracy.json, the others' last checkpoint says where they were.
"$PY" - "$WORK/work" "$OUT/progress.json" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys
from pathlib import Path

import torch

runs = {}
for last in sorted(Path(sys.argv[1]).glob("*/*/*/seed*/model/checkpoints/last.pt")):
    model_dir = last.parents[1]
    name = "/".join(model_dir.parts[-5:-1])
    saved = torch.load(last, map_location="cpu", weights_only=True)
    meta = json.loads((model_dir / "model.json").read_text()) if (model_dir / "model.json").is_file() else {}
    training = meta.get("training", {})
    runs[name] = {"completed": bool(training.get("completed")), "stage_index": int(saved["stage_index"]),
                  "epoch": int(saved["epoch"]), "seconds": float(saved["elapsed"]),
                  "epochs": training.get("epochs"), "device": training.get("device")}
Path(sys.argv[2]).write_text(json.dumps({"wall_s": int(sys.argv[3]), "runs": runs}, indent=1) + "\n")
print(json.dumps(runs, indent=1))
EOF
