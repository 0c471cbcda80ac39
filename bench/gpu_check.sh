#!/usr/bin/env bash
# The training and decoding benchmarks on one accelerator, in one short prepared run (about 5 minutes on an H100/H200):
# model FLOP utilisation (MFU) per preset, the base preset at 1,024 tokens in bfloat16, and the multi-context /
# separate decoding ratio on the encoder-dominant configuration. Needs a CUDA JAX in the interpreter (the image of
# Dockerfile.gpu, or `pip install "jax[cuda12]==0.10.2"`). Logs go to $OUT (default bench_gpu/).
#
#     OUT=bench_gpu PY=.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_gpu}
PY=${PY:-python}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PY" -c "import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() != 'cpu', 'no accelerator'" \
    2>&1 | tee "$OUT/devices.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv \
    | tee -a "$OUT/devices.txt" || true
# Training: tiny and base (1,024 tokens, bfloat16 compute, float32 master weights), 20 timed steps each.
"$PY" -m bench.model_training --synthetic --presets tiny,base --steps 20 2>&1 | tee "$OUT/model_training.txt"
# A larger base batch, where MFU saturates.
"$PY" -m bench.model_training --synthetic --presets base --batch-size 128 --steps 10 2>&1 \
    | tee "$OUT/model_training_b128.txt"
# Decoding: the encoder-dominant configuration, 128 users per batch.
"$PY" bench/decoding.py --users 128 --repeats 5 2>&1 | tee "$OUT/decoding.txt"
grep -h '^RESULT' "$OUT"/*.txt > "$OUT/results.jsonl"
echo "results in $OUT/"
