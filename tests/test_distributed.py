"""Scale-out: 2 processes (torchrun, gloo on CPU) equal 1 process with gradient accumulation 2; global batch
semantics; the accelerate configs parse and name the right distributed type."""

import json
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

import conftest
from conftest import REPO, assert_ok, cli_env, run_cli
from sft_config import ConfigError, apply_global_batch, load_config


def write_config(folder, base_model_dir, **sft):
    return conftest.write_config(folder, base_model_dir, val_ratio=0.25, eval_batch_size=4, **sft)


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path, base_model_dir):
    env = cli_env(OMP_NUM_THREADS="1")
    single = tmp_path / "single"
    single.mkdir()
    assert_ok(run_cli("--config", str(write_config(single, base_model_dir, gradient_accumulation=2)), cwd=single,
                      env=env))

    double = tmp_path / "double"
    double.mkdir()
    out = assert_ok(run_cli("--config", str(write_config(double, base_model_dir, global_batch_size=8)), cwd=double,
                            env=env, launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")))
    assert out.count("global batch 8 = batch_size 4 x gradient_accumulation 1 x 2 process(es)") == 1  # main only
    assert out.count("Saved the SFT model") == 1 and "parallel: DDP, 2 process(es)\n" in out

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(double / "out")
    assert not list((double / "out").glob(".final-model-tmp"))
    one = json.loads((single / "out" / "metrics.json").read_text())
    two = json.loads((double / "out" / "metrics.json").read_text())
    assert two["global_batch"] == one["global_batch"] == 8 and two["global_step"] == one["global_step"]
    assert abs(two["eval_loss"] - one["eval_loss"]) < 2e-3


def test_global_batch_size_sets_gradient_accumulation(tmp_path, base_model_dir):
    cfg = load_config(str(write_config(tmp_path, base_model_dir, global_batch_size=64)))
    assert apply_global_batch(cfg, 2).sft_training.gradient_accumulation == 8  # 64 / (4 x 2)
    assert apply_global_batch(cfg, 8).sft_training.gradient_accumulation == 2
    with pytest.raises(ConfigError, match=r"global_batch_size: 64 is not a multiple of batch_size 4 x 3 process"):
        apply_global_batch(cfg, 3)


def test_global_batch_size_and_gradient_accumulation_together_is_an_error(tmp_path, base_model_dir):
    with pytest.raises(ConfigError, match="set global_batch_size or gradient_accumulation, not both"):
        load_config(str(write_config(tmp_path, base_model_dir, global_batch_size=64,
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
