"""Config validation and the CLI's exit codes: bad input is one line on stderr, exit 2, before any loading."""

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

import train_sft
from train_sft import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path, **sft_overrides):
    raw = yaml.safe_load((REPO / "config_dpo.yaml").read_text())
    raw["sft_training"].update(sft_overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_load():
    cfg = load_config(str(REPO / "config_dpo.yaml"))
    assert cfg.policy_name == "meta-llama/Llama-3.2-1B" and cfg.precision == "bf16"
    assert cfg.dataset.dataset_name == "Anthropic/hh-rlhf" and cfg.dataset.val_ratio == 0.1
    t = cfg.sft_training
    assert (t.learning_rate, t.batch_size, t.save_dir, t.push_to_hub) == (5e-6, 16, "sft_model", False)
    assert t.wandb_project == "hh-llama32-1b-sft" and t.hub_model_id == "W-61/hh-llama32-1b-sft"
    assert load_config(str(REPO / "config_demo.yaml")).sft_training.wandb_project is None


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    assert load_config(str(write_config(tmp_path, learning_rate="5e-7"))).sft_training.learning_rate == 5e-7


def test_missing_keys_take_documented_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_name: m\ndataset: {}\nsft_training: {}\n")
    cfg = load_config(str(path))
    assert cfg.sft_training == train_sft.SFTTrainingConfig() and cfg.precision == "fp32"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rat": 1e-5}, r"unknown key 'learning_rat' in 'sft_training' \(did you mean 'learning_rate'\?\)"),
    ({"batch_size": "sixteen"}, r"sft_training\.batch_size: expected int"),
    ({"batch_size": True}, r"sft_training\.batch_size: expected int"),
    ({"learning_rate": -1e-5}, r"sft_training\.learning_rate: must be greater than 0"),
    ({"epochs": 0}, r"sft_training\.epochs: must be greater than 0"),
    ({"gradient_checkpointing": "yes"}, r"sft_training\.gradient_checkpointing: expected bool"),
    ({"lr_scheduler_type": "cosin"}, r"sft_training\.lr_scheduler_type: must be one of"),
    ({"save_dir": None}, r"sft_training\.save_dir: must not be null"),
])
def test_bad_sft_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(write_config(tmp_path, **overrides)))


@pytest.mark.parametrize(("text", "message"), [
    ("policy_name: m\ndataset: {}\n", r"missing required key 'sft_training'"),
    ("policy_name: m\ndataset: {val_ratio: 1.5}\nsft_training: {}\n", r"dataset\.val_ratio: must be less than 1"),
    ("policy_name: m\ndataset: {val_ratio: 0}\nsft_training: {}\n", r"dataset\.val_ratio: must be greater than 0"),
    ("policy_name: m\nprecision: bf32\ndataset: {}\nsft_training: {}\n", r"precision: must be one of"),
    ("policy_name: m\ndataset: {}\nsft_trainig: {}\n", r"unknown key 'sft_trainig' in top level"),
    ("policy_name: m\ndataset: []\nsft_training: {}\n", r"dataset: must be a mapping"),
    ("- just\n- a list\n", r"must be a YAML mapping"),
    ("policy_name: [unclosed\n", r"not valid YAML"),
])
def test_bad_files_and_sections(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "train_sft.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("overrides", [{"warmup_step": 10}, {"max_grad_norm": "big"},
                                       {"push_to_hub": True, "hub_model_id": "no-owner"},
                                       {"use_liger_kernel": True},  # liger-kernel is not installed here (no GPU)
                                       {"attn_implementation": "flash_attention_2"},
                                       {"attn_implementation": "flash"}])
def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path, overrides):
    result = run_cli("--config", str(write_config(tmp_path, **overrides)))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_missing_local_dataset_and_config_file(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("Anthropic/hh-rlhf", "./nowhere/hh.jsonl"))
    result = run_cli("--config", str(path))
    assert result.returncode == 2 and "dataset.dataset_name: no such file" in result.stderr
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read config" in result.stderr


def test_readme_documents_every_key_with_its_default():
    readme = (REPO / "README.md").read_text()
    for cls in (train_sft.DatasetConfig, train_sft.SFTTrainingConfig):
        hints = get_type_hints(cls)
        for f in fields(cls):
            row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \|", readme, re.M)
            assert row, f"README has no table row for {f.name}"
            assert train_sft._coerce(f.name, yaml.safe_load(row.group(1)), hints[f.name]) == f.default, f.name
