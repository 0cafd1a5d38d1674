"""Handoff to DPO: the SFT output folder is the DPO policy and reference as is, on preference rows built by the
same parser, and the run leaves a report of what was trained."""

import json
import math

import pytest
from datasets import Dataset

from conftest import REAL_HH, SAMPLE, run_cli, write_config
from data_process_sft import load_raw_dataset
from hh_sft_chat import build_dpo_dataset, tokenize_conversations


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
def sft_output(sft_run):
    """A tiny model trained and saved by train_sft.py, with its end-of-run report (conftest.sft_run)."""
    return sft_run[1]


@pytest.mark.slow
def test_dpo_trainer_runs_on_the_sft_output_as_policy_and_reference(sft_output, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_output)
    policy = AutoModelForCausalLM.from_pretrained(sft_output)
    reference = AutoModelForCausalLM.from_pretrained(sft_output)
    pairs = build_dpo_dataset(load_raw_dataset(str(SAMPLE), "train[:40]"))
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


@pytest.mark.slow
def test_run_leaves_metrics_curves_samples_and_a_model_card(sft_output):
    metrics = json.loads((sft_output / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy", "tokens_trained", "tokens_seen", "runtime_s",
                "global_batch", "config", "data"):
        assert key in metrics, key
    assert 0 < metrics["tokens_trained"] < metrics["tokens_seen"]
    assert metrics["data"]["rows_read"] == 64 and metrics["config"]["sft_training"]["batch_size"] == 4
    png = (sft_output / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    samples = [json.loads(line) for line in (sft_output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"][-1]["role"] == "user" and "reply" in s for s in samples)
    card = (sft_output / "README.md").read_text()
    assert "base_model:" in card and "eval loss" in card and "rows read 64" in card and "`learning_rate`" in card


@pytest.mark.slow
def test_inspect_prints_marked_conversations_and_the_report(tmp_path, base_model_dir):
    config = write_config(tmp_path, base_model_dir, subset="train", max_length=256)
    result = run_cli("--config", str(config), "--inspect", "-n", "2", cwd=tmp_path, script="data_process_sft.py")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("=== conversation") == 2 and "[[" in out and "<|eot_id|>]]" in out
    assert "\x1b[" not in out  # piped: brackets, not colour
    for needle in ("rows read 210, kept 208", "dropped no_assistant_turn: 1", "dropped chosen_not_a_string: 1",
                   "token length percentiles", "rows over max_length", "assistant-token share",
                   "assistant turns per conversation"):
        assert needle in out, needle


@pytest.mark.slow
def test_the_readme_call_scores_exactly_the_sft_sequences_in_trl_1x(sft_output, tmp_path):
    """`build_dpo_dataset(raw, tok)`, the call the README gives (text rows under TRL 0.26, see
    test_dpo_stack.py), gives TRL 1.x conversational rows and the sequences SFT trained on: one BOS, the
    chat-template prompt, the reply and exactly one <|eot_id|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_output)
    raw = load_raw_dataset(str(REAL_HH), "train[:24]")
    pairs = build_dpo_dataset(raw, tokenizer)
    assert pairs[0]["chosen"][0]["role"] == "assistant"  # conversational under TRL 1.x
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", max_length=None)
    policy = AutoModelForCausalLM.from_pretrained(sft_output)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, processing_class=tokenizer)
    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row, conv in zip(trainer.train_dataset, pairs):
        for side in ("chosen", "rejected"):
            expected = tokenize_conversations(tokenizer, [conv["prompt"] + conv[side]])[0]
            assert row["prompt_ids"] + row[f"{side}_ids"] == expected
            assert row["prompt_ids"].count(bos) == 1 and row[f"{side}_ids"][-2:].count(eot) == 1
