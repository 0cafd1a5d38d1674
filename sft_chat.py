"""`python train_sft.py --config config_dpo.yaml --chat [DIR]`: talk to the saved model before spending GPU hours on
DPO (torchtune's `tune run generate`, axolotl's `inference`, for this stage's output).

It reads stdin (a terminal, a pipe or a test alike): each line is a user turn, the conversation is kept across
turns in the chat template the model was trained with, `/reset` clears it, an empty line or EOF ends. Each reply is
printed with whether it stopped at <|eot_id|> or was cut at the length limit. Greedy unless --temperature > 0.
"""

from __future__ import annotations

import os
import sys

from save_dir_contract import CHECKPOINT, MARK, run_file
from sft_config import ConfigError


def command(folder: str | None, config: str, overrides: list[str], temperature: float, max_new_tokens: int) -> int:
    """`--chat [DIR]`: the finished model in DIR, else in the config's save_dir; a folder that is not one is one
    `error:` line, exit 2, before any model loads."""
    from run_env import check_stack
    from sft_config import load_config

    try:
        check_stack()
        folder = folder or load_config(config, overrides).sft_training.save_dir
        check_folder(folder)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return chat(folder, temperature=temperature, max_new_tokens=max_new_tokens)


def check_folder(folder: str) -> None:
    """Refuse, in one line saying what to point --chat at, a folder that is not a finished model of ours."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--chat {folder}: no such folder; point it at the save_dir of a finished run")
    if CHECKPOINT.match(os.path.basename(os.path.normpath(folder))):
        raise ConfigError(f"--chat {folder}: a checkpoint (resume state), not the model a run hands off; point it at "
                          f"its save_dir ({os.path.dirname(os.path.normpath(folder)) or '.'}) once the run finished")
    ours = os.path.exists(os.path.join(folder, MARK))
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any(os.path.isfile(run_file(folder, name)) for name in weights):
        if ours:
            raise ConfigError(f"--chat {folder}: this run has not finished (no final model yet); run the same "
                              "training command to finish it, then --chat")
        raise ConfigError(f"--chat {folder}: no model.safetensors; point it at the save_dir of a finished run")
    if ours and not os.path.isfile(run_file(folder, "metrics.json")):
        raise ConfigError(f"--chat {folder}: this run's final save was cut short; run the same training command to "
                          "finish it, then --chat")
    if not os.path.isfile(run_file(folder, "chat_template.jinja")):
        raise ConfigError(f"--chat {folder}: no chat template (chat_template.jinja): not a model train_sft.py saved")


def chat(folder: str, temperature: float = 0.0, max_new_tokens: int = 256, lines=None) -> int:
    """The conversation loop on `lines` (stdin by default); exit code 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_io import model_reply

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    how = f"sampling at temperature {temperature:g}" if temperature > 0 else "greedy"
    print(f"Chatting with {folder} ({how}, up to {max_new_tokens} new tokens). /reset clears the conversation; an "
          "empty line or EOF ends.", flush=True)
    messages: list[dict[str, str]] = []
    for line in lines if lines is not None else sys.stdin:
        text = line.strip()
        if not text:
            break
        if text == "/reset":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        reply, stopped = model_reply(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": reply})
        end = "stopped at <|eot_id|>" if stopped else f"cut at max_new_tokens {max_new_tokens}"
        print(f"assistant: {reply}\n  [{end}]", flush=True)
    return 0
