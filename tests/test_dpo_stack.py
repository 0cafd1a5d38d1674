"""The customer's stack: the DPO repo (SeanYHan888/dynamic-dpo-v1) as pinned (transformers 4.57.3, trl 0.26.2,
tokenizers 0.22) loads the folder train_sft.py saved from a Hub-shaped Llama-3.2-1B base, and sees the same model:
same RoPE, tokenizer, token ids and logits, generation stopping at <|eot_id|>, and DPOTrainer 0.26.2 scoring
exactly the sequences SFT trained on (one BOS, one <|eot_id|>)."""

import json
import shutil

import pytest
import torch

from conftest import HUB_ROPE, REAL_HH, REPO, run_cli, stack_env

pytestmark = pytest.mark.slow


def test_readme_gives_the_handoff_commands():
    readme = (REPO / "README.md").read_text()
    assert "python dpo_handoff.py check --dpo-repo" in readme and "python dpo_handoff.py install --dpo-repo" in readme


@pytest.fixture(scope="module")
def seen_there(sft_run, dpo_stack, tmp_path_factory):
    """What the DPO stack saw of the SFT output folder, and the folder: tests/dpo_stack_check.py run from a
    stand-in of the DPO repo (the test double) after `dpo_handoff.py install`, importing only what it copied."""
    save_dir = sft_run[1]
    dpo_repo = tmp_path_factory.mktemp("dynamic-dpo-v1")
    for path in (REPO / "tests" / "dpo_repo_double").glob("*.*"):
        shutil.copy(path, dpo_repo)
    assert run_cli("install", "--dpo-repo", str(dpo_repo), script="dpo_handoff.py").returncode == 0
    shutil.copy(REPO / "tests" / "dpo_stack_check.py", dpo_repo)
    prefix = dpo_repo / "seen"
    result = run_cli(str(save_dir), str(REAL_HH), str(prefix), script=str(dpo_repo / "dpo_stack_check.py"),
                     cwd=dpo_repo, env=stack_env(dpo_stack), warm=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(prefix.with_suffix(".json").read_text()), torch.load(prefix.with_suffix(".pt")), save_dir


def test_the_check_ran_on_the_dpo_repos_pins(seen_there):
    seen, _, _ = seen_there
    assert seen["versions"] == {"transformers": "4.57.3", "trl": "0.26.2"}
    assert seen["load_warnings"] == []  # nothing ignored, nothing unknown


def test_same_rope_as_the_base_model(seen_there):
    from transformers import AutoModelForCausalLM

    seen, _, save_dir = seen_there
    assert seen["rope"]["theta"] == HUB_ROPE["rope_theta"] and seen["rope"]["scaling"] == HUB_ROPE["rope_scaling"]
    here = AutoModelForCausalLM.from_pretrained(save_dir)
    assert here.config.rope_parameters == {**HUB_ROPE["rope_scaling"], "rope_theta": HUB_ROPE["rope_theta"]}
    assert seen["rope"]["inv_freq"] == here.model.rotary_emb.inv_freq.tolist()


def test_same_tokenizer_and_token_ids(seen_there):
    import dpo_stack_check
    from transformers import AutoTokenizer

    seen, _, save_dir = seen_there
    here = AutoTokenizer.from_pretrained(save_dir)
    tokens = seen["tokenizer"]
    assert tokens["class"] == "PreTrainedTokenizerFast"
    assert (tokens["bos"], tokens["eos"], tokens["pad"]) == ("<|begin_of_text|>", "<|eot_id|>",
                                                             "<|finetune_right_pad_id|>")
    assert (here.bos_token, here.eos_token, here.pad_token) == (tokens["bos"], tokens["eos"], tokens["pad"])
    assert tokens["chat_template"] == here.chat_template
    expected = [here.apply_chat_template(c, return_dict=False) for c in dpo_stack_check.CONVERSATIONS]
    assert seen["ids"] == expected


def test_same_logits(seen_there):
    from transformers import AutoModelForCausalLM

    seen, logits_there, save_dir = seen_there
    here = AutoModelForCausalLM.from_pretrained(save_dir)
    with torch.no_grad():
        logits_here = here(torch.tensor([seen["ids"][1]])).logits
    assert logits_there.dtype == logits_here.dtype == torch.float32
    assert (logits_there - logits_here).abs().max().item() <= 1e-5


def test_generation_stops_at_eot(seen_there):
    seen, _, _ = seen_there
    eot = 128009
    assert eot in seen["eos_token_id"]
    assert len(seen["generated"]) == 3 and seen["generated"][-1] == eot  # forced at step 3, and it stopped


def test_dpo_trainer_0_26_scores_the_sft_sequences(seen_there):
    from transformers import AutoTokenizer

    from data_process_sft import load_raw_dataset
    from hh_sft_chat import build_dpo_dataset, tokenize_conversations

    seen, _, save_dir = seen_there
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    conversations = build_dpo_dataset(load_raw_dataset(str(REAL_HH), "train[:16]"))
    assert all(loss == loss for loss in seen["dpo_losses"]) and len(seen["dpo_losses"]) == 2
    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row, conv in zip(seen["dpo_rows"], conversations):
        prompt = row["prompt_input_ids"]
        assert prompt.count(bos) == 1 and prompt[0] == bos
        assert tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        for side in ("chosen", "rejected"):
            reply = row[f"{side}_input_ids"]
            assert reply[-1] == eot and reply.count(eot) == 1  # one <|eot_id|>, not two
            assert prompt + reply == tokenize_conversations(tokenizer, [conv["prompt"] + conv[side]])[0]


def test_train_sft_refuses_the_dpo_stack_in_one_line(dpo_stack, tmp_path):
    result = run_cli("--config", str(REPO / "config_dpo.yaml"), cwd=tmp_path, env=stack_env(dpo_stack))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unsupported stack: transformers 4.57.3 (needs >=5,<6), "
                                    "trl 0.26.2 (needs >=1,<2)")
    assert "pip install -r requirements.txt" in result.stderr
