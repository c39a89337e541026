#!/usr/bin/env bash
# GPU check: the multiplex benchmark with the CPU engine running its model on CUDA.
#
# For a machine with an NVIDIA GPU, python3 with torch (CUDA) and transformers, a
# copy of this repository's working tree and no network. It installs nothing: it
# runs the code from the tree (PYTHONPATH = the repository root), first checks
# every module the benchmark imports and names the missing ones, then runs
#
#   python3 -m benchmarks.multiplex --device cuda   (one engine replica, 64 x 32 tokens,
#                                                    pool vs direct HTTP vs 2 exclusive workers)
#
# under a 240 s timeout (the whole script stays under 5 minutes), and copies the
# JSON result and the log to $OUT when $OUT is set. Extra arguments go to the
# benchmark. Environment: PYTHON (default python3), OUT, FAAS_CACHE_DIR (where
# the tiny model is built; default a fresh temporary directory).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
export FAAS_CACHE_DIR="${FAAS_CACHE_DIR:-$(mktemp -d /tmp/faas-gpu-cache-XXXXXX)}"
RESULTS="${FAAS_BENCH_RESULTS:-$REPO/benchmarks/results}"
export FAAS_BENCH_RESULTS="$RESULTS"
LOG="$(mktemp /tmp/faas-gpu-check-XXXXXX.log)"
started=$(date +%s)

copy_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp -f "$RESULTS/multiplex-cuda.json" "$OUT/" 2>/dev/null || echo "(no multiplex-cuda.json to copy)"
        cp -f "$LOG" "$OUT/gpu_check.log"
        echo "copied results to $OUT"
    fi
}

{
    echo "== nvidia-smi -L"
    nvidia-smi -L || echo "nvidia-smi failed"

    echo "== python and torch"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
"|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'

    echo "== preflight: modules the benchmark path imports"
    "$PY" - <<'EOF'
import importlib
import importlib.util
import sys

# Third-party distributions the benchmark path imports (benchmark process, pool workers,
# the CPU engine, the tiny model builder).
third_party = ["pydantic", "cloudpickle", "httpx", "platformdirs", "numpy", "rich", "fastapi",
               "uvicorn", "torch", "transformers", "tokenizers", "safetensors"]
missing = [m for m in third_party if importlib.util.find_spec(m) is None]
# And the project's own modules, imported for real (this catches anything the list misses).
for mod in ["faas", "warmpool.cpu_engine", "warmpool.cpu_engine._batcher", "warmpool.cpu_engine._tiny_model",
            "warmpool.local._worker", "benchmarks.multiplex"]:
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        missing.append(f"{exc.name} (needed by {mod})")
if missing:
    print("MISSING:", ", ".join(dict.fromkeys(missing)))
    sys.exit(3)
import torch
if not torch.cuda.is_available():
    print("torch sees no CUDA device")
    sys.exit(4)
print("all imports present")
EOF
    pre=$?
    if [ $pre -ne 0 ]; then
        echo "preflight failed (exit $pre); not running the benchmark"
        exit $pre
    fi

    echo "== multiplex --device cuda"
    rc=0
    timeout -s TERM -k 20 240 "$PY" -m benchmarks.multiplex --device cuda --name multiplex-cuda "$@" || rc=$?
    echo "== multiplex exit code $rc; script took $(( $(date +%s) - started )) s"
    exit $rc
} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
copy_out
exit "$rc"
