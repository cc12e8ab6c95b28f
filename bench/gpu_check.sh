#!/usr/bin/env bash
# The prepared GPU check of issue 13: run it on a machine with one H100/H200-class GPU (under 8
# minutes there, nothing downloaded) and put the figures it writes into the README with the GPU's
# name.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]          # the GPU check
#   bash bench/gpu_check.sh --cpu [RESULTS_DIR]    # the same parts, tiny, on CPU (a test runs it)
#
# What it does, each part's output in RESULTS_DIR (default results/gpu-check-<UTC time>):
#   env.json, nvidia-smi.txt   torch, CUDA, the GPU
#   model/                     a distilroberta-sized encoder (6 layers, 768 wide, 12 heads, 3072
#                              FFN, 50265-token vocabulary; BERT layout, random weights) built
#                              here with transformers and the shipped MiniLM tokenizer
#   bench_train.json           the throughput benchmark at sequence length 256, fp16 and bf16:
#                              samples/s and tokens/s on a resident batch and in the real loop,
#                              MFU, peak memory per case (bench/bench_train.py)
#   runs/                      the pipeline's ingest and features on a synthetic sample
#   train-fp16/, train-bf16/   the real train step (python -m hpcpipe.jobs.train) on it, the
#                              encoder fine-tuned at length 256; each has train/gpu/*.jsonl, the
#                              train job's NVML samples (where nvidia-ml-py is installed)
#   nvidia-smi-samples.csv     nvidia-smi's own samples every second, beside the sampler's
#   resume.json, resume/       training in legs bf16 -> fp16 -> bf16, each continuing the last
#                              one's checkpoint: no crash, the loss scale carried through
#   figures.md, figures.json   all the figures in one place
set -euo pipefail

CPU=0
if [[ ${1:-} == --cpu ]]; then CPU=1; shift; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
STEPS_PY="$REPO/bench/gpu_check_steps.py"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/check.log"; }

if ((CPU)); then
    # Tiny: every part runs, the figures mean nothing.
    MODEL=(--layers 2 --hidden 64 --heads 2 --ff 128 --vocab 30522 --max-pos 64)
    SEQ=32 REVIEWS=3000 TRAIN_STEPS=6 FT_BATCH=8 BENCH=(--device cpu --steps 3 --rows 2000
        --products 200 --loader-seconds 1 --num-workers 1 --batch-size 32 --ft-batch-size 8)
    PRECISIONS=(fp32 fp16) RESUME=fp32,fp16,fp32 RESUME_EVERY=2 WORKERS=1 LOG_EVERY=2
else
    MODEL=(--layers 6 --hidden 768 --heads 12 --ff 3072 --vocab 50265 --max-pos 514)
    SEQ=256 REVIEWS=50000 TRAIN_STEPS=150 FT_BATCH=64 BENCH=(--device cuda --steps 40
        --ft-batch-size 64 --num-workers 4)
    PRECISIONS=(fp16 bf16) RESUME=bf16,fp16,bf16 RESUME_EVERY=20 WORKERS=4 LOG_EVERY=10
fi

SAMPLER_PID=
stop_sampling() { [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null || true; }
trap stop_sampling EXIT

log "results in $OUT"
$PY - "$OUT/env.json" <<'EOF'
import json, sys, torch
cuda = torch.cuda.is_available()
try:
    import pynvml  # noqa: F401
    nvml = True
except ImportError:
    nvml = False
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "nvidia_ml_py": nvml}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info))
EOF
if ((!CPU)); then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    nvidia-smi --query-gpu=timestamp,index,name,utilization.gpu,memory.used,memory.total \
        --format=csv -l 1 > "$OUT/nvidia-smi-samples.csv" 2>&1 &
    SAMPLER_PID=$!
fi

log "1/5 the encoder, built here (random weights)"
$PY "$STEPS_PY" model "$OUT/model" "${MODEL[@]}" | tee -a "$OUT/check.log"

log "2/5 throughput benchmark at sequence length $SEQ (resident batch and the real loop, MFU)"
$PY bench/bench_train.py "${BENCH[@]}" --model "$OUT/model" --seq-len "$SEQ" \
    --out "$OUT/bench_train.json" > "$OUT/bench_train.log" 2>&1 || { tail -30 "$OUT/bench_train.log"; exit 1; }

log "3/5 ingest and features of a synthetic sample ($REVIEWS reviews)"
$PY -m hpcpipe submit --local --wait --steps ingest,features --runs-dir "$OUT/runs" \
    --name check --config configs/local.yaml --set "data.synth_reviews=$REVIEWS" \
    > "$OUT/submit.log" 2>&1 || { tail -30 "$OUT/submit.log"; exit 1; }
RUN=$(ls -d "$OUT"/runs/check* | head -1)

log "4/5 the real train step in ${PRECISIONS[*]}"
TRAIN_SET=("model=$OUT/model" freeze_encoder=false "max_length=$SEQ" "batch_size=$FT_BATCH"
           epochs=1 "max_steps_per_epoch=$TRAIN_STEPS" "log_every=$LOG_EVERY" checkpoint_every=1000
           "num_workers=$WORKERS")
for precision in "${PRECISIONS[@]}"; do
    folder=$($PY "$STEPS_PY" folder "$RUN" "$OUT/train-$precision" "${TRAIN_SET[@]}" \
        "precision=$precision")
    $PY -m hpcpipe.jobs.train --run-dir "$folder" > "$OUT/train-$precision.log" 2>&1 \
        || { tail -30 "$OUT/train-$precision.log"; exit 1; }
    grep -h "train.precision\|sampl" "$OUT/train-$precision.log" | tee -a "$OUT/check.log" || true
done

log "5/5 resume across precisions ($RESUME)"
$PY "$STEPS_PY" resume "$RUN" "$OUT/resume" --precisions "$RESUME" --every "$RESUME_EVERY" \
    --out "$OUT/resume.json" --set "model=$OUT/model" freeze_encoder=false "max_length=$SEQ" \
    "batch_size=$FT_BATCH" epochs=1 "num_workers=$WORKERS" log_every=5 \
    > "$OUT/resume.log" 2>&1 || { tail -30 "$OUT/resume.log"; exit 1; }

stop_sampling
$PY "$STEPS_PY" figures "$OUT" > /dev/null
log "done: $OUT/figures.md"
