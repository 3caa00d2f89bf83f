#!/usr/bin/env bash
# Runs the GPU benchmarks of benchmarks/ in one device call and packs their results into $OUT.
# From the repository root, after the stage prefix of `../shared/gpu/stage.sh acdc` and
#   export PYTHONPATH=$PWD/custom:$PYTHONPATH
# Usage: bash scripts/gpu/run_benchmarks.sh OUT_DIR
set -u
out=${1:?OUT dir}
res=/tmp/bench_results; mkdir -p "$res"
cd benchmarks
export PYTHONUNBUFFERED=1
t0=$(date +%s)
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - t0 ))s: $*"; timeout -k 10 "$limit" "$@"; echo "=== $name rc=$? at +$(( $(date +%s) - t0 ))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
step network 150 python3 bench_network.py --iters 6 --warmup 2 --out_dir "$res"
step e2e 70 python3 bench_e2e.py --runs 4 --work /tmp/e2e200 --out_dir "$res"
step e2e_600 70 python3 bench_e2e.py --depth 600 --ext .nii --runs 2 --name e2e_600 --work /tmp/e2e600 --out_dir "$res"
step train 100 python3 bench_train.py --dataset_dir ../.gpudata/acdc --presets paper,base --sacm_forms kernel,sum --batch 48 --steps 15 --warmup 5 --out_dir "$res"
cd .. && tar czf "$out/bench_results.tar.gz" -C "$res" . && ls -la "$res"
cat "$res"/*.md
