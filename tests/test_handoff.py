"""Handoff to DPO: the SFT output folder is the DPO policy and reference as is, on preference rows built by the
same parser, and the run leaves a report of what was trained."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from data_process_sft import build_dpo_dataset, load_raw_dataset

REPO = Path(__file__).resolve().parent.parent


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_build_dpo_dataset_shapes_and_drops():
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a fruit\n\nAssistant: An apple.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a fruit\n\nAssistant: No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": None, "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nAssistant: x", "rejected": "\n\nAssistant: y"},
        {"chosen": "\r\n\r\nHuman: q\r\n\r\nAssistant: part\n\nAssistant: two",  # CRLF + merged turns
         "rejected": "\n\nHuman: q\n\nAssistant: bad"},
    ]
    data, report = build_dpo_dataset(Dataset.from_list(rows), return_report=True)
    assert report.rows_read == 6 and report.rows_kept == 2
    assert report.dropped == {"prompts_differ": 1, "empty_final_reply": 1, "not_a_string": 1, "no_prompt": 1}
    assert data[0]["prompt"] == msgs(("user", "hi"), ("assistant", "hello"), ("user", "name a fruit"))
    assert data[0]["chosen"] == msgs(("assistant", "An apple.")) and data[0]["rejected"] == msgs(("assistant", "No."))
    assert data[1]["chosen"] == msgs(("assistant", "part\n\ntwo"))


def test_real_rows_mostly_survive(hh_rows):
    _, report = build_dpo_dataset(Dataset.from_list(hh_rows), return_report=True)
    assert report.rows_kept / report.rows_read > 0.9


@pytest.fixture(scope="module")
def sft_output(tmp_path_factory, base_model_dir):
    """A tiny model trained and saved by train_sft.py (a short real run, with its end-of-run report)."""
    folder = tmp_path_factory.mktemp("sft_run")
    config = {
        "policy_name": str(base_model_dir), "precision": "fp32",
        "dataset": {"dataset_name": str(REPO / "data" / "hh_sample.jsonl"), "subset": "train[:48]",
                    "val_ratio": 0.2, "seed": 1},
        "sft_training": {"batch_size": 4, "eval_batch_size": 8, "epochs": 1, "max_length": 96,
                         "learning_rate": 1e-3, "warmup_steps": 0, "log_steps": 2, "eval_steps": 5,
                         "save_steps": 100, "save_dir": str(folder / "sft_model"), "wandb_project": None},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--config", str(folder / "config.yaml")],
                            cwd=folder, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "sft_model"


def test_dpo_trainer_runs_on_the_sft_output_as_policy_and_reference(sft_output, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_output)
    policy = AutoModelForCausalLM.from_pretrained(sft_output)
    reference = AutoModelForCausalLM.from_pretrained(sft_output)
    pairs = build_dpo_dataset(load_raw_dataset(str(REPO / "data" / "hh_sample.jsonl"), "train[:40]"))
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-4,
                     max_length=128, report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                         processing_class=tokenizer)
    header = tokenizer("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    first = trainer.train_dataset[0]
    assert first["prompt_ids"][-len(header):] == header  # the prompt ends with the Llama-3 assistant header
    assert first["chosen_ids"][-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")  # replies end as SFT taught
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert torch.isfinite(torch.tensor(losses)).all()


def test_run_leaves_metrics_curves_samples_and_a_model_card(sft_output):
    metrics = json.loads((sft_output / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy", "tokens_trained", "tokens_seen", "runtime_s",
                "global_batch", "config", "data"):
        assert key in metrics, key
    assert 0 < metrics["tokens_trained"] < metrics["tokens_seen"]
    assert metrics["data"]["rows_read"] == 48 and metrics["config"]["sft_training"]["batch_size"] == 4
    png = (sft_output / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    samples = [json.loads(line) for line in (sft_output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"][-1]["role"] == "user" and "reply" in s for s in samples)
    card = (sft_output / "README.md").read_text()
    assert "base_model:" in card and "eval loss" in card and "rows read 48" in card and "`learning_rate`" in card


def test_inspect_prints_marked_conversations_and_the_report():
    result = subprocess.run([sys.executable, str(REPO / "data_process_sft.py"), "--config",
                             str(REPO / "config_demo.yaml"), "--inspect", "-n", "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("=== conversation") == 2 and "[[" in out and "<|eot_id|>]]" in out
    assert "\x1b[" not in out  # piped: brackets, not colour
    for needle in ("rows read 210, kept 208", "dropped no_assistant_turn: 1", "dropped chosen_not_a_string: 1",
                   "token length percentiles", "rows over max_length", "assistant-token share",
                   "assistant turns per conversation"):
        assert needle in out, needle
