"""LoRA end to end (`sft_training.lora`): the run says what it trains and what that saves; the final folder is an
ordinary merged model that the DPO repo's pinned stack (transformers 4.57.3, no peft) loads as the same function;
it runs under torchrun (DDP) with packing and gradient checkpointing; a bad key is one line."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import SEVERAL_PROCESSES, assert_ok, assert_replies, chat_with, cli_env, run_cli, stack_env, write_config

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def chat_ids(folder):
    """One user/assistant exchange in the saved chat format, as token ids of the folder's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_base_dir):
    folder = tmp_path_factory.mktemp("lora_run")
    config = write_config(folder, small_base_dir, lora=LORA, learning_rate=1e-2, readiness_pairs=8)
    return folder, folder / "out", assert_ok(run_cli("--config", str(config), cwd=folder, warm=True))


@pytest.mark.slow
def test_a_lora_run_says_what_it_trains_and_saves_a_merged_model_with_its_adapter(lora_run, small_base_dir):
    from transformers import AutoModelForCausalLM

    _, save_dir, out = lora_run
    assert "training: LoRA r=4 alpha=8 dropout=0 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: " in out
    assert " trainable of " in out and "for full fine-tuning (activations not counted)" in out
    assert "Reference readiness (" in out  # base vs the merged SFT model
    assert (save_dir / "adapter" / "adapter_model.safetensors").is_file()
    adapter = json.loads((save_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (LORA["r"], LORA["alpha"])  # the keys reach peft
    assert "Trained with LoRA (r 4, alpha 8" in (save_dir / "README.md").read_text()
    merged, base = (AutoModelForCausalLM.from_pretrained(p) for p in (save_dir, small_base_dir))
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([chat_ids(save_dir)])
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-4


@pytest.mark.slow
def test_the_merged_lora_model_is_the_same_function_in_the_dpo_stack(lora_run, dpo_stack, tmp_path):
    from transformers import AutoModelForCausalLM

    _, save_dir, _ = lora_run
    there, ids = tmp_path / "logits.pt", chat_ids(save_dir)
    script = ("import sys, torch, transformers; from transformers import AutoModelForCausalLM; "
              "assert transformers.__version__ == '4.57.3'; "
              f"m = AutoModelForCausalLM.from_pretrained({str(save_dir)!r}); "
              f"torch.save(m(torch.tensor([{ids}])).logits.detach(), {str(there)!r})")
    result = subprocess.run([sys.executable, "-c", script], env=stack_env(dpo_stack), capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    here = AutoModelForCausalLM.from_pretrained(save_dir)
    with torch.no_grad():
        assert (torch.load(there) - here(torch.tensor([ids])).logits).abs().max().item() <= 1e-5


@SEVERAL_PROCESSES
@pytest.mark.slow
def test_lora_under_torchrun_with_packing_and_gradient_checkpointing(tmp_path, small_base_dir):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, small_base_dir, lora=LORA, packing=True, gradient_checkpointing=True,
                          readiness_pairs=0)
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                            launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")))
    assert "parallel: DDP, 2 process(es)" in out and "training: LoRA r=4" in out and out.count("Saved the SFT") == 1
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.cli
@pytest.mark.parametrize(("override", "message"), [
    ("sft_training.lora.rank=8", "error: unknown key 'rank' in 'lora'"),
    ("sft_training.lora.target_modules=[qkv]", "error: sft_training.lora.target_modules.0: must be one of q_proj, "),
    ("sft_training.lora=yes", "error: sft_training.lora: must be a mapping of keys, got bool"),
])
def test_a_bad_lora_key_is_one_line(tmp_path, small_base_dir, override, message):
    result = run_cli("--config", str(write_config(tmp_path, small_base_dir)), override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_chat_with_the_merged_lora_model_replies_to_each_piped_line_until_eof(lora_run):
    _, save_dir, _ = lora_run
    result = chat_with("--chat", str(save_dir), "--max-new-tokens", "8", lines="Hi\nWhat is 2 + 2?\nThanks")
    assert_replies(result, 3, max_new_tokens=8)  # EOF after the third line ended it
