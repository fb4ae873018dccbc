#!/usr/bin/env bash
# One prepared GPU check (issue 16): everything in this repository that needs a GPU, in at most about
# 9 minutes on one H100/H200 of a fresh machine that has only the repository and no internet.
#
#   bash benchmarks/gpu_check.sh --wheels DIR            on the GPU machine
#   bash benchmarks/gpu_check.sh --wheels DIR --dry-run  anywhere: checks paths, wheels and arguments and
#                                                        rehearses every step at its smallest on the CPU
#   bash benchmarks/gpu_check.sh --prepare-wheels DIR    on a machine that reaches PyPI: fills DIR
#
# Steps (each under its own time limit; a failed step is reported and the others still run):
#   1. install: the wheels in DIR into a private folder (pip --no-index --no-deps), ltuda from this
#      repository on PYTHONPATH. The interpreter (--python, default python3) brings the CUDA build of
#      torch, or DIR holds one (torch-*+cu*.whl) and it is installed too.
#   2. speed: benchmarks/speed.py --device cuda --sizes 200: stage-1 and stage-2 training throughput
#      against the reference-style step (bf16 autocast and channels_last on), peak GPU memory of a
#      step, and `ltuda predict` of a 512x512x200 volume, file to file, with its peak GPU memory.
#   3. accuracy: benchmarks/accuracy.py, paper preset, toy protocol, LTUDA and labelled-only at once as
#      two processes on the one GPU, with as many iterations as the measured speed fits in --accuracy-s.
#   4. ddp: a 2-process `torchrun -m ltuda train` smoke run on the GPU(s) (gloo when two ranks share one
#      GPU: NCCL cannot).
#   5. report: OUT/gpu_check.json and gpu_check.md (speed.json/.md and accuracy.json/.md beside them).
#
# Preparing DIR (the GPU image of this workplace already has CUDA torch, numpy, scipy, matplotlib and
# psutil; what ltuda needs beside them is monai, SimpleITK and pynrrd, ~60 MB of wheels):
#   bash benchmarks/gpu_check.sh --prepare-wheels .whl [--python-version 3.12]
# which runs `pip download --no-deps --only-binary=:all:` for that Python on manylinux x86-64. For a
# machine without CUDA torch add its wheel, e.g. `pip download --no-deps -d .whl torch==2.11.0
# --index-url https://download.pytorch.org/whl/cu128` (and its nvidia-* wheels), which is far larger.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
WHEELS=""
OUT=""
WORK=""
DRY=0
BUDGET_S=540
ACCURACY_S=270
PREPARE=""
PY_VERSION=3.12
NEEDED=(monai SimpleITK pynrrd)  # pip names; their versions are pinned in PINS below
PINS=(monai==1.6.1 SimpleITK==2.5.7 pynrrd==1.1.3)

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
fail() { echo "gpu_check: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:-}"; shift 2 ;;
    --python) PY="${2:-}"; shift 2 ;;
    --out) OUT="${2:-}"; shift 2 ;;
    --work) WORK="${2:-}"; shift 2 ;;
    --budget-s) BUDGET_S="${2:-}"; shift 2 ;;
    --accuracy-s) ACCURACY_S="${2:-}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --prepare-wheels) PREPARE="${2:-}"; shift 2 ;;
    --python-version) PY_VERSION="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; fail "unknown argument: $1 (see --help)" ;;
  esac
done
for number in "$BUDGET_S" "$ACCURACY_S"; do
  [[ "$number" =~ ^[0-9]+$ ]] || fail "--budget-s and --accuracy-s take whole seconds, got '$number'"
done

if [ -n "$PREPARE" ]; then  # on a machine that reaches PyPI
  mkdir -p "$PREPARE" || fail "$PREPARE cannot be created"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$PREPARE" "${PINS[@]}" \
    || fail "pip could not download the wheels into $PREPARE (is PyPI reachable?)"
  ls -l "$PREPARE"
  exit 0
fi

command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (pass --python PATH)"
[ -f "$REPO/LTUDATrainer/ltuda/__init__.py" ] && [ -f "$REPO/benchmarks/speed.py" ] \
  && [ -f "$REPO/benchmarks/accuracy.py" ] && [ -f "$REPO/benchmarks/gpu_check_report.py" ] \
  || fail "$REPO is not a complete LTUDA checkout (LTUDATrainer/ltuda, benchmarks/*.py)"
if [ "$DRY" = 1 ]; then
  WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}"
  OUT="${OUT:-$WORK/results}"
else
  WORK="${WORK:-${TMPDIR:-/tmp}/ltuda_gpu_check}"
  OUT="${OUT:-$REPO/benchmarks/results/gpu}"
fi
mkdir -p "$WORK" "$OUT" || fail "cannot create $WORK or $OUT"
touch "$OUT/.write_test" && rm -f "$OUT/.write_test" || fail "$OUT is not writable (pass --out DIR)"
STEPS="$WORK/steps.tsv"
: > "$STEPS"
STARTED=$(date +%s)
elapsed() { echo $(( $(date +%s) - STARTED )); }
say() { echo "[gpu_check $(elapsed)s] $*" >&2; }

# run_step NAME LIMIT_S COMMAND...: runs it under `timeout`, logs to WORK/NAME.log, records the outcome
run_step() {
  local name="$1" limit="$2"; shift 2
  local begun rc
  begun=$(date +%s)
  say "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - begun ))" "$limit" >> "$STEPS"
  if [ "$rc" = 0 ]; then say "$name: ok"; else say "$name: FAILED (exit $rc; log $WORK/$name.log):"; tail -5 "$WORK/$name.log" >&2; fi
  return 0
}

# ----- 1. install -----
SITE="$WORK/site"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || fail "--wheels $WHEELS is not a folder (see --help: Preparing DIR)"
  for name in "${NEEDED[@]}"; do
    ls "$WHEELS"/*.whl 2>/dev/null | grep -qi "/${name}-" \
      || fail "$WHEELS has no $name wheel: prepare the folder with --prepare-wheels (see --help)"
  done
  "$PY" - "$WHEELS" <<'EOF' || fail "a wheel in $WHEELS is damaged (not a zip file): download it again"
import sys, zipfile, pathlib
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        if archive.testzip() is not None:
            raise SystemExit(f"{wheel} is damaged")
EOF
fi
if [ "$DRY" = 1 ]; then
  # The wheels are for the GPU machine's Python; here the checkout's own environment runs the rehearsal.
  printf 'install\t0\t0\t60\n' >> "$STEPS"
  say "install: dry run, wheels checked${WHEELS:+ in $WHEELS}; the rehearsal uses $PY's own packages"
elif [ -n "$WHEELS" ]; then
  run_step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$REPO/LTUDATrainer${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, monai, SimpleITK, nrrd, ltuda" 2> "$WORK/imports.log" \
  || { cat "$WORK/imports.log" >&2; fail "ltuda's packages do not import with $PY (pass --wheels DIR; see --help)"; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$DRY" = 0 ] && [ "$GPUS" = 0 ]; then
  fail "$PY's torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__)')): use --dry-run here, or a CUDA build"
fi
say "python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), GPUs: $GPUS"

# ----- 2. speed -----
if [ "$DRY" = 1 ]; then
  run_step speed 300 env OMP_NUM_THREADS=1 "$PY" "$REPO/benchmarks/speed.py" --quick --device cpu --sizes 40 --out "$OUT"
else
  run_step speed 200 "$PY" "$REPO/benchmarks/speed.py" --device cuda --sizes 200 --out "$OUT"
fi

# ----- 3. accuracy: LTUDA and labelled-only at once, as many iterations as fit -----
LEFT=$(( BUDGET_S - $(elapsed) - 90 ))  # keep time for the DDP smoke run and the report
ACC_BUDGET=$(( ACCURACY_S < LEFT ? ACCURACY_S : LEFT ))
PLAN=$("$PY" "$REPO/benchmarks/gpu_check_report.py" plan --speed "$OUT/speed.json" --seconds "$ACC_BUDGET")
read -r EPOCHS ITERS <<< "$PLAN"
PRESET=paper
THREADS=4
SMOKE=()
if [ "$DRY" = 1 ]; then  # the same command at its smallest: fast preset, 32x32 slices, 2 iterations per epoch
  PRESET=fast; THREADS=1; SMOKE=(--smoke); EPOCHS=1; ITERS=2; ACC_BUDGET=300
fi
if [ "$ACC_BUDGET" -lt 60 ]; then
  printf 'accuracy\tskipped\t0\t%s\n' "$ACC_BUDGET" >> "$STEPS"
  say "accuracy: skipped, only ${ACC_BUDGET}s left in the budget"
else
  say "accuracy plan for ${ACC_BUDGET}s: $EPOCHS epochs per stage of $ITERS iterations"
  run_step accuracy $(( ACC_BUDGET + 90 )) env OMP_NUM_THREADS=$THREADS "$PY" "$REPO/benchmarks/accuracy.py" \
    --protocol toy --preset $PRESET --methods labeled-only,ltuda --seeds 1 --jobs 2 ${SMOKE[@]+"${SMOKE[@]}"} \
    --set "epochs_stage1=$EPOCHS" --set "epochs_stage2=$EPOCHS" --set "iterations_per_epoch=$ITERS" \
    --out "$OUT" --work "$WORK/accuracy"
fi

# ----- 4. DDP smoke run: 2 processes -----
DDP_BACKEND=nccl
DEVICE=cuda
if [ "$DRY" = 1 ]; then DDP_BACKEND=gloo; DEVICE=cpu; elif [ "$GPUS" -lt 2 ]; then DDP_BACKEND=gloo; fi
"$PY" -m ltuda phantoms --out "$WORK/ddp_phantoms" --cases-per-site 2 --test-cases 1 --size 64 > /dev/null 2>&1 \
  || fail "could not write the DDP smoke run's phantoms into $WORK/ddp_phantoms"
rm -rf "$WORK/ddp_model"
run_step ddp 150 env LTUDA_DIST_BACKEND="$DDP_BACKEND" OMP_NUM_THREADS=1 bash -c \
  '"$0" -m torch.distributed.run --nproc_per_node 2 --standalone -m ltuda train --dataset "$1" --out "$2" \
   --preset fast --device "$3" --epochs-stage1 1 --epochs-stage2 1 --iterations-per-epoch 8 --progress jsonl > "$4"' \
  "$PY" "$WORK/ddp_phantoms" "$WORK/ddp_model" "$DEVICE" "$OUT/ddp_smoke.jsonl"

# ----- 5. report -----
"$PY" "$REPO/benchmarks/gpu_check_report.py" summarise --out "$OUT" --steps "$STEPS" --ddp-backend "$DDP_BACKEND" \
  --seconds "$(elapsed)" --command "bash benchmarks/gpu_check.sh ${WHEELS:+--wheels $WHEELS}$([ "$DRY" = 1 ] && echo ' --dry-run')" \
  $([ "$DRY" = 1 ] && echo --dry-run) || fail "the report could not be written into $OUT"
say "done in $(elapsed)s: $OUT/gpu_check.md"
