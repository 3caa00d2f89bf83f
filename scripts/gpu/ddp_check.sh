#!/usr/bin/env bash
# Data-parallel check of multi_gpu_train.json on one host: the same ACDC training (the bundle's recipe) on 1 GPU
# and on N GPUs (torchrun, DDP over NCCL), same global batch and epochs; writes each run's training_log.csv and
# ddp_check.json (slices/s from the epochs without validation, final validation Dice) into OUT_DIR.
# From the repository root, with monai, nibabel, pytorch-ignite and fire installed, the ACDC data under .gpudata/acdc and
#   export PYTHONPATH=$PWD/custom:$PYTHONPATH
# GRAPHS=1: both runs from CUDA graphs (gpu_train.json's default on one GPU; multi_gpu_cuda_graphs.json on N).
# Usage: bash scripts/gpu/ddp_check.sh OUT_DIR [EPOCHS] [GPUS] [PRESET] [GLOBAL_BATCH] [GRAPHS]
set -u
out=${1:?OUT dir}; epochs=${2:-6}; gpus=${3:-2}; preset=${4:-base}; batch=${5:-48}; graphs=${6:-0}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
cd bundle
common=(--dataset_dir ../.gpudata/acdc --model_preset "$preset" --max_epochs "$epochs" --val_interval "$epochs")
extra=""
if [ "$graphs" = 1 ]; then extra=",'configs/multi_gpu_cuda_graphs.json'"; else common+=(--cuda_graphs False); fi
for n in 1 "$gpus"; do
  run=/tmp/ddp_check/gpus$n; rm -rf "$run"; mkdir -p "$run"
  if [ "$n" = 1 ]; then
    cfg="['configs/train.json','configs/profile_acdc.json','configs/gpu_train.json']"
    launch=(python3 -m monai.bundle run training)
  else
    cfg="['configs/train.json','configs/profile_acdc.json','configs/multi_gpu_train.json','configs/gpu_train.json'$extra]"
    launch=(torchrun --standalone --nproc_per_node "$n" -m monai.bundle run training)
  fi
  t0=$(date +%s)
  "${launch[@]}" --config_file "$cfg" "${common[@]}" --batch_size $((batch / n)) --ckpt_dir "$run/ckpt" --output_dir "$run/eval" > "$run/log.txt" 2>&1
  echo "gpus=$n rc=$? wall=$(( $(date +%s) - t0 ))s"; tail -3 "$run/log.txt"
  cp "$run/eval/training_log.csv" "$out/training_log_gpus$n.csv" 2>/dev/null
done
python3 - "$out" "$gpus" "$batch" "$graphs" <<'PY'
import csv, json, sys
out, gpus, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
res = {"global_batch": batch, "cuda_graphs": sys.argv[4] == "1", "runs": {}}
for n in (1, gpus):
    rows = list(csv.DictReader(open(f"{out}/training_log_gpus{n}.csv")))
    t = [float(r["elapsed_s"]) for r in rows]
    per_epoch = (1680 // batch) * batch  # ACDC: 140 training volumes x 12 slices, full batches
    # epochs 2..N-1: no start-up, no validation
    rate = per_epoch * (len(t) - 2) / (t[-2] - t[0]) if len(t) > 2 else None
    res["runs"][n] = {"slices_per_s": rate, "final_val_dice": float(rows[-1]["val_metric"] or "nan"), "epochs": len(rows), "last_loss": float(rows[-1]["loss"])}
r1, rn = res["runs"][1], res["runs"][gpus]
res["speedup"] = rn["slices_per_s"] / r1["slices_per_s"]
res["dice_diff_points"] = 100 * (rn["final_val_dice"] - r1["final_val_dice"])
json.dump(res, open(f"{out}/ddp_check.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
