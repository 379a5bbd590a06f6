#!/usr/bin/env bash
# The one prepared GPU run of issue 19, in four steps, each with its own timeout and log, inside one time budget:
#   1. the machine: device, driver, versions, installed packages; ensemblekit on PYTHONPATH (no install, no
#      dependencies), missing wheels from .whl/, every import checked; Fashion-MNIST staged from the folder carried
#   2. the CUDA tests (pytest -m cuda): strategy equivalence, predict/anytime, a bf16 training step
#   3. ensemblekit bench --device cuda, every section (section 2, the longest, last and on its own)
#   4. HNE Table 1 on Fashion-MNIST with --full, its epochs fitted to the time left (--time-budget)
# A failed step does not stop the later ones (a failed import or a missing GPU stops everything: device reasons).
#
#   bash benchmarks/gpu_run.sh                # on the GPU machine
#   bash benchmarks/gpu_run.sh --cpu-smoke    # the same steps on the CPU, tiny settings (tests/bench/test_gpu_script.py)
#
# Environment (all optional):
#   OUT                        where the results go, at most 8 files (default /tmp/ensemblekit-gpu-run)
#   EK_WORK                    scratch folder: the table's checkpoints (default /dev/shm/ensemblekit-gpu-work
#                              when /dev/shm has 24 GB free, else /tmp/ensemblekit-gpu-work)
#   EK_BUDGET                  seconds for the whole script (default 450; smoke 55)
#   EK_STEPS                   steps to run after step 1 (default "2 3 4"; 3 is 3a and 3b)
#   EK_LIMIT_2, EK_LIMIT_3A, EK_LIMIT_3B, EK_LIMIT_4
#                              most seconds of each step (default 90, 100, 140, 300; all within EK_BUDGET)
#   EK_PYTHON                  the Python with torch (default python3)
#   EK_EXECUTION               execution of the table (default: auto if the CUDA tests passed, else loop)
#   EK_CPU_SMOKE=1             same as --cpu-smoke
#   EK_DEVICE                  the device of the full-size run (default cuda; cpu only to check the commands start)
#   ENSEMBLEKIT_FASHION_MNIST  folder with the four Fashion-MNIST .gz files (default .gpu/fashion-mnist)
#
# Files in $OUT: summary.log env.log cuda_tests.log bench.log hne.log hne_table1.json hne_table1.md
# hne_accuracy_vs_flops.png
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
SMOKE=${EK_CPU_SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $arg (only --cpu-smoke)" >&2; exit 2 ;;
  esac
done
[ "$SMOKE" = 0 ] || SMOKE=1

OUT=${OUT:-/tmp/ensemblekit-gpu-run}
# scratch: the table's checkpoints (1.2 GB per epoch of a resnet-18 tree) go to memory where there is room for them
WORK=${EK_WORK:-}
if [ -z "$WORK" ]; then
  WORK=/tmp/ensemblekit-gpu-work
  shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  [ "${shm_free:-0}" -gt $((24 * 1024 * 1024)) ] && [ -w /dev/shm ] && WORK=/dev/shm/ensemblekit-gpu-work
fi
PY=${EK_PYTHON:-python3}
STEPS=${EK_STEPS:-2 3 4}
words=" "
for step in $STEPS; do [ "$step" = 3 ] && words+="3a 3b " || words+="$step "; done
STEPS=$words
if [ "$SMOKE" = 1 ]; then
  # the same commands on tiny settings; the bench runs two cheap sections (tests/bench/test_bench.py runs them all)
  # one thread: on a shared CPU, torch's spinning threads can make tiny calls 100 times slower
  BUDGET=${EK_BUDGET:-55}; DEVICE=cpu
  BENCH_A=(--smoke --threads 1 --sections 4); BENCH_B=(--smoke --threads 1 --sections 2)
  TABLE_SIZE=(--smoke --depth 1); WORKERS=2  # data workers as on the GPU, fewer
  export OMP_NUM_THREADS=1
else
  BUDGET=${EK_BUDGET:-450}; DEVICE=${EK_DEVICE:-cuda}
  BENCH_A=(--sections 1,3,4,5,6,7,8); BENCH_B=(--sections 2); TABLE_SIZE=(); WORKERS=6
fi
mkdir -p "$OUT" "$WORK"
SUMMARY=$OUT/summary.log
: > "$SUMMARY"
START=$SECONDS
FAILED=0

if [ -z "${ENSEMBLEKIT_FASHION_MNIST:-}" ] && [ -d "$ROOT/.gpu/fashion-mnist" ]; then
  export ENSEMBLEKIT_FASHION_MNIST=$ROOT/.gpu/fashion-mnist
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000  # the bench's allocator settings: no re-exec
export MPLBACKEND=Agg

left() { echo $((BUDGET - (SECONDS - START))); }

# limit WANTED: WANTED seconds, or what is left of the budget (5 s kept back), at least 1
limit() {
  local want=$1 l
  l=$(($(left) - 5))
  ((want > l)) && want=$l
  ((want < 1)) && want=1
  echo "$want"
}

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME LOG SECONDS COMMAND...: COMMAND under timeout, its output to the log and to stdout; the verdict to summary.log
run() {
  local name=$1 log=$2 seconds t0 rc verdict
  seconds=$(limit "$3")
  shift 3
  t0=$SECONDS
  echo "### $name: $* (timeout ${seconds} s, $(left) s of the budget left)" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$OUT/$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) verdict=ok ;;
    124|137) verdict="TIMED OUT" ;;
    *) verdict=FAILED ;;
  esac
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  note "$name: $verdict (rc $rc) in $((SECONDS - t0)) s, limit ${seconds} s"
  return "$rc"
}

note "gpu_run.sh $([ "$SMOKE" = 1 ] && echo --cpu-smoke) on ${HOSTNAME:-?} at $(date -u +%FT%TZ): device $DEVICE, budget ${BUDGET} s, steps 1 $STEPS, scratch $WORK"

# ------------------------------------------------------------------ step 1: the machine
{
  echo "## machine"; uname -a; echo "cores: $(getconf _NPROCESSORS_ONLN)"; free -g 2>/dev/null | head -2; df -h "$WORK" 2>/dev/null | tail -1
  echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    timeout 20 nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  echo "## python: $(command -v "$PY") $("$PY" --version 2>&1)"
  timeout 60 "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|torchvision|torchaudio|timm|torchmetrics|torchensemble|triton|numpy|einops|pluggy|scikit-learn|matplotlib|safetensors|tqdm|rich|pyyaml|pytest|pytest-timeout|pytest-xdist|hypothesis|nvidia-cudnn[a-z0-9-]*|nvidia-cublas[a-z0-9-]*) '
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

# wheels carried in .whl/ for packages this Python lacks (torchensemble: bench section 3)
shopt -s nullglob
wheels=()
for whl in "$ROOT"/.whl/*.whl; do
  module=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is not None)" && wheels+=("$whl")
done
if [ ${#wheels[@]} -gt 0 ]; then
  run "step 1 wheels" env.log 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

cat > "$WORK/check.py" <<'PY'
import importlib, os, sys, time
t = time.perf_counter()
required = ["torch", "torchvision", "timm", "einops", "pluggy", "sklearn", "matplotlib", "torchmetrics", "safetensors",
            "tqdm", "rich", "yaml", "pytest", "hypothesis", "ensemblekit", "ensemblekit.cli.main",
            "ensemblekit.bench.sections", "ensemblekit.bench.memory", "ensemblekit.reproduce.hne_table1",
            "ensemblekit.training.trainer", "ensemblekit.training.data"]
bad = []
for name in required + ["torchensemble"]:
    try:
        module = importlib.import_module(name)
        print(f"import {name}: ok {getattr(module, '__version__', '')}")
    except Exception as err:
        print(f"import {name}: FAILED {type(err).__name__}: {err}")
        if name in required:
            bad.append(name)
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, "
          f"bf16: {torch.cuda.is_bf16_supported()}")
    x = torch.randn(1024, 1024, device="cuda")
    print(f"a matrix product on the GPU: {float((x @ x).norm()):.1f}")
elif sys.argv[1] == "cuda":
    print("NO CUDA DEVICE: torch sees no GPU")
    sys.exit(3)
from ensemblekit.training.data import load_dataset
for split in ("trainval", "test"):
    ds, info = load_dataset("fashion-mnist", split)
    print(f"fashion-mnist {split}: {len(ds)} images of {info.input_shape}, from {info.source}")
print(f"checks took {time.perf_counter() - t:.1f} s")
sys.exit(1 if bad else 0)
PY
if ! run "step 1 imports, device and data" env.log 90 "$PY" "$WORK/check.py" "$DEVICE"; then
  note "stopping: the imports, the device or the data failed (see env.log); nothing else can run"
  note "total $((SECONDS - START)) s of ${BUDGET} s; $FAILED step(s) failed"
  exit 1
fi

# ------------------------------------------------------------------ step 2: the CUDA tests
# only the files that hold CUDA tests are collected: another file's import error cannot stop them
TESTS_RC=skipped
if [[ $STEPS == *" 2 "* ]]; then
  mapfile -t TEST_FILES < <(grep -rlE --include='*.py' 'mark\.cuda\b' tests | sort)
  [ ${#TEST_FILES[@]} -gt 0 ] || TEST_FILES=(tests/gpu)
  run "step 2 cuda tests" cuda_tests.log "${EK_LIMIT_2:-90}" "$PY" -m pytest -m cuda "${TEST_FILES[@]}" -q -rA -p no:cacheprovider \
    --continue-on-collection-errors
  TESTS_RC=$?
fi

# ------------------------------------------------------------------ step 3: the bench, every section
if [[ $STEPS == *" 3a "* ]]; then
  run "step 3a bench ${BENCH_A[*]}" bench.log "${EK_LIMIT_3A:-100}" "$PY" -m ensemblekit bench --device "$DEVICE" \
    "${BENCH_A[@]}"
fi
if [[ $STEPS == *" 3b "* ]]; then
  run "step 3b bench ${BENCH_B[*]}" bench.log "${EK_LIMIT_3B:-140}" "$PY" -m ensemblekit bench --device "$DEVICE" \
    "${BENCH_B[@]}"
fi

# ------------------------------------------------------------------ step 4: HNE Table 1 on Fashion-MNIST, --full
if [[ $STEPS == *" 4 "* ]]; then
  if [ -n "${EK_EXECUTION:-}" ]; then EXECUTION=$EK_EXECUTION
  elif [ "$TESTS_RC" = 0 ]; then EXECUTION=auto
  else EXECUTION=loop; fi
  seconds=$(limit "${EK_LIMIT_4:-300}")
  budget=$((seconds - 15 > 10 ? seconds - 15 : 10))
  run "step 4 hne-table1 fashion-mnist --full (execution $EXECUTION)" hne.log "$seconds" \
    "$PY" -m ensemblekit reproduce hne-table1 --data fashion-mnist --full "${TABLE_SIZE[@]}" --device "$DEVICE" \
    --execution "$EXECUTION" --num-workers "$WORKERS" --time-budget "$budget" --progress none --out "$WORK/hne"
  for f in hne_table1.json hne_table1.md; do
    [ -f "$WORK/hne/$f" ] && cp "$WORK/hne/$f" "$OUT/$f"
  done
  [ -f "$WORK/hne/accuracy_vs_flops.png" ] && cp "$WORK/hne/accuracy_vs_flops.png" "$OUT/hne_accuracy_vs_flops.png"
fi

# ------------------------------------------------------------------ summary
note "total $((SECONDS - START)) s of ${BUDGET} s; $FAILED step(s) failed"
echo "## bench lines with a target"
grep -h -E -- '-> (met|NOT MET)|skipped|targets met' "$OUT/bench.log" 2>/dev/null | cut -c1-400
[ -f "$OUT/hne_table1.md" ] && cat "$OUT/hne_table1.md"
echo "## files in $OUT"
ls -l "$OUT"
cat "$SUMMARY"
[ "$FAILED" = 0 ]
