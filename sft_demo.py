"""`--dry-run` and `--demo`: the same pipeline on a small slice, or offline on a tiny model built on the spot.

    dry_run_config(), dry_run_rows(), dry_run_checks()   10 steps, no W&B/push, then artifact and reload checks
    build_demo_base_model(), demo_reply()                 the offline demo's base model and its final reply
    train_llama3_style_tokenizer()                        a small BPE with Llama-3's special tokens (demo, bench)
"""

from __future__ import annotations

import json
import math
import os

import data_process_sft as dp
from hh_sft_chat import LLAMA3_END_OF_TURN
from model_io import build_random_llama, model_reply
from save_dir_contract import MODEL_FILES, run_file
from sft_config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "data", "hh_sample.jsonl")


def dry_run_config(cfg: Config) -> Config:
    """Same pipeline, 10 steps, no W&B, no push, saved to a folder of its own."""
    return cfg.replace(wandb_project=None, push_to_hub=False, warmup_steps=0, eval_steps=10,
                       save_dir=cfg.sft_training.save_dir.rstrip("/") + "_dry_run")


def dry_run_rows(cfg: Config) -> int:
    t = cfg.sft_training
    train_rows = 10 * t.batch_size * t.gradient_accumulation
    return math.ceil(train_rows / (1 - cfg.dataset.val_ratio)) + 2 * t.eval_batch_size


def dry_run_checks(save_dir: str) -> int:
    """The plan's artifact and reload checks, as a short report; non-zero exit if any fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checks = {f: os.path.isfile(run_file(save_dir, f)) for f in MODEL_FILES}
    try:
        AutoModelForCausalLM.from_pretrained(save_dir)
        tokenizer = AutoTokenizer.from_pretrained(save_dir)
        checks["model and tokenizer reload"] = True
        checks["chat template and pad token saved"] = bool(tokenizer.chat_template) and tokenizer.pad_token is not None
    except (OSError, ValueError) as e:
        checks[f"model and tokenizer reload ({e})"] = False
    with open(run_file(save_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    checks["finite train and eval loss"] = all(math.isfinite(metrics[k]) for k in ("train_loss", "eval_loss"))
    print("Dry-run checks:")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


def build_demo_base_model(cfg: Config) -> None:
    """The demo's base model (policy_name), built offline unless an earlier demo built it: a small BPE tokenizer
    trained on the shipped sample (with the Llama-3 special tokens, no chat template, no pad token) and a
    random-weight tiny Llama. Says first where the demo writes."""
    model_dir, save_dir = cfg.policy_name, cfg.sft_training.save_dir
    print(f"Demo: {'replaces the previous demo output in' if os.path.isdir(save_dir) else 'writes to'} {save_dir}")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"Reusing the demo's base model at {model_dir} (built by an earlier --demo; delete it to rebuild)")
        return
    rows = dp.load_raw_dataset(SAMPLE, "train")
    tokenizer = train_llama3_style_tokenizer((r for r in rows["chosen"] if isinstance(r, str)), vocab_size=2000)
    build_random_llama(model_dir, tokenizer, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    print(f"Built a tiny random-weight base Llama at {model_dir}")


def train_llama3_style_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with Llama-3's special tokens and BOS added like Llama-3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", LLAMA3_END_OF_TURN]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def demo_reply(save_dir: str) -> None:
    """Reload the saved model and print its greedy reply to one question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir)
    question = [{"role": "user", "content": "How do I keep my tomato plants healthy?"}]
    reply, _ = model_reply(model, tokenizer, question, max_new_tokens=40)
    print(f"Reloaded {save_dir}.\nUser: {question[0]['content']}\nAssistant: {reply}\n"
          f"Talk to it: python train_sft.py --chat {save_dir}")
