#!/usr/bin/env bash
# Refresh the GPU numbers of BENCHMARKS.md in one short run (~10 min on one H200).
#
#   bash benchmarks/gpu.sh [OUT_DIR [PHASE...]]   # from the repository root; OUT_DIR defaults to $OUT or ./gpu-bench
#
# The GPU box may have no internet: whatever it lacks is installed offline from
# wheels carried in ./.whl (pip install --no-index --find-links .whl); a package
# that is neither installed nor in .whl is reported and the backends needing it
# show up as "unavailable" in the tables instead of stopping the run. Every
# phase has its own time limit and writes its JSON as it goes, so a phase that
# runs long loses only its own tail. Results: OUT_DIR/{gpu_*.json,*.md,gpu.log}.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-bench}}
PHASES=${*:2}
PHASES=${PHASES:-"encoder registration refine train engines ort compile"}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu.log"
START=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
PY=${PYTHON:-python}

# ---------------------------------------------------------------- 1. what the box lacks
have() { $PY -c "import $1" >/dev/null 2>&1; }
install() {  # install <import name> <pip requirement>
    if have "$1"; then return 0; fi
    if [ -d .whl ]; then
        log "installing $2 from .whl/"
        $PY -m pip install -q --no-index --find-links .whl "$2" >>"$LOG" 2>&1 || log "could not install $2 from .whl/"
    else
        log "$2 missing and no .whl/ folder: backends needing it will be reported unavailable"
    fi
}
for spec in numpy:numpy scipy:scipy nibabel:nibabel typer:typer rich:rich safetensors:safetensors \
            onnx:onnx onnxruntime:onnxruntime-gpu tensorrt:tensorrt nilearn:nilearn; do
    install "${spec%%:*}" "${spec#*:}"
done
if ! have torch; then install torch torch; fi
if ! $PY -c "import gvsl.cli.bench, gvsl.runtime" >/dev/null 2>&1; then
    log "installing gvsl (editable, no dependencies, no build isolation)"
    $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || log "gvsl install failed"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1
$PY - >>"$LOG" 2>&1 <<'EOF'
import importlib
for m in ("torch", "onnxruntime", "tensorrt", "onnx", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__, e)
try:
    import torch
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    import onnxruntime as ort
    print("ort providers", ort.get_available_providers())
except Exception as e:
    print("probe failed", e)
EOF
log "environment ready"

# ---------------------------------------------------------------- 2. the measurements
export GVSL_CACHE_DIR="$OUT_DIR/.cache"   # engines / timing caches of this run only
bench() {  # bench <seconds> <json name> <gvsl bench options...>
    local secs=$1 name=$2
    shift 2
    log "gvsl bench $* (limit ${secs}s)"
    timeout --signal=INT --kill-after=20 "$secs" $PY -m gvsl.cli.main bench --device cuda --time-limit $(( secs * 2 / 3 )) \
        --json "$OUT_DIR/$name.json" --markdown "$OUT_DIR/$name.md" -q "$@" >>"$LOG" 2>&1
    log "exit $? -> $OUT_DIR/$name.json"
}
# Phases in priority order, each with its own limit (seconds); ~9 min in all. Pass phase names to
# run a subset: bash benchmarks/gpu.sh OUT_DIR encoder train
for phase in $PHASES; do
    case $phase in
    encoder)  # the targets: encoder throughput at batch 8, share of the bf16 peak; and batch 1
        bench 100 gpu_encoder --kind encoder --sizes 128 --batch 8,1 --repeats 10 --warmup 3 \
            --backend torch,torch-bf16,torch-fp16,torch-cudagraph ;;
    registration)  # target: <= 12 ms per pair at batch 1
        bench 60 gpu_registration --kind registration --sizes 128 --batch 1 --repeats 20 --warmup 3 \
            --backend torch,torch-bf16,torch-cudagraph ;;
    refine)  # issue 11's target: <= 100 ms for a 160^3 pair, network + refinement (torch CUDA path)
        log "benchmarks/refine_gpu.py (limit 90s)"
        timeout --signal=INT --kill-after=20 90 $PY benchmarks/refine_gpu.py --device cuda --size 160 --repeats 10 \
            >"$OUT_DIR/gpu_refine.md" 2>>"$LOG"
        log "exit $? -> $OUT_DIR/gpu_refine.md" ;;
    train)  # target: >= 5x the official-style samples/s
        bench 90 gpu_train --train-only --sizes 128 --train-batch 4 --repeats 5 --warmup 2 ;;
    engines)  # native TensorRT encoder engines (each build takes a minute or more)
        bench 150 gpu_engines --kind encoder --sizes 128 --batch 8 --repeats 10 --warmup 3 \
            --backend torch,tensorrt-bf16,tensorrt-fp16 ;;
    engines_registration)  # native TensorRT registration, batch 1 (not in the default set: time)
        bench 150 gpu_engines_registration --kind registration --sizes 128 --batch 1 --repeats 20 --warmup 3 \
            --backend torch,tensorrt-bf16,tensorrt-fp16 ;;
    ort)  # ONNX Runtime CUDA / TensorRT execution providers, I/O binding
        bench 80 gpu_ort --kind encoder --sizes 128 --batch 8 --repeats 10 --warmup 3 \
            --backend torch,ort-cuda,ort-cuda-fp16,ort-tensorrt ;;
    compile)  # torch.compile (compiles for a minute or more)
        bench 60 gpu_compile --kind encoder --sizes 128 --batch 8 --repeats 10 --warmup 2 \
            --backend torch,torch-compile --no-memory ;;
    *) log "unknown phase $phase (encoder registration refine train engines engines_registration ort compile)" ;;
    esac
done
log "done; tables:"
cat "$OUT_DIR"/*.md >>"$LOG" 2>/dev/null
ls -la "$OUT_DIR" | tee -a "$LOG"
