"""Run inside the DPO repo's pinned stack (transformers 4.57.3, trl 0.26.2; PYTHONPATH=.dpo-stack:<repo>), as
that repo's training.py does: load the SFT folder as policy and reference, build the rows with our
data_process_sft, run DPOTrainer. Writes what it saw to a JSON file and the logits to a .pt file, for
tests/test_dpo_stack.py to compare with the project's own stack.

    python tests/dpo_stack_check.py SFT_DIR HH_FILE OUT_PREFIX
"""

import json
import logging
import math
import sys

import torch
import transformers
import trl
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from trl import DPOConfig, DPOTrainer

from hh_sft_chat import build_dpo_dataset

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris, on the Seine."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a fruit, in one word."}, {"role": "assistant", "content": "Apple."}],
]


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class ForceTokenAt(LogitsProcessor):
    """Make `token` the greedy choice at the `step`-th generated token: does generation stop there?"""

    def __init__(self, prompt_length, token, step):
        self.prompt_length, self.token, self.step = prompt_length, token, step

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step - 1:
            scores[:, self.token] = scores.max() + 100.0
        return scores


def main(sft_dir, hh_file, out_prefix):
    captured = Captured()
    logging.getLogger("transformers").addHandler(captured)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, use_fast=True)  # as the DPO repo's training.py
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    logging.getLogger("transformers").removeHandler(captured)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    ids = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
           for c in CONVERSATIONS]
    with torch.no_grad():
        logits = model(torch.tensor([ids[1]])).logits
    torch.save(logits, f"{out_prefix}.pt")

    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True, return_tensors="pt")
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False,
                               logits_processor=LogitsProcessorList([ForceTokenAt(prompt.shape[1], eot, 3)]))

    pairs = build_dpo_dataset(load_dataset("json", data_files=hh_file, split="train[:16]"), tokenizer)
    policy, reference = AutoModelForCausalLM.from_pretrained(sft_dir), AutoModelForCausalLM.from_pretrained(sft_dir)
    args = DPOConfig(output_dir=f"{out_prefix}-dpo", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                     max_length=None, max_prompt_length=None, max_completion_length=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=None)
    trainer.train()
    rows = trainer.train_dataset.select(range(6))
    report = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__},
        "load_warnings": captured.messages,
        "tokenizer": {"class": type(tokenizer).__name__, "bos": tokenizer.bos_token, "eos": tokenizer.eos_token,
                      "pad": tokenizer.pad_token, "chat_template": tokenizer.chat_template,
                      "special": tokenizer.all_special_tokens},
        "rope": {"theta": model.config.rope_theta, "scaling": model.config.rope_scaling,
                 "inv_freq": model.model.rotary_emb.inv_freq.tolist()},
        "ids": ids,
        "generated": generated[0, prompt.shape[1]:].tolist(),
        "eos_token_id": model.generation_config.eos_token_id,
        "dpo_rows": [{k: row[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
                     for row in rows],
        "dpo_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    assert all(math.isfinite(x) for x in report["dpo_losses"])
    with open(f"{out_prefix}.json", "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
