"""Model and tokenizer files: what goes in, what comes out (weights in `precision` from any launcher, atomic,
loadable by the DPO repo's transformers 4.57), and that it reads the same everywhere. docs/code-map.md lists
the functions.
"""

from __future__ import annotations

import os
import re

from hh_sft_chat import LLAMA3_END_OF_TURN
from save_dir_contract import (
    hub_ignore_patterns,
    publish,
    read_json,
    run_file,
    staging_dir,
    usual_file_modes,
    write_whole,
)
from sft_config import ConfigError


def prepare_tokenizer(tokenizer):
    """Give a base Llama-3 tokenizer what SFT needs: the Llama-3 chat template and a pad token that is not eot.

    The template is TRL's `llama3.jinja` (TRL recognises it and maps it to its training variant). The pad
    token is `<|finetune_right_pad_id|>` where the vocabulary has it (Llama-3.1+), else the first reserved
    special token (Llama-3.0): never `<|eot_id|>`, which must stay a trained stop token.
    """
    from trl.chat_template_utils import llama3_chat_template

    if not tokenizer.chat_template:
        tokenizer.chat_template = llama3_chat_template
    if tokenizer.pad_token is None or tokenizer.pad_token == LLAMA3_END_OF_TURN:
        vocab = tokenizer.get_vocab()
        reserved = sorted((t for t in vocab if re.fullmatch(r"<\|reserved_special_token_\d+\|>", t)),
                          key=lambda t: int(re.search(r"\d+", t).group()))
        candidates = ["<|finetune_right_pad_id|>", *reserved]
        pad = next((t for t in candidates if t in vocab), None)
        if pad is None:
            raise ConfigError("the tokenizer has no <|finetune_right_pad_id|> or reserved token to pad with")
        tokenizer.pad_token = pad
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in ("<|start_header_id|>", "<|end_header_id|>", LLAMA3_END_OF_TURN) if t not in vocabulary]
    if missing:
        raise ConfigError(f"the tokenizer lacks the Llama-3 chat tokens {', '.join(missing)}")
    return tokenizer


def vocabulary_gap(tokenizer, vocab_size: int | None) -> str | None:
    """The token ids the tokenizer has beyond the model's `vocab_size` embedding rows (e.g. Llama-3.2-Vision's
    `<|image|>`, id 128256, beside 128,256 rows), said in words; None when the tokenizer fits the model."""
    if not isinstance(vocab_size, int) or len(tokenizer) <= vocab_size:
        return None
    ids = range(vocab_size, len(tokenizer))
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in list(ids)[:3])
    which = f"id {ids.start:,}" if len(ids) == 1 else f"ids {ids.start:,}..{ids.stop - 1:,}"
    return (f"the tokenizer has {len(tokenizer):,} tokens, the model {vocab_size:,} embedding rows: {which} "
            f"({names}{', ...' if len(ids) > 3 else ''}) {'has' if len(ids) == 1 else 'have'} no row")


def model_vocab_size(name: str) -> int | None:
    """The embedding rows of the model `name` (its text config), read from its config alone."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(name).get_text_config(), "vocab_size", None)


def check_vocabulary(who: str, tokenizer, vocab_size: int | None, max_id: int, holds: str) -> str | None:
    """The one vocabulary rule (train_sft.py at its start, dpo_handoff.py check): a tokenizer longer than the
    model's embedding table is refused when the ids `holds` names reach past the table (max_id >= vocab_size: the
    forward would index out of range); otherwise the note to say (None when the tokenizer fits)."""
    if not (gap := vocabulary_gap(tokenizer, vocab_size)):
        return None
    if max_id >= vocab_size:
        raise ConfigError(f"{who}: {gap}, and {holds} hold such ids: use the tokenizer that matches the model")
    return f"note: {gap}; {holds} hold none of them, so they are never trained or scored"


def load_model(name: str, attn_implementation: str | None = None, precision: str | None = None,
               lora: bool = False):
    """Load the policy with fp32 master weights; bf16/fp16 run as autocast in the trainer.

    Pure-bf16 weights would make AdamW drop every update smaller than ~0.4% of a weight: at an SFT
    learning rate of 5e-6 that is most of them. Saved weights are cast to `precision` (see save_final_model).
    With LoRA the base weights are frozen, so they load in `precision` (half the memory in bf16/fp16); the
    adapters peft adds stay fp32.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = (half_dtype(precision) if lora else None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    model.config.use_cache = False  # no KV cache while training; turned back on in the saved config
    return model


def write_portable_files(folder: str) -> None:
    """Make a folder saved by transformers 5 load as the same model under transformers 4.57 (the DPO repo's pin).

    Ours because transformers has no "save for older readers" switch: v5 writes RoPE only as `rope_parameters`,
    which v4 ignores without a word (rope_theta falls back to 10000, llama3 scaling is lost: another function),
    and names the tokenizer class `TokenizersBackend`, which v4 cannot import. Both versions read the
    top-level `rope_theta`/`rope_scaling` and `PreTrainedTokenizerFast`, so we add those; v5 keeps reading
    `rope_parameters`. `is_local`/`local_files_only` are load-time flags v5 leaks into the file.
    """
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        config = read_json(config_path)
        rope = dict(config.get("rope_parameters") or {})
        if "rope_theta" in rope:
            config["rope_theta"] = rope.pop("rope_theta")
            config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
            write_whole(config_path, config, sort_keys=True)
    tokenizer_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_path):
        tokenizer_config = read_json(tokenizer_path)
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("is_local", "local_files_only"):
            tokenizer_config.pop(key, None)
        write_whole(tokenizer_path, tokenizer_config, sort_keys=True)


def save_final_model(trainer, tokenizer, save_dir: str, precision: str) -> None:
    """Save weights in the run's precision, the tokenizer with its template and pad token, and a generation
    config that stops at <|eot_id|> (the base model stops only at <|end_of_text|>); portable to transformers 4.57.

    Atomic per file: written to a temporary folder, then each file renamed into save_dir, so a crash while
    saving leaves the previous files whole, never a half-written model.safetensors. A LoRA run's adapter is
    saved to save_dir/adapter, then merged: the weights beside it are an ordinary model, no peft needed."""

    model = trainer.accelerator.unwrap_model(trainer.model)
    main_process = trainer.is_world_process_zero()
    staging = staging_dir(save_dir, clear=main_process)
    if hasattr(model, "merge_and_unload"):  # LoRA: keep the adapter, hand DPO an ordinary model (merged weights)
        if main_process:
            model.save_pretrained(run_file(staging, "adapter"))  # beside the merged weights
        trainer.model = model = model.merge_and_unload()  # saved below; the report's samples use it too
    model.config.use_cache = True
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    dtype = half_dtype(precision)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if dtype is not None and not sharded:
        model.to(dtype)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)  # every process takes part (sharded weights are gathered); the main one writes
    if main_process:
        if dtype is not None and sharded:  # gathered in fp32: cast the files, so every launcher gives one folder
            cast_saved_weights(staging, dtype)
        write_portable_files(staging)
        usual_file_modes(staging)
        publish(save_dir)
    trainer.save_state()  # trainer_state.json: every logged number


def held_out_prompts(conversations, n: int) -> list[tuple[list[dict], str]]:
    """(prompt, reference reply) of the first `n` conversations that have a prompt: the conversation up to its
    last user turn (HH rows whose first human turn is empty start with the assistant and have none)."""
    return [(messages[:-1], messages[-1]["content"]) for messages in conversations if len(messages) > 1][:n]


def model_reply(model, tokenizer, prompt: list[dict], max_new_tokens: int,
                temperature: float = 0.0) -> tuple[str, bool]:
    """The model's reply to a chat prompt (greedy, or sampled at `temperature` > 0), and whether it stopped at an
    eos (<|eot_id|>) on its own rather than at max_new_tokens: samples, the demo and --chat."""
    import torch

    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, **sampling)
    new = out[0, inputs["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    stopped = bool(len(new)) and new[-1].item() in (eos if isinstance(eos, list) else [eos])
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def half_dtype(precision: str | None):
    """torch's dtype for `precision` "bf16"/"fp16" (None for fp32: the weights stay as they are)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def stop_token_ids(tokenizer, base_eos) -> list[int]:
    """Generation stops at <|eot_id|> (the end of an assistant turn, what SFT taught) and still at the base
    model's own eos (<|end_of_text|>), whichever eos the tokenizer at hand names."""
    base = base_eos if isinstance(base_eos, list) else [base_eos]
    ids = [tokenizer.convert_tokens_to_ids(LLAMA3_END_OF_TURN), *base, tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


def cast_saved_weights(folder: str, dtype) -> None:
    """Cast the floating-point tensors of every .safetensors file in `folder` (and config.json's dtype)."""
    from safetensors.torch import load_file, save_file

    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        write_whole(config_path, {**read_json(config_path), "dtype": str(dtype).removeprefix("torch.")},
                    sort_keys=True)


def push_final_model(save_dir: str, hub_model_id: str) -> bool:
    """Upload the final model folder as saved (with our model card), unattended, from the main process only; a
    failure is one `error:` line saying how to push later (the local model is saved). Whether it was pushed."""
    import sys

    from huggingface_hub import HfApi

    from run_env import redact

    try:
        api = HfApi()
        api.create_repo(hub_model_id, exist_ok=True)
        api.upload_folder(repo_id=hub_model_id, folder_path=save_dir, commit_message="SFT reference model for DPO",
                          ignore_patterns=hub_ignore_patterns())
    except Exception as e:  # noqa: BLE001 (any failure: the local model is saved, say how to push later)
        reason = (redact(str(e)).strip().splitlines() or [""])[0]
        print(f"error: push to {hub_model_id} failed ({type(e).__name__}: {reason}). The model is saved in "
              f"{os.path.abspath(save_dir)}; push it later with: hf upload {hub_model_id} {save_dir} .",
              file=sys.stderr)
        return False
    print(f"Pushed to https://huggingface.co/{hub_model_id}")
    return True


def build_random_llama(out_dir: str, tokenizer, **shape) -> str:
    """Save a random-weight Llama with `tokenizer` as a base-model folder (tests, demo, benchmarks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
    dims.update(shape)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **dims)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
