#!/usr/bin/env bash
# GPU suite: build the CUDA extension, run the CUDA tests, the GPU benchmarks and one profile,
# then print one short table. Target: under 8 minutes on one H100.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root
#
# Outputs go to $OUT when set, else benchmarks/out/: one log per step, CSV rows, a trace,
# status.tsv (step, status, seconds) and summary.txt (the final table).
# Every step runs under `timeout` and within an overall budget (ICONS_GPU_BUDGET_S, default 470 s);
# a failed, timed-out or skipped step is reported in the table, never fatal.
# Needs torch, triton, transformers, peft, pybind11 (faiss and trak optional: parts that need them
# skip themselves).
# Settings: PYTHON (default python), ICONS_GPU_LAYERS (decoder layers of the llava-7b-shape
# featurize benchmark, default 8: 32 does not fit the time budget with the baseline), ICONS_GPU_BATCH (4).
set -u
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-benchmarks/out}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python}"
BUDGET="${ICONS_GPU_BUDGET_S:-470}"
LAYERS="${ICONS_GPU_LAYERS:-8}"
BATCH="${ICONS_GPU_BATCH:-4}"
START=$(date +%s)
STATUS="$OUTDIR/status.tsv"
printf 'step\tstatus\tseconds\n' > "$STATUS"
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# step NAME TIMEOUT_S CMD...: run CMD with its output in $OUTDIR/NAME.log, under min(TIMEOUT_S, budget left).
step() {
    local name="$1" limit="$2"
    shift 2
    local now left rc t0
    now=$(date +%s)
    left=$(( BUDGET - (now - START) ))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >> "$STATUS"
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local st="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st="TIMEOUT"; elif [ "$rc" -ne 0 ]; then st="FAILED rc=$rc"; fi
    printf '%s\t%s\t%s\n' "$name" "$st" "$dt" >> "$STATUS"
    echo "   $st in ${dt}s; last lines:"
    tail -n 6 "$OUTDIR/$name.log" | sed 's/^/   | /'
    return 0
}

# 0. environment (one interpreter: each import of torch costs seconds)
{
    date -Is
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not available"
    timeout 60 "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "transformers", "peft", "pybind11", "faiss", "trak", "fast_jl"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:  # absent or broken: say so, go on
        print(m, "absent", type(e).__name__)
EOF
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

# 1. the CUDA extension (nvcc); MAX_JOBS from the cores
step build 200 env ICONS_FAST_FORCE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
step ext_check 30 "$PY" -c "import icons_fast; print('has_cuda_ext', icons_fast.has_cuda_ext()); print(icons_fast.backends('cuda'))"

# 2. CUDA tests (faiss-dependent test files are skipped when faiss is absent)
IGNORE=()
"$PY" -c "import faiss" 2>/dev/null || IGNORE+=(--ignore=tests/test_faiss_index.py)
step pytest_cuda 100 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider ${IGNORE[@]+"${IGNORE[@]}"} --junitxml="$OUTDIR/pytest_cuda.xml" tests

# 3. featurize: ours vs floor vs LESS-style at LLaVA-7B shape (reduced depth: rates per layer scale)
step featurize_7b 130 "$PY" benchmarks/bench_featurize.py --config-name llava-7b-shape --layers "$LAYERS" \
    --batch "$BATCH" --repeats 3 --device cuda --csv "$OUTDIR/featurize_llava7b.csv"

# 4. Triton kernels vs cuBLAS on a stored sign matrix (one LLaVA-7B layer)
step kernels 70 "$PY" benchmarks/bench_kernels.py --repeats 5

# 5. influence op: extension vs torch materialise-then-reduce
step influence 60 "$PY" benchmarks/bench_influence.py --device cuda

# 6. projection (ours vs stored dense bf16 vs TRAK when present) and voting, in one process
step projection 60 "$PY" -m icons_fast bench --suites projection,voting --device cuda --repeats 5 \
    --csv "$OUTDIR/projection_voting.csv"

# 7. one profile of featurize (trace for Perfetto)
step profile 60 "$PY" benchmarks/profile_featurize.py --config-name llava-7b-shape --layers 4 --batch 2 \
    --device cuda --steps 2 --trace "$OUTDIR/featurize_trace_llava7b.json"

# 8. the short table
"$PY" - "$OUTDIR" > "$OUTDIR/summary.txt" 2>&1 <<'EOF'
import csv, os, sys
out = sys.argv[1]
print(f"{'step':<14}{'status':<26}{'s':>5}")
with open(os.path.join(out, "status.tsv")) as f:
    for r in list(csv.reader(f, delimiter="\t"))[1:]:
        print(f"{r[0]:<14}{r[1]:<26}{r[2]:>5}")
print()
for name in ("featurize_llava7b.csv", "projection_voting.csv"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: no rows (see the step's log)")
        continue
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if rows:
        print(f"{name}: {rows[0]['device']}, torch {rows[0]['torch']}, {rows[0]['date']}")
    print(f"  {'provider':<40}{'median s':>10}{'rate':>12}{'ratio':>8}{'TFLOP/s':>9}")
    for r in rows:
        ratio = f"{float(r['ratio']):.3f}" if r["ratio"] else ""
        tf = f"{float(r['tflops']):.3g}" if r["tflops"] else ""
        print(f"  {r['suite'][:4] + ' ' + r['provider']:<40}{float(r['median_s']):>10.4f}"
              f"{float(r['rate']):>12.1f}{ratio:>8}{tf:>9}")
    feats = {r["provider"].split(" (")[0]: r for r in rows if r["suite"] == "featurize"}
    if "ours" in feats and "less-style" in feats:
        print(f"  eta (ours / floor) = {float(feats['ours']['ratio']):.3f}; ours / less-style = "
              f"{float(feats['ours']['rate']) / float(feats['less-style']['rate']):.1f}x")
EOF
echo
cat "$OUTDIR/summary.txt"
echo "== total $(( $(date +%s) - START ))s; outputs in $OUTDIR"
