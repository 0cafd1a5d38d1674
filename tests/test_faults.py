"""Faults and bad input: resume after SIGKILL, SIGTERM/SIGINT, NaN loss, W&B and Hub outages, secrets, pre-flight."""

import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import conftest
from conftest import REPO, assert_ok, catches, cli_env, real_checkpoint, run_cli, wait_until
from model_io import prepare_tokenizer
from save_dir_contract import prepare_save_dir
from sft_config import ConfigError

SECRETS = {"HF_TOKEN": "hf_FAKEsecretTOKEN123456789", "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567"}


def write_config(folder, base_model_dir, **sft):
    """96 conversations in batches of 4 (~22 steps an epoch), a checkpoint every 3 steps, every step logged."""
    return conftest.write_config(folder, base_model_dir, **{"subset": "train[:96]", "val_ratio": 0.1,
                                                           "save_steps": 3, **sft})


def start(config, cwd, environ=None, *args):
    return subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), "--config", str(config), *args], cwd=cwd,
                            env=environ or cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def start_logged(config, folder):
    """A run whose stdout and stderr go to files in `folder`, so a test can wait for a line while it runs;
    returns (process, stdout path, stderr path) once the start summary says training begins."""
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "train_sft.py"), "--config", str(config)], cwd=folder,
                                env=cli_env(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    wait_until(lambda: "checkpoints and final model" in out.read_text(), proc)
    return proc, out, err


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_sigkill_then_same_command_resumes_to_the_same_weights(tmp_path, small_base_dir, lora):
    """Also the determinism check: same seed and config in another process give the identical loss log. With
    LoRA the checkpoints hold the adapter and its optimizer state: the resumed adapter equals the reference."""
    reference = tmp_path / "reference"
    reference.mkdir()
    assert_ok(run_cli("--config", str(write_config(reference, small_base_dir, lora=lora)), cwd=reference, warm=True))

    killed = tmp_path / "killed"
    killed.mkdir()
    config = write_config(killed, small_base_dir, lora=lora)
    proc = start(config, killed)
    wait_until((killed / "out" / "checkpoint-6" / "trainer_state.json").exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "out" / "model.safetensors").exists()

    out = assert_ok(run_cli("--config", str(config), cwd=killed, warm=True))
    assert "Resuming from" in out and "checkpoint-" in out
    expected = load_file(reference / "out" / "model.safetensors")
    got = load_file(killed / "out" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-5
    if lora:
        expected, got = (load_file(run / "out" / "adapter" / "adapter_model.safetensors")
                         for run in (reference, killed))
        assert expected.keys() == got.keys() and all("lora_" in k for k in got)
        assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-5

    def loss_log(run):
        state = json.loads((run / "out" / "trainer_state.json").read_text())
        return [(h["step"], h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h]

    # steps 1-6 were logged by the killed process, the rest by the resumed one: both equal the reference
    assert len(loss_log(reference)) >= 20 and loss_log(killed) == loss_log(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_non_zero(tmp_path, small_base_dir, sig):
    config = write_config(tmp_path, small_base_dir, save_steps=1000, epochs=50)  # no scheduled checkpoint
    proc, _, err_file = start_logged(config, tmp_path)
    wait_until(lambda: catches(proc.pid, signal.SIGTERM), proc)  # training has begun: our handlers are installed
    proc.send_signal(sig)
    proc.wait(timeout=300)
    err = err_file.read_text()
    assert proc.returncode == 128 + sig.value, err[-2000:]
    assert f"Stopped by {sig.name}" in err and "Resume with the same command" in err
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_second_signal_ends_the_run_at_once(tmp_path, base_model_dir):
    """The second Ctrl-C is sent once the first one's handler has spoken, well inside the long step it lets
    finish (batches of 16 x 256 tokens over the 128k vocabulary take seconds here)."""
    config = write_config(tmp_path, base_model_dir, save_steps=1000, epochs=50, batch_size=16, max_length=256)
    proc, _, err = start_logged(config, tmp_path)
    wait_until(lambda: catches(proc.pid, signal.SIGTERM), proc)  # training has begun: our handlers are installed
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "SIGINT received" in err.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGINT  # ended by the signal itself, not after a checkpoint
    assert "Stopped by" not in err.read_text() and not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, learning_rate=1e12, save_steps=1, max_grad_norm=1e12)
    code, out, err = finish(start(config, tmp_path))
    assert code == 1, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("error: the training loss became"))
    step = int(line.split(" at step ")[1].split(";")[0])
    assert step >= 2 and "Last good checkpoint:" in line
    last = tmp_path / "out" / f"checkpoint-{step - 1}"
    assert last.is_dir() and (last / "trainer_state.json").exists()
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_wandb_without_key_goes_offline_by_itself_with_stdin_closed(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, wandb_project="no-key-test")
    environ = {k: v for k, v in cli_env().items() if k != "WANDB_MODE"}
    environ.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path))  # no ~/.netrc, no stored key
    code, out, err = finish(start(config, tmp_path, environ), timeout=300)
    assert code == 0, err[-2000:]
    assert "W&B: no API key" in out and "wandb sync" in out
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_secrets_are_never_printed_or_written_and_a_failed_push_keeps_the_model(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, wandb_project="secret-test", push_to_hub=True,
                          hub_model_id="someone/sft-test")
    environ = cli_env(WANDB_DIR=str(tmp_path), HF_HUB_OFFLINE="1", **SECRETS)
    code, out, err = finish(start(config, tmp_path, environ))
    assert code == 1, err[-2000:]
    assert "push to someone/sft-test failed" in err and "hf upload someone/sft-test" in err
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the local model is intact
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file()
             and any(v.encode() in p.read_bytes() for v in SECRETS.values())]
    assert leaks == []
    assert not any(v in out + err for v in SECRETS.values())


# --- pre-flight: one line, exit 2, before any model is loaded ------------------------------------------------
def test_resume_picks_the_last_complete_checkpoint_and_drops_an_incomplete_one(tmp_path, capsys):
    real_checkpoint(tmp_path, 9)
    real_checkpoint(tmp_path, 12)  # newer than checkpoint-9 by number, older by string order
    half = real_checkpoint(tmp_path, 15, complete=False)  # killed while writing
    assert prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-12")
    assert capsys.readouterr().out == (f"Removing incomplete checkpoint {tmp_path / 'checkpoint-15'} (the run was "
                                       "killed while writing it)\n")
    assert not half.exists()


def test_finished_model_is_never_trained_over_silently(tmp_path):
    real_checkpoint(tmp_path, 3)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")  # written after the weights: the run finished
    with pytest.raises(ConfigError, match=r"already holds a finished model and its kept resume state "
                                          r"\(checkpoint-3\): raise sft_training\.epochs to continue from it; "
                                          r"--overwrite deletes both and trains a new model from step 0; or set "
                                          r"another sft_training\.save_dir$"):
        prepare_save_dir(str(tmp_path), overwrite=False)
    assert prepare_save_dir(str(tmp_path), overwrite=True) is None
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model.safetensors").exists()


def cli(config, *args, environ=None):
    return subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--config", str(config), *args],
                          capture_output=True, text=True, env=environ or cli_env(), timeout=300)


PREFLIGHT = {"unwritable": "is not writable", "push_without_token": "there is no Hugging Face token",
             "finished_model": "already holds a finished model",
             "no_chosen": "are none of the formats SFT reads", "empty": "fewer than 2 usable rows"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_preflight_failures_are_one_line_exit_2(tmp_path, small_base_dir, case):
    sft, environ = {}, cli_env()
    if case == "unwritable":
        (tmp_path / "a_file").write_text("")
        sft["save_dir"] = str(tmp_path / "a_file" / "out")
    elif case == "push_without_token":
        sft.update(push_to_hub=True, hub_model_id="someone/x")
        environ = {**cli_env(HOME=str(tmp_path)), "HF_TOKEN": ""}
    elif case == "finished_model":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "model.safetensors").write_bytes(b"x")
        (tmp_path / "out" / "metrics.json").write_text('{"tokens_trained": 1}')  # ours
    config = write_config(tmp_path, small_base_dir, **sft)
    if case in ("no_chosen", "empty"):
        data = tmp_path / "data.jsonl"
        data.write_text('{"text": "hi"}\n' if case == "no_chosen" else '{"chosen": "\\n\\nHuman: only a question"}\n')
        raw = yaml.safe_load(config.read_text())
        raw["dataset"].update(dataset_name=str(data), subset="train")
        config.write_text(yaml.safe_dump(raw))
    result = cli(config, environ=environ)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    if case in ("no_chosen", "empty"):  # found while reading the data: its progress lines come first
        lines = [line for line in lines if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert PREFLIGHT[case] in lines[0]
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_tokenizer_without_llama3_chat_tokens_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<s>": 1}, unk_token="a")),
                                   bos_token="<s>", eos_token="<s>", pad_token="a")
    with pytest.raises(ConfigError, match="lacks the Llama-3 chat tokens"):
        prepare_tokenizer(bare)
