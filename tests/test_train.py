"""End-to-end runs of train_sft.py as a user runs it: a base-Llama-3-like folder (real tokenizer, no chat
template, no pad token, tiny random weights) and an HH jsonl file, offline, W&B in offline mode."""

import json
import math
import shutil

import pytest

from conftest import REPO, assert_ok, assert_replies, chat_with, cli_env, run_cli, write_config
from wandb_records import history

FIVE_METRICS = ("train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "eval/accuracy")
pytestmark = pytest.mark.slow


def run(args, cwd, script="train_sft.py"):
    return assert_ok(run_cli(*args, cwd=cwd, script=str(script), env=cli_env(WANDB_DIR=str(cwd)), warm=True))


def test_full_run_trains_evaluates_saves_reloads_and_logs_five_metrics(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, save_dir, out = sft_run
    assert "global batch 4 = batch_size 4 x gradient_accumulation 1 x 1 process(es)" in out
    assert "rows read 64" in out and f"Saved the SFT model to {save_dir}" in out
    assert "parallel: single process, 1 process(es)\n" in out

    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "trainer_state.json", "metrics.json"):
        assert (save_dir / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and "<|start_header_id|>" in tokenizer.chat_template
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(save_dir).eos_token_id
    assert model.config.use_cache is True

    metrics = json.loads((save_dir / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "eval_loss", "eval_accuracy"))
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["data"]["rows_read"] == 64
    # One train loss: the Trainer's (every step of an uninterrupted run) = metrics.json = the printed summary,
    # with a step count (13) that is no multiple of log_steps (2): the last step is logged too.
    state = json.loads((save_dir / "trainer_state.json").read_text())
    trainers = next(h["train_loss"] for h in state["log_history"] if "train_loss" in h)
    assert metrics["global_step"] % 2 == 1 and metrics["train_loss"] == pytest.approx(trainers, abs=1e-6)
    assert f"train loss {trainers:.4f} (mean over all " in out

    # What DPO and the Hub need, and no resume state: the checkpoints, training_args.bin and the lock are gone
    assert not list(save_dir.glob("checkpoint-*")) and not (save_dir / "training_args.bin").exists()
    assert not (save_dir / ".lock").exists()
    assert "  resume state removed (checkpoint-" in out and "sft_training.keep_checkpoints: true" in out

    [run_file] = list((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = history(run_file)
    for name in FIVE_METRICS:
        assert logged.get(name) and all(math.isfinite(v) for v in logged[name]), name
    assert logged["eval/accuracy"][-1] == metrics["eval_accuracy"]


@pytest.mark.parametrize("packing", [False, True])
def test_dry_run_prints_checks_and_saves_apart(tmp_path, small_base_dir, packing):
    config = write_config(tmp_path, small_base_dir, wandb_project="would-log", packing=packing, max_length=96,
                          save_dir=str(tmp_path / "sft_out"))
    out = run(["--config", str(config), "--dry-run"], tmp_path)
    assert "Dry-run checks:" in out and "FAIL" not in out
    assert ("packed into" in out) == packing
    state = json.loads((tmp_path / "sft_out_dry_run" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert any("eval_accuracy" in h for h in state["log_history"])
    assert not (tmp_path / "sft_out").exists() and not (tmp_path / "wandb").exists()


def test_offline_demo_from_a_fresh_copy(tmp_path):
    for source in REPO.glob("*.py"):
        shutil.copy(source, tmp_path / source.name)
    shutil.copy(REPO / "config_demo.yaml", tmp_path)
    shutil.copytree(REPO / "data", tmp_path / "data")
    out = run(["--demo"], tmp_path, script=tmp_path / "train_sft.py")
    assert "Built a tiny random-weight base Llama" in out and "Demo: writes to ./demo_run/sft_model" in out
    assert "User: " in out and "\nAssistant: " in out
    assert out.count("rows read 210") == 1  # the data report, once
    assert "Reference readiness (21 held-out pairs" in out
    assert "matplotlib is not installed" not in out
    save_dir = tmp_path / "demo_run" / "sft_model"
    assert (save_dir / "model.safetensors").is_file() and (save_dir / "training_curves.png").is_file()
    assert f"policy_name: {save_dir}" in (save_dir / "README.md").read_text()  # nothing was pushed: the folder
    assert f"Talk to it: python train_sft.py --chat {'./demo_run/sft_model'}" in out
    chat = chat_with("--config", "config_demo.yaml", "--chat", "--max-new-tokens", "12", cwd=tmp_path,
                     script=tmp_path / "train_sft.py", lines="How do I keep tomatoes healthy?\nAnd roses?\n/reset\n"
                                                             "Hi\n\nnever read\n")
    assert_replies(chat, 3, max_new_tokens=12)  # the empty line ended it
    assert "(conversation cleared)" in chat.stdout and chat.stdout.startswith(
        "Chatting with ./demo_run/sft_model (greedy, up to 12 new tokens).")
    again = run(["--demo"], tmp_path, script=tmp_path / "train_sft.py")
    assert "Demo: replaces the previous demo output in ./demo_run/sft_model" in again
    assert "Reusing the demo's base model at ./demo_run/base_model" in again and "Built a tiny" not in again
