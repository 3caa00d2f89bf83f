#!/usr/bin/env bash
# Runs the GPU benchmarks of benchmarks/ (and the CUDA-only tests) in one device call; results go to OUT_DIR.
# From the repository root, with monai, nibabel, pytorch-ignite and fire installed, the ACDC data under .gpudata/acdc and
#   export PYTHONPATH=$PWD/custom:$PYTHONPATH
# Usage: bash scripts/gpu/run_benchmarks.sh OUT_DIR
set -u
out=${1:?OUT dir}
res=/tmp/bench_results; mkdir -p "$res" "$out"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - t0 ))s: $*"; timeout -k 10 "$limit" "$@"; echo "=== $name rc=$? at +$(( $(date +%s) - t0 ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
step cuda_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu_loader.py
cd benchmarks
step profile 60 python3 profile_network.py --preset paper --out_dir "$res"
step network 200 python3 bench_network.py --channels_last "" --iters 6 --warmup 2 --out_dir "$res"
step e2e 100 python3 bench_e2e.py --runs 4 --work /tmp/e2e200 --out_dir "$res"
step e2e_600 70 python3 bench_e2e.py --depth 600 --ext .nii --runs 2 --anchor 0 --name e2e_600 --work /tmp/e2e600 --out_dir "$res"
step train 120 python3 bench_train.py --dataset_dir ../.gpudata/acdc --presets paper,base --sacm_forms kernel --cuda_graphs --batch 48 --steps 15 --warmup 5 --out_dir "$res"
cd .. && cp "$res"/*.json "$res"/*.md "$out"/ 2>/dev/null; ls -la "$out"
cat "$res"/*.md
