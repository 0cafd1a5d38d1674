"""Reference readiness: the report's numbers equal a direct per-pair computation, only the pairs the DPO builder
keeps are scored, and a run reports it (or skips it with readiness_pairs: 0)."""

import json
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset

import sft_readiness as sr
from conftest import REAL_HH, assert_ok, run_cli
from data_process_sft import load_raw_dataset


@pytest.fixture(scope="module")
def model_and_tokenizer(base_model_dir, llama32_tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float64), llama32_tokenizer


def direct_logp(model, tokenizer, prompt, reply):
    """One pair side, unbatched: log p(reply tokens, <|eot_id|> | prompt) through the chat template."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    ids = tokenizer.apply_chat_template(prompt + reply, return_dict=False)
    assert ids[: len(prompt_ids)] == prompt_ids and ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    token = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(prompt_ids) - 1:]
    return token.sum().item(), token.mean().item()


def test_scores_equal_a_direct_per_pair_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    raw = load_raw_dataset(str(REAL_HH), "train[:12]")
    pairs = sr.held_out_pairs(raw, list(range(12)), n=8)
    replies = sr.reply_sequences(tokenizer, pairs, max_length=4096)
    scores = sr.reply_logps(model, replies, tokenizer.pad_token_id, batch_size=3)  # padded batches of 3
    assert list(scores["pairs"]) == list(range(len(pairs))) and len(pairs) == 8
    for i, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            total, mean = direct_logp(model, tokenizer, pair["prompt"], pair[side])
            assert scores[f"{side}_sum"][i] == pytest.approx(total, abs=1e-5)
            assert scores[f"{side}_mean"][i] == pytest.approx(mean, abs=1e-5)


def test_summary_is_the_plain_statistics_of_the_scores():
    sft = {"chosen_sum": np.array([-10.0, -20.0, -5.0, -8.0]), "rejected_sum": np.array([-12.0, -15.0, -9.0, -8.5]),
           "chosen_mean": np.array([-1.0, -2.0, -0.5, -0.2]), "rejected_mean": np.array([-1.5, -1.0, -0.1, -0.3])}
    base = {"chosen_sum": np.array([-11.0, -19.0, -7.0, -9.0]), "rejected_sum": np.array([-12.0, -15.0, -9.0, -9.0]),
            "chosen_mean": np.zeros(4), "rejected_mean": np.zeros(4)}
    report = sr.summarize(sft, base)
    assert report["pairs"] == 4 and report["sft_chosen_logp"] == -10.75 and report["base_chosen_logp"] == -11.5
    assert report["chosen_raised_share"] == 0.75  # -10 > -11, -20 < -19, -5 > -7, -8 > -9
    assert report["pref_accuracy"] == 0.75 and report["pref_accuracy_per_token"] == 0.5
    assert report["margins"] == [2.0, -5.0, 4.0, 0.5] and report["margin_percentiles"]["p50"] == 1.25
    assert sr.wandb_metrics(report)["eval/ref_margin_p50"] == 1.25


def test_pairs_the_dpo_builder_drops_are_not_scored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"},  # differ
            {"chosen": "\n\nHuman: \n\nAssistant: x", "rejected": "\n\nHuman: \n\nAssistant: y"},  # no prompt
            {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}]
    pairs = sr.held_out_pairs(Dataset.from_list(rows), [0, 1, 2, 3], n=10)
    assert [p["chosen"][0]["content"] for p in pairs] == ["hello", "yes"]
    replies = sr.reply_sequences(tokenizer, pairs, max_length=512)
    assert len(sr.reply_logps(model, replies, tokenizer.pad_token_id, batch_size=4)["chosen_sum"]) == 2


@pytest.mark.slow
def test_a_run_reports_readiness_and_readiness_reruns_it_on_the_saved_model(sft_run, tmp_path):
    from wandb_records import history

    folder, save_dir, out = sft_run
    assert "Reference readiness (" in out and "preference accuracy (chosen > rejected)" in out
    metrics = json.loads((save_dir / "metrics.json").read_text())
    report = metrics["readiness"]
    assert 0 < report["pairs"] <= 13 and len(report["margins"]) == report["pairs"]
    assert "## Reference readiness" in (save_dir / "README.md").read_text()
    assert (save_dir / "readiness_margins.png").read_bytes().startswith(b"\x89PNG")
    [run_file] = list((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    assert history(run_file)["eval/ref_pref_accuracy"] == [report["pref_accuracy"]]

    copy = tmp_path / "sft_out"
    shutil.copytree(save_dir, copy)
    config = (folder / "config.yaml").read_text().replace(str(save_dir), str(copy))
    (tmp_path / "config.yaml").write_text(config.replace("wandb_project: sft-test", "wandb_project: null"))
    again = assert_ok(run_cli("--config", str(tmp_path / "config.yaml"), "--readiness", cwd=tmp_path, warm=True))
    assert "Reference readiness (" in again and "Saved the SFT model" not in again
    assert f"Updated in {copy}: metrics.json (its readiness section), the model card README.md and " \
           "readiness_margins.png" in again
    rerun = json.loads((copy / "metrics.json").read_text())["readiness"]
    assert rerun["margins"] == pytest.approx(report["margins"], abs=1e-4)
