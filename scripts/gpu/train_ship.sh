#!/usr/bin/env bash
# One device call: the multi-GPU check from CUDA graphs, then ACDC training of the shipped `base` model
# (AdamW, CUDA graphs) for the time left, fp32 + fp16 evaluation, the fp16 checkpoint split in two parts.
# From the repository root after the stage prefix and export PYTHONPATH=$PWD/custom:$PYTHONPATH.
# Usage: bash scripts/gpu/train_ship.sh OUT_DIR CALL_BUDGET_S [EPOCHS]
set -u
out=${1:?OUT}; budget=${2:?seconds}; epochs=${3:-100}
t0=$(date +%s); export PYTHONUNBUFFERED=1
bash scripts/gpu/ddp_check.sh "$out" 10 2 base 48 1 2>&1 | tail -25
w=/tmp/ship; rm -rf $w; mkdir -p $w
left=$(( budget - ($(date +%s) - t0) - 70 ))
echo "=== training base for at most ${left}s, $epochs epochs"
cd bundle
timeout -s INT "$left" python3 -m monai.bundle run training --config_file "['configs/train.json','configs/profiles/acdc.json','configs/adamw.json','configs/gpu_train.json']" \
  --dataset_dir ../.gpudata/acdc --model_preset base --max_epochs "$epochs" --val_interval 5 --ckpt_dir $w/ckpt --output_dir $w/eval > $w/train.log 2>&1
echo "train rc=$?"; grep -E "val_mean_dice|Key metric" $w/train.log | tail -4
cp $w/eval/training_log.csv "$out/training_log_ship.csv"
python3 - <<'PY'
import torch
sd = torch.load("/tmp/ship/ckpt/model.pt", map_location="cpu", weights_only=True)["model"]
torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, "/tmp/ship/model_fp16.pt")
PY
for v in model model_fp16; do
  python3 -m monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json','configs/profiles/acdc.json']" \
    --dataset_dir ../.gpudata/acdc --ckpt_path $w/$( [ $v = model ] && echo ckpt/model.pt || echo model_fp16.pt ) --output_dir $w/eval_$v --model_preset base --amp False > $w/eval_$v.log 2>&1
  echo "eval $v rc=$?"; cat $w/eval_$v/metrics_summary.json 2>/dev/null | head -c 600; echo
done
cp $w/eval_model_fp16/metrics_summary.json "$out/metrics_fp16.json"; cp $w/eval_model/metrics_summary.json "$out/metrics_fp32.json"
python3 -c "
b=open('/tmp/ship/model_fp16.pt','rb').read(); h=(len(b)+1)//2
open('$out/base_fp16.pt.part0','wb').write(b[:h]); open('$out/base_fp16.pt.part1','wb').write(b[h:])
import hashlib; print('fp16 bytes', len(b), hashlib.sha256(b).hexdigest())"
echo "done at +$(( $(date +%s) - t0 ))s"
