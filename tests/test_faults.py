"""Faults and bad input: resume after SIGKILL, SIGTERM/SIGINT, NaN loss, W&B and Hub outages, secrets, pre-flight."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_sft
from train_sft import ConfigError, prepare_save_dir

REPO = Path(__file__).resolve().parent.parent
SECRETS = {"HF_TOKEN": "hf_FAKEsecretTOKEN123456789", "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567"}


def write_config(tmp_path, base_model_dir, name="config.yaml", **sft):
    config = {
        "policy_name": str(base_model_dir), "precision": "fp32",
        "dataset": {"dataset_name": str(REPO / "data" / "hh_sample.jsonl"), "subset": "train[:96]",
                    "val_ratio": 0.1, "seed": 1},
        "sft_training": {"batch_size": 4, "eval_batch_size": 8, "epochs": 1, "max_length": 64,
                         "learning_rate": 1e-3, "warmup_steps": 0, "log_steps": 1, "eval_steps": 1000,
                         "save_steps": 3, "save_dir": str(tmp_path / "out"), "wandb_project": None, **sft},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def env(**extra):
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "HF_TOKEN")}
    return {**base, "WANDB_MODE": "offline", **extra}


def start(config, cwd, environ=None, *args):
    return subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), "--config", str(config), *args], cwd=cwd,
                            env=environ or env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before the checkpoint appeared"
        assert time.time() < deadline
        time.sleep(0.02)


def test_sigkill_then_same_command_resumes_to_the_same_weights(tmp_path, base_model_dir):
    reference = tmp_path / "reference"
    reference.mkdir()
    code, _, err = finish(start(write_config(reference, base_model_dir), reference))
    assert code == 0, err[-2000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    config = write_config(killed, base_model_dir)
    proc = start(config, killed)
    wait_for(killed / "out" / "checkpoint-6" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "out" / "model.safetensors").exists()

    code, out, err = finish(start(config, killed))
    assert code == 0, err[-2000:]
    assert "Resuming from" in out and "checkpoint-" in out
    expected = load_file(reference / "out" / "model.safetensors")
    got = load_file(killed / "out" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_non_zero(tmp_path, base_model_dir, sig):
    config = write_config(tmp_path, base_model_dir, save_steps=1000, epochs=5)  # no scheduled checkpoint
    log = tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), "--config", str(config)], cwd=tmp_path,
                                env=env(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while "checkpoints and final model" not in log.read_text():  # the start summary: training begins
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        time.sleep(3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig.value, err[-2000:]
    assert f"Stopped by {sig.name}" in err and "Resume with the same command" in err
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
