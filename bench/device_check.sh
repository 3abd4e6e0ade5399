#!/usr/bin/env bash
# One call on a GPU machine: versions, offline installs, compile check, kernel tests on CUDA,
# the kernel table (bench/kernel_table.py) and a short paper-preset training run with fused kernels.
#
#   bash bench/device_check.sh            (or: make device-check)
#
# Every step is logged with timestamps into one folder, DEVICE_CHECK_OUT, else $OUT, else
# out/device_check: device_check.log, summary.md, compile_check.json, kernel_table.md/.json and
# train_metrics.csv (train2_metrics.csv with 2+ GPUs): at most 8 files, all in that folder.
# A failed step does not stop the next; the exit status is 1 if any step failed. Steps that cannot
# run here (no .whl/ folder, deepspeed missing, one GPU) are "skipped" with the reason.
#
# Settings (environment):
#   DEVICE_CHECK_DRY=1        print the steps and their commands, run nothing
#   DEVICE_CHECK_STEPS="..."  run only these steps (names as in the dry run), e.g. "install table"
#   DEVICE_CHECK_BUDGET_S=450 wall-clock budget of the whole check; each step gets at most what is left
#   PYTHON=python3            the interpreter that holds torch (CUDA build) and triton
#   DEVICE_CHECK_TRAIN_ARGS   the training run's settings (default: --preset paper --max-steps 30 --kernels fused)
# Missing Python packages travel as wheels in .whl/ (bench/fetch_device_wheels.sh fetches them).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export REPO
export PY=${PYTHON:-python3}
DIR=${DEVICE_CHECK_OUT:-${OUT:-out/device_check}}
case $DIR in /*) ;; *) DIR=$REPO/$DIR ;; esac
export DIR
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
DRY=${DEVICE_CHECK_DRY:-0}
export SITE=${DEVICE_CHECK_SITE:-/tmp/site}  # wheels from .whl/ are installed here (pip --target)
export TRAIN_ARGS=${DEVICE_CHECK_TRAIN_ARGS:---preset paper --max-steps 30 --kernels fused}

ALL_STEPS=(env wheels install compile tests table train train-2ranks)
declare -A LIMIT=([env]=30 [wheels]=90 [install]=60 [compile]=120 [tests]=240 [table]=180 [train]=180
                  [train-2ranks]=150)
declare -A WHAT=(
  [env]="nvidia-smi; $PY: python, torch, CUDA, triton versions, GPUs, missing packages"
  [wheels]="$PY -m pip install --no-index --no-deps --target $SITE .whl/*.whl (sdists: DS_BUILD_OPS=0 --no-build-isolation); PYTHONPATH=$SITE (skipped without .whl/)"
  [install]="$PY -m pip install --no-index --no-deps --no-build-isolation -e . (else a sitecustomize alias of srcid.kernels); import srcid.kernels"
  [compile]="env -u TRITON_INTERPRET $PY -m kernels.compile_check --json DIR/compile_check.json (spills reported, compile errors fail)"
  [tests]="$PY -m pytest -q -rfEs tests/ops/test_nearest_code.py tests/ops/test_ema.py tests/ops/test_club.py tests/ops/test_dispatch.py tests/test_fused_training_step.py"
  [table]="$PY bench/kernel_table.py --out DIR"
  [train]="$PY -m srcid.cli data synth --preset small; $PY launcher/train.py --model srcid $TRAIN_ARGS --quiet (bf16 from srcid/train/ds_config_gpu.json); clips/s and replica_check"
  [train-2ranks]="$PY -m deepspeed.launcher.runner --num_gpus 2 launcher/train.py (same run on 2 ranks; only with 2+ GPUs)"
)

selected_steps() {
  local step
  for step in "${ALL_STEPS[@]}"; do
    if [ -z "${DEVICE_CHECK_STEPS:-}" ] || [[ " $DEVICE_CHECK_STEPS " == *" $step "* ]]; then
      echo "$step"
    fi
  done
}

for step in ${DEVICE_CHECK_STEPS:-}; do
  if [[ " ${ALL_STEPS[*]} " != *" $step "* ]]; then
    echo "device_check: DEVICE_CHECK_STEPS: unknown step '$step' (steps: ${ALL_STEPS[*]})" >&2
    exit 2
  fi
done

if [ "$DRY" = 1 ]; then
  mapfile -t steps < <(selected_steps)
  echo "device check (dry run): ${#steps[@]} steps into $DIR, budget ${BUDGET}s"
  i=0
  for step in "${steps[@]}"; do
    i=$((i + 1))
    echo "step $i/${#steps[@]} $step (limit ${LIMIT[$step]}s): ${WHAT[$step]//DIR/$DIR}"
  done
  exit 0
fi

mkdir -p "$DIR"
export WORK=${DEVICE_CHECK_WORK:-$(mktemp -d /tmp/device_check.XXXXXX)}  # data, runs, step outputs
export SHIM=$WORK/shim  # sitecustomize.py aliasing srcid.kernels when pip -e is not possible
mkdir -p "$WORK" "$SHIM"
LOG=$DIR/device_check.log
STATUS=$WORK/status.tsv
: >"$LOG"
: >"$STATUS"
export PYTHONPATH=$SITE:$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter

log() { printf '%(%H:%M:%S)T %s\n' -1 "$*" | tee -a "$LOG"; }
stamp() { local line; while IFS= read -r line; do printf '%(%H:%M:%S)T [%s] %s\n' -1 "$1" "$line"; done; }
gpu_count() { "$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0; }

# ------------------------------------------------------------------------------------------------
# the steps: each prints what it does; exit 0 ok, 77 skipped (last line "skipped: reason"), else failed
# ------------------------------------------------------------------------------------------------

step_env() {
  nvidia-smi || echo "nvidia-smi failed (rc $?)"
  "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
import triton
print("triton", triton.__version__)
missing = []
for name in ("deepspeed", "webdataset", "pytest", "pytest_benchmark", "tqdm", "numpy", "safetensors",
             "matplotlib", "h5py", "tensorboard", "hjson", "pydantic"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("missing or broken:", "; ".join(missing) or "none")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

step_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl) sdists=(.whl/*.tar.gz) sdist
  if [ $((${#wheels[@]} + ${#sdists[@]})) -eq 0 ]; then
    echo "skipped: no .whl/ folder with wheels (bench/fetch_device_wheels.sh; carry .whl)"
    return 77
  fi
  mkdir -p "$SITE"
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" || return 1
  fi
  for sdist in "${sdists[@]}"; do  # deepspeed is published as an sdist only: build it without its ops
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target "$SITE" "$sdist" || return 1
  done
  echo "installed into $SITE: ${wheels[*]##*/} ${sdists[*]##*/}"
}

write_shim() {
  cat >"$SHIM/sitecustomize.py" <<EOF
# Written by bench/device_check.sh: import srcid.kernels from $REPO/kernels (what pip install -e maps).
import importlib.util, sys
from importlib.abc import MetaPathFinder

class _SrcidKernels(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "srcid.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, "$REPO/kernels/__init__.py", submodule_search_locations=["$REPO/kernels"])

sys.meta_path.append(_SrcidKernels())
EOF
}

step_install() {
  if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    echo "pip install -e . done"
  else
    echo "pip install -e . failed: srcid.kernels aliased by $SHIM/sitecustomize.py instead"
    write_shim
  fi
  "$PY" -c "import srcid.kernels, srcid.ops, kernels; print('srcid.kernels from', srcid.kernels.__file__)"
}

step_compile() {
  env -u TRITON_INTERPRET "$PY" -m kernels.compile_check --json "$DIR/compile_check.json"
  echo "compile_check exit status $? (1 also when a config spills)"
  "$PY" - "$DIR/compile_check.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
failed = [r for r in results if r["error"]]
spilled = [r for r in results if not r["error"] and r["spill_bytes"]]
print(f"RESULT compile_check: {len(results)} compiles, {len(failed)} failed, {len(spilled)} spill")
for r in failed:
    print(f"FAILED {r['kernel']} [{r['config']}] sm_{r['arch']}: {r['error']}")
sys.exit(1 if failed or not results else 0)
EOF
}

step_tests() {
  local rc
  "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/ops/test_nearest_code.py tests/ops/test_ema.py \
    tests/ops/test_club.py tests/ops/test_dispatch.py tests/test_fused_training_step.py 2>&1 | tee "$WORK/pytest.txt"
  rc=${PIPESTATUS[0]}
  echo "RESULT pytest: $(grep -E 'passed|failed|error' "$WORK/pytest.txt" | tail -n 1)"
  return "$rc"
}

step_table() {
  "$PY" bench/kernel_table.py --out "$DIR"
}

trainer_missing() {
  "$PY" -c "import deepspeed, webdataset" 2>&1 | tail -n 1
  return "${PIPESTATUS[0]}"
}

train_run() {  # launcher...: SRCID on the small preset's data, TRAIN_ARGS (paper preset, 30 steps, fused kernels)
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
  "$@" launcher/train.py --model srcid --data "$WORK/data/pretrain" --out "$WORK/$RUN" $TRAIN_ARGS --quiet
}

report_run() {  # run dir, metrics copy name: clips/s of each logged window and the replica check
  cp "$1/metrics.csv" "$DIR/$2" 2>/dev/null
  "$PY" - "$1" <<'EOF'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = list(csv.DictReader(open(run / "metrics.csv")))
rates = [(r["step"], float(r["clips_per_s"])) for r in rows if r.get("clips_per_s")]
print("clips/s by logged window (step: clips/s): " + ", ".join(f"{s}: {v:.0f}" for s, v in rates))
if rates:
    print(f"RESULT clips_per_s (last window, after warm-up) = {rates[-1][1]:.0f}")
checks = [json.loads(l)["info"] for l in open(run / "events.jsonl") if '"replica_check"' in l]
print(f"RESULT replica_check = {checks[-1] if checks else 'missing'}")
sys.exit(0 if checks and checks[-1]["identical"] and rates else 1)
EOF
}

step_train() {
  local why
  if ! why=$(trainer_missing); then
    echo "skipped: the trainer needs deepspeed and webdataset: $why"
    return 77
  fi
  rm -rf "$WORK/data" "$WORK/run"
  "$PY" -m srcid.cli data synth --preset small --out "$WORK/data" || return 1
  echo "precision: bf16 on CUDA (srcid/train/ds_config_gpu.json, the trainer's default there); settings: $TRAIN_ARGS"
  RUN=run train_run "$PY" || return 1
  report_run "$WORK/run" train_metrics.csv
}

step_train_2ranks() {
  local why
  if [ "$NGPU" -lt 2 ]; then
    echo "skipped: $NGPU GPU(s); 2 ranks need 2"
    return 77
  fi
  if ! why=$(trainer_missing); then
    echo "skipped: the trainer needs deepspeed and webdataset: $why"
    return 77
  fi
  [ -d "$WORK/data/pretrain" ] || "$PY" -m srcid.cli data synth --preset small --out "$WORK/data" || return 1
  rm -rf "$WORK/run2"
  RUN=run2 train_run "$PY" -m deepspeed.launcher.runner --num_gpus 2 || return 1
  report_run "$WORK/run2" train2_metrics.csv
}

export -f step_env step_wheels write_shim step_install step_compile step_tests step_table trainer_missing \
  train_run report_run step_train step_train_2ranks

# ------------------------------------------------------------------------------------------------
# running them
# ------------------------------------------------------------------------------------------------

run_step() {
  local name=$1 left=$((BUDGET - SECONDS)) limit=${LIMIT[$1]} start=$SECONDS rc reason
  if [ "$left" -lt 15 ]; then
    log "=== $name: skipped: out of time (${left}s of the ${BUDGET}s budget left)"
    printf '%s\tskipped: out of time\t0\n' "$name" >>"$STATUS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "=== $name (limit ${limit}s): ${WHAT[$name]//DIR/$DIR}"
  : >"$WORK/$name.out"
  timeout --kill-after=10 "$limit" bash -c "step_${name//-/_}" 2>&1 | stamp "$name" | tee -a "$LOG" "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) reason=ok ;;
    77) reason=$(grep -o 'skipped: .*' "$WORK/$name.out" | tail -n 1) ;;
    124 | 137) reason="FAILED: timed out after ${limit}s" ;;
    *) reason="FAILED: exit status $rc" ;;
  esac
  log "=== $name: ${reason:-skipped} ($((SECONDS - start))s)"
  printf '%s\t%s\t%s\n' "$name" "${reason:-skipped}" "$((SECONDS - start))" >>"$STATUS"
}

write_summary() {
  {
    echo "# Device check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$STATUS"
    echo
    grep -h '\] RESULT ' "$WORK"/*.out 2>/dev/null | sed 's/^[0-9:]* \[\([^]]*\)\] RESULT /- \1: /'
    [ -f "$DIR/kernel_table.json" ] && "$PY" - "$DIR/kernel_table.json" <<'EOF'
import json, sys
table = json.load(open(sys.argv[1]))
for g in table["goals"]:
    verdict = "met" if g["met"] else "NOT met"
    print(f"- goal, {g['case']}: {g['name']} = {g['ratio']:.2f}x (target {g['target']}x): {verdict}")
for failure in table["failures"]:
    print(f"- kernel table FAILURE: {failure}")
EOF
  } >"$DIR/summary.md"
}

NGPU=0
log "device check: repo $REPO, output $DIR, work $WORK, budget ${BUDGET}s, python $(command -v "$PY")"
mapfile -t STEPS < <(selected_steps)
for step in "${STEPS[@]}"; do
  [ "$step" = train-2ranks ] && NGPU=$(gpu_count)
  export NGPU
  run_step "$step"
done
write_summary
[ -f "$DIR/kernel_table.md" ] && cat "$DIR/kernel_table.md"
cat "$DIR/summary.md" | tee -a "$LOG"
if grep -q $'\tFAILED' "$STATUS"; then
  exit 1
fi
exit 0
