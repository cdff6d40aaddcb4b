#!/usr/bin/env bash
# The GPU figures of the serving and token benchmarks in one bounded call (a lent GPU's time is short):
#   0. first, the GPU tests of the serving engine and the token graphs (tests/test_cuda.py, bounded);
#   1. tokens.py --parts graphs: CUDA graphs per (knob, bucket) for the trained ViT (RUN_DIR) and a ViT-S/16,
#      fp32 and bf16 (TOKEN_DTYPES), with ToMe r=13 without proportional attention and the token floor (the
#      unreduced ViT-S/16 at 197 / 122 / 50 tokens: the most any reduction can save at each batch size);
#   2. serve_load.py --device cuda: the stage-level engine (pooled rows, one CUDA graph per stage and bucket) vs
#      the CUDA-graphed full model and request-level early exit, batch cap 256, MSDNet and ResNet-50 at 224x224.
# Runs from the repository root without installing (PYTHONPATH=src; the machine's own torch and timm).
# Usage: bash benchmarks/gpu_checks.sh OUT_DIR [RUN_DIR]   (copy OUT_DIR's files to benchmarks/results/)
# SKIP_TOKENS=1 leaves out part 1; MODELS="msdnet" narrows part 2.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [RUN_DIR]}
run=${2:-runs/vit_fmnist}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
py=${PYTHON:-python3}
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
  "$py" -c "import sys, torch, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  uptime
} 2>&1 | tee "$out/gpu_checks.log"
timeout "${TESTS_S:-120}" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py \
  -k "pipelined or token_knob or tome_on_cuda or cuda_graphs_equal" 2>&1 | tail -15 | tee -a "$out/gpu_checks.log"
for dtype in ${TOKEN_DTYPES:-fp32 bf16}; do
  [ "${SKIP_TOKENS:-0}" = 1 ] && break
  name=tokens_cuda; [ "$dtype" = fp32 ] || name=tokens_cuda_$dtype
  timeout "${TOKENS_S:-180}" "$py" benchmarks/tokens.py --run_dir "$run" --parts graphs --device cuda --rounds 10 \
    --dtype "$dtype" --out "$out/$name" 2>&1 | tee -a "$out/gpu_checks.log"
  echo "tokens $dtype exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_checks.log"
done
timeout "${SERVE_S:-330}" "$py" benchmarks/serve_load.py --device cuda --models ${MODELS:-resnet50 msdnet} \
  --resnet-input 224 --max-batch 256 --clients 1024 --max-inflight 1024 --count 200000 --max-seconds 2.5 \
  --max-wait-ms 5 --loads 0.5 0.8 2.0 --repeats 2 --out "$out/serve_cuda" 2>&1 | tee -a "$out/gpu_checks.log"
echo "serve exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_checks.log"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv,noheader 2>&1 | tee -a "$out/gpu_checks.log"
