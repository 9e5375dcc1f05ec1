#!/usr/bin/env bash
# The one prepared GPU check: at most 9 minutes on one GPU (DEADLINE_S, default 530 s), proving the
# worker's CUDA-only paths, everything a reader needs in ONE folder ($OUT). BENCHMARKS.md says how
# to run it with the device tool (carry .whl/, timeout_s 590) and benchmarks/wheels.md how to build
# the wheels it installs.
#
#   (setup) wheels from .whl/ (pinned transformers, peft, bitsandbytes, liger-kernel, pydantic + deps)
#           installed with --target, first on PYTHONPATH; versions and device.        ~25 s
#   stage   a 2-layer Llama of Llama 3 70B's widths and vocabulary (hidden 8192, MLP 28672, 64/8
#           heads, vocabulary 128,256, untied head; 3.8 B parameters, 7.6 GB bf16) written as a
#           RunPod cached model (<volume>/huggingface-cache/hub/models--ORG--NAME/snapshots/<sha>/
#           + refs/main).                                                  at most STAGE_S=120 s
#   (a)     the real job path, `python -m lora_worker run`: REQUIRE_CUDA=1, quantize on load, NF4
#           copy saved, optimizer auto (paged 8-bit AdamW: every LoRA matrix has >= 4096 elements
#           at these widths), Liger on; checkpoints every 2 steps, kept.       at most RUN1_S=180 s
#   (b)     SIGKILL as soon as the first checkpoint is complete; the same job resubmitted must
#           resume from it on the device and load the saved NF4 copy; the checkpoint's optimizer
#           states must be uint8 (8-bit).                                      at most RUN2_S=180 s
#   (c)     a real CUDA out-of-memory error: the same model, micro-batches of OOM_ROWS (4 x ROWS)
#           rows, the allocator capped when training starts at what is allocated plus OOM_FACTOR
#           (1.5) x the extra memory (b) needed at its peak; the job must complete with
#           `recoveries` (micro-batches split, accumulation doubled) and every planned step.
#                                                  at most OOM_S=120 s, and leaves BENCH_MIN_S=200
#   (d)     the 70B-shaped bench under a 78 GiB cap (an 80 GB H100): seed vs project at 1x2048 and
#           4x2048 in the same run (BENCH_CONFIGS, 3 steps: one warm-up), then, time permitting,
#           activation offload at a budget the plain project path is not expected to hold
#           (OFFLOAD_CONFIGS, 2 steps).                                        the time left
#   summary PASS/FAIL per part.                                                          ~15 s
# Each part has its own time limit, so a hang in one still leaves the others' results.
#
# $OUT gets at most 7 files: summary.txt, summary.json, results.json (the resubmission's result,
# what the killed run left, the optimizer states, the OOM job's result), logs.txt (every part's log,
# trimmed), console.txt, bench-70b.json, bench-offload.json.
#
# CPU dry run (tests/test_gpu_check.py, which also cuts the dataset to 5 conversations via DATASET;
# tiny shapes, no wheels, Liger auto, no REQUIRE_CUDA; SKIP_BENCH=1 / SKIP_OOM=1 leave parts out):
#   PY=.venv/bin/python WHEELS= REQUIRE_CUDA=0 LIGER=auto LAYERS=2 HIDDEN=64 INTER=192 HEADS=4 KV=2 \
#   VOCAB=1024 MAXLEN=2048 ROWS=1 EPOCHS=1 BENCH_ARGS=--tiny BENCH_CONFIGS=seed:1x64,project:1x64 \
#   OFFLOAD_CONFIGS=project-offload:1x64 DEADLINE_S=1500 OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
REPO=$PWD

DEADLINE_S=${DEADLINE_S:-530}
OUT=${OUT:-$REPO/benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
PY=${PY:-python3}
WHEELS=${WHEELS-.whl}
WORK=${WORK:-/tmp/lora-gpu-check}
DATASET=${DATASET:-$REPO/examples/brightrun-sample-24.json}
STAGE_S=${STAGE_S:-120} RUN1_S=${RUN1_S:-180} RUN2_S=${RUN2_S:-180} OOM_S=${OOM_S:-120}
BENCH_MIN_S=${BENCH_MIN_S:-200} OFFLOAD_MIN_S=${OFFLOAD_MIN_S:-100}
OOM_FACTOR=${OOM_FACTOR:-1.5}
BENCH_ARGS=${BENCH_ARGS:---shape 70b --cap-gib 78}
BENCH_CONFIGS=${BENCH_CONFIGS:-seed:1x2048,project:1x2048,seed:4x2048,project:4x2048}
OFFLOAD_CONFIGS=${OFFLOAD_CONFIGS:-project-offload:1x32768}
export LAYERS=${LAYERS:-2} HIDDEN=${HIDDEN:-8192} INTER=${INTER:-28672} HEADS=${HEADS:-64} KV=${KV:-8}
export VOCAB=${VOCAB:-128256}
MAXLEN=${MAXLEN:-2048} ROWS=${ROWS:-4} EPOCHS=${EPOCHS:-1} LIGER=${LIGER:-on}
OOM_ROWS=${OOM_ROWS:-$((4 * ROWS))}
export REQUIRE_CUDA=${REQUIRE_CUDA:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # as in the image
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

rm -rf "$WORK"
mkdir -p "$WORK/logs" "$OUT"
export VOLUME_DIR=$WORK/volume
VOL=$VOLUME_DIR
LOGS=$WORK/logs
CK=$VOL/jobs/gpu-check/checkpoints
exec > >(tee -a "$OUT/console.txt") 2>&1

left() { echo $((DEADLINE_S - SECONDS)); }
# limit MAX RESERVE: seconds a part may take: at most MAX, leaving RESERVE for what follows; never
# below 1 (`timeout 0` would mean no limit at all)
limit() {
    local l=$(($(left) - $2))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -lt 1 ] && l=1
    echo "$l"
}
# timed NAME COMMAND...: run a part, record its seconds and exit status for the summary
timed() {
    local name=$1 t=$SECONDS rc
    shift
    "$@"
    rc=$?
    echo "$name $((SECONDS - t)) $rc" >>"$WORK/times.txt"
    return $rc
}
helper() { "$PY" benchmarks/gpu_check.py "$@"; }

echo "== wheels ($(left) s left)"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    timed wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl >"$LOGS/wheels.log" 2>&1 \
        || { echo "wheel install failed:"; tail -20 "$LOGS/wheels.log"; }
    du -ch "$WHEELS"/*.whl >>"$LOGS/wheels.log"
    export PYTHONPATH=$WORK/site:$REPO/src
else
    echo "no wheels in '$WHEELS': using the installed packages" | tee "$LOGS/wheels.log"
    export PYTHONPATH=$REPO/src
fi

echo "== versions and device ($(left) s left)"
{ nvidia-smi 2>&1 | head -20 || true; } >"$LOGS/env.log"
timed env helper env --work "$WORK" --wheels "$WHEELS" 2>&1 | tee -a "$LOGS/env.log"

echo "== stage: ${LAYERS}-layer Llama, hidden $HIDDEN, MLP $INTER, vocabulary $VOCAB, as a RunPod cached model ($(left) s left)"
timed stage timeout -k 5 "$(limit "$STAGE_S" 60)" "$PY" benchmarks/gpu_check.py stage --work "$WORK" --volume "$VOL" \
    >"$LOGS/stage.log" 2>&1
tail -2 "$LOGS/stage.log"

JOB=$WORK/job.json
helper job-input --out "$JOB" --dataset "$DATASET" --job-id gpu-check --liger "$LIGER" \
    --rows "$ROWS" --maxlen "$MAXLEN" --epochs "$EPOCHS"

echo "== (a) the job, killed at its first complete checkpoint ($(left) s left)"
t=$SECONDS
lim=$(limit "$RUN1_S" 60)
"$PY" -m lora_worker run "$JOB" >"$LOGS/run1.log" 2>&1 &
pid=$!
killed=no
while kill -0 "$pid" 2>/dev/null; do
    if compgen -G "$CK/checkpoint-*/CHECKPOINT_COMPLETE" >/dev/null; then
        kill -9 "$pid" && killed=yes
        break
    fi
    if [ $((SECONDS - t)) -ge "$lim" ]; then
        echo "run 1: no complete checkpoint within $lim s"
        kill -9 "$pid"
        break
    fi
    sleep 0.2
done
wait "$pid" 2>/dev/null
rc=$?
echo "run1 $((SECONDS - t)) $rc killed=$killed" >>"$WORK/times.txt"
echo "run 1: killed=$killed, exit $rc, after $((SECONDS - t)) s; checkpoints: $(ls "$CK" 2>/dev/null | tr '\n' ' ')"
helper after-kill --work "$WORK" --volume "$VOL" --killed "$killed" --returncode "$rc" --seconds $((SECONDS - t)) \
    >>"$LOGS/run1.log" 2>&1

echo "== (b) the same job resubmitted: resume, NF4 copy ($(left) s left)"
timed run2 timeout -k 5 "$(limit "$RUN2_S" 30)" "$PY" -m lora_worker run "$JOB" >"$LOGS/run2.log" 2>&1
echo "run 2 exited with $?"

oom_lim=$(limit "$OOM_S" $([ -n "${SKIP_BENCH:-}" ] && echo 20 || echo "$BENCH_MIN_S"))
if [ -n "${SKIP_OOM:-}" ] || [ "$oom_lim" -lt 45 ]; then
    echo "oom-skipped 0 0 ${SKIP_OOM:+SKIP_OOM set}${SKIP_OOM:-only $oom_lim s left}" >>"$WORK/times.txt"
else
    echo "== (c) a real out-of-memory error under a memory cap, $OOM_ROWS rows per micro-batch ($(left) s left)"
    OOM_JOB=$WORK/oom-job.json
    helper job-input --out "$OOM_JOB" --dataset "$DATASET" --job-id gpu-check-oom --liger "$LIGER" \
        --rows "$OOM_ROWS" --maxlen "$MAXLEN" --epochs 1 --oom
    timed oom timeout -k 5 "$oom_lim" "$PY" benchmarks/gpu_check.py oom --work "$WORK" --volume "$VOL" \
        --job "$OOM_JOB" --factor "$OOM_FACTOR" >"$LOGS/oom.log" 2>&1
    grep -E "^OOM part" "$LOGS/oom.log"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    lim=$(limit 100000 15)
    echo "== (d) bench $BENCH_ARGS: $BENCH_CONFIGS ($(left) s left)"
    if [ "$lim" -ge 60 ]; then
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
        timed bench timeout -k 10 "$lim" "$PY" -m lora_worker bench $BENCH_ARGS --steps 3 \
            --configs "$BENCH_CONFIGS" --config-timeout-s 170 --out "$OUT/bench-70b.json" >"$LOGS/bench.log" 2>&1
        grep -E "^  [a-z-]+:[0-9]+x[0-9]+: " "$LOGS/bench.log"
    fi
    lim=$(limit 100000 15)
    if [ -n "$OFFLOAD_CONFIGS" ] && [ "$lim" -ge "$OFFLOAD_MIN_S" ]; then
        echo "== (d) time permitting: $OFFLOAD_CONFIGS ($(left) s left)"
        # shellcheck disable=SC2086
        timed offload timeout -k 10 "$lim" "$PY" -m lora_worker bench $BENCH_ARGS --steps 2 \
            --configs "$OFFLOAD_CONFIGS" --config-timeout-s "$lim" --out "$OUT/bench-offload.json" \
            >"$LOGS/offload.log" 2>&1
        grep -E "^  [a-z-]+:[0-9]+x[0-9]+: " "$LOGS/offload.log"
    fi
fi

echo "== summary (${SECONDS} s so far)"
helper summary --work "$WORK" --out "$OUT" --bench-configs "$BENCH_CONFIGS" ${SKIP_BENCH:+--skip-bench}
status=$?
echo "== done in ${SECONDS} s; $OUT:"
ls -la "$OUT"
exit $status
