#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run: the gpu-marked tests (ZO2 offload with CUDA streams,
# the paired forward, the fused Philox update/perturb kernels against the CPU reference, replay of a
# CUDA run on CPU, FlashDP's Triton kernels) and the ZO2/DistZO2 and kernel benchmarks.
#
#   bash scripts/gpu_checks.sh            # logs under ./gpu_results (or $OUT when set)
#
# Needs zoft and its dependencies importable (the README's install command) and a CUDA device; the
# benchmarks use the packaged SmolLM2-135M (converted into ~/.cache/zoft on first use). Each part has
# its own time limit so one hang cannot eat the others' time.
set -o pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name() if ok else 'no CUDA device'); sys.exit(0 if ok else 1)" \
  || { echo "gpu_checks: no CUDA device visible; nothing to check" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
status=0
timeout 300 python -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" || status=1
timeout 240 python scripts/bench_zo2.py --steps 5 --batch 8 --seq 256 2>&1 | tee "$out/bench_zo2.log" || status=1
timeout 120 python scripts/bench_zo_kernels.py 2>&1 | tee "$out/bench_zo_kernels.log" || status=1
exit $status
