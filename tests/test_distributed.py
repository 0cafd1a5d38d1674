"""Scale-out: 2 processes (torchrun, gloo on CPU) equal 1 process with gradient accumulation 2; global batch
semantics; the accelerate configs parse and name the right distributed type."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

import conftest
import train_sft
from train_sft import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write_config(folder, base_model_dir, **sft):
    return conftest.write_config(folder, base_model_dir, val_ratio=0.25, eval_batch_size=4, **sft)


def test_two_processes_match_one_process_with_accumulation(tmp_path, base_model_dir):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    single.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--config",
                             str(write_config(single, base_model_dir, gradient_accumulation=2))],
                            cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    double = tmp_path / "double"
    double.mkdir()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(REPO / "train_sft.py"), "--config",
                             str(write_config(double, base_model_dir, global_batch_size=8))],
                            cwd=double, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("global batch 8 = batch_size 4 x gradient_accumulation 1 x 2 process(es)") == 1  # main only
    assert out.count("Saved the SFT model") == 1

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(double / "out")
    assert not list((double / "out").glob(".final-model-tmp"))
    one = json.loads((single / "out" / "metrics.json").read_text())
    two = json.loads((double / "out" / "metrics.json").read_text())
    assert two["global_batch"] == one["global_batch"] == 8 and two["global_step"] == one["global_step"]
    assert abs(two["eval_loss"] - one["eval_loss"]) < 2e-3


def test_global_batch_size_sets_gradient_accumulation(tmp_path, base_model_dir, monkeypatch):
    cfg = train_sft.load_config(str(write_config(tmp_path, base_model_dir, global_batch_size=64)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_sft.apply_global_batch(cfg).sft_training.gradient_accumulation == 8  # 64 / (4 x 2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train_sft.apply_global_batch(cfg).sft_training.gradient_accumulation == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"global_batch_size: 64 is not a multiple of batch_size 4 x 3 process"):
        train_sft.apply_global_batch(cfg)


def test_global_batch_size_and_gradient_accumulation_together_is_an_error(tmp_path, base_model_dir):
    with pytest.raises(ConfigError, match="set global_batch_size or gradient_accumulation, not both"):
        train_sft.load_config(str(write_config(tmp_path, base_model_dir, global_batch_size=64,
                                               gradient_accumulation=2)))


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                            ("zero3", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
