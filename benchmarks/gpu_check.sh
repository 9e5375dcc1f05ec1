#!/usr/bin/env bash
# The one prepared GPU check (about 7.5 minutes on an H100/H200; see BENCHMARKS.md).
#
#   bash benchmarks/gpu_check.sh            # writes under $OUT (or benchmarks/results/gpu-check-DATE/)
#
# 1. installs carried wheels from .whl/ if present (bitsandbytes, liger-kernel, pydantic, ...),
# 2. records the machine (nvidia-smi, package versions),
# 3. runs the tiny end-to-end job on CUDA (`python -m lora_worker run test_input.json`), which shows
#    the CUDA-only choices (paged 8-bit AdamW, Liger) switched on,
# 4. runs the 70B-shaped bench under a 79 GiB cap: seed recipe 1x2048 and 4x2048, the project's path
#    at 2048, 8192 (4 rows), 32768 and 16384 tokens, most important first. The bench rewrites its JSON
#    after every configuration, so whatever finished before the deadline is kept.
#
# Every step has its own time limit and the whole script stops by DEADLINE_S, so the caller's
# timeout (about 560 s) is never what ends it.
set -u
cd "$(dirname "$0")/.."

DEADLINE_S=${DEADLINE_S:-450}  # whole script, seconds
OUT=${OUT:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

left() { echo $((DEADLINE_S - SECONDS)); }

echo "== wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:src \
        || { echo "wheel install failed; going on with what is installed"; export PYTHONPATH=src; }
    ls -la .whl
else
    echo "no .whl/ folder: using the installed packages"
    export PYTHONPATH=src
fi

echo "== machine"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

print("python", sys.version.split()[0])
for d in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "trl", "accelerate", "triton", "pydantic", "runpod"):
    try:
        print(f"{d:14s} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d:14s} MISSING")
import torch

print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), round(p.total_memory / 2**30, 2), "GiB", p.multi_processor_count, "SMs")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

echo "== tiny end-to-end job on CUDA ($(left) s left)"
rm -rf /tmp/vol
if timeout 30 "$PY" -m lora_worker tiny-model --out build/tiny-llama >/dev/null 2>&1; then
    VOLUME_DIR=/tmp/vol timeout -k 5 100 "$PY" -m lora_worker run test_input.json >"$OUT/e2e-result.json" 2>"$OUT/e2e.log"
    echo "run exited with $?"
    grep -ioE '"(status|error|gpu)[a-z_]*": *("[^"]*"|[0-9.]+)' "$OUT/e2e-result.json" | head -10
    grep -E 'Traceback|Error|out of memory' "$OUT/e2e.log" | head -10
    cp /tmp/vol/jobs/*/report/report.json "$OUT/e2e-report.json" 2>/dev/null
    # The job's report holds the requested settings ("auto"); what the Trainer resolved on CUDA
    # (paged 8-bit AdamW expected) is in the checkpoint's training_args.bin.
    "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/e2e.log"
import glob

import torch

found = sorted(glob.glob("/tmp/vol/jobs/*/checkpoints/checkpoint-*/training_args.bin"))
for path in found[-1:]:
    a = torch.load(path, weights_only=False)
    print("resolved by the job:", path, "| optim", a.optim, "| bf16", a.bf16, "| use_cpu", a.use_cpu)
if not found:
    print("no checkpoint found: the job did not reach its first checkpoint")
PYEOF
else
    echo "could not build the tiny model" | tee "$OUT/e2e.log"
fi

echo "== 70B-shaped bench, cap 79 GiB ($(left) s left)"
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    echo "bitsandbytes is not installed here: carry it in .whl/ (BENCHMARKS.md, 'Preparing the carry')"
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # No GPU (a dry run of this script): check the mechanics on the tiny shape instead.
    echo "no CUDA device: running the tiny CPU smoke bench instead (no timing claims)"
    timeout -k 10 $(($(left) - 5)) "$PY" -m lora_worker bench --tiny --configs seed:1x64,project:2x64 --steps 2 \
        --out "$OUT/bench-tiny.json" 2>&1 | tee "$OUT/bench-tiny.log" | grep -vE "FutureWarning|warnings.warn|^\{'loss'"
else
    budget=$(($(left) - 15))
    # 3 steps: one warm-up and two timed (enough for multi-second steps; see BENCHMARKS.md).
    timeout -k 10 "$budget" "$PY" -m lora_worker bench --shape 70b --cap-gib 79 --steps 3 \
        --configs seed:1x2048,project:1x2048,project:4x2048,seed:4x2048,project:1x32768,packed:4x2048,project:1x16384 \
        --config-timeout-s 240 --out "$OUT/bench-70b.json" 2>&1 | tee "$OUT/bench-70b.log" \
        | grep -vE "FutureWarning|warnings.warn|^\{'loss'"
    echo "bench exited (PIPESTATUS ${PIPESTATUS[*]})"
fi

echo "== done in ${SECONDS} s; files in $OUT:"
ls -la "$OUT"
