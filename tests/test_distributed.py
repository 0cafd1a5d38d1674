"""Scale-out: 2 processes (torchrun, gloo on CPU) equal 1 process with gradient accumulation 2; global batch
semantics; the accelerate configs parse and name the right distributed type."""

import json
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

import conftest
from conftest import REPO, SEVERAL_PROCESSES, assert_ok, catches, cli_env, run_cli, wait_until
from sft_config import ConfigError, apply_global_batch, load_config


def write_config(folder, small_base_dir, **sft):
    return conftest.write_config(folder, small_base_dir, val_ratio=0.25, eval_batch_size=4, **sft)


@SEVERAL_PROCESSES
@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path, small_base_dir):
    env = cli_env(OMP_NUM_THREADS="1")
    single = tmp_path / "single"
    single.mkdir()
    assert_ok(run_cli("--config", str(write_config(single, small_base_dir, gradient_accumulation=2)), cwd=single,
                      env=env))

    double = tmp_path / "double"
    double.mkdir()
    result = run_cli("--config", str(write_config(double, small_base_dir, global_batch_size=8)), cwd=double,
                     env=env, launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    out = assert_ok(result)
    assert "find_unused_parameters" not in result.stderr  # DDP's per-rank warning: no graph walk each step
    assert out.count("global batch 8 = batch_size 4 x gradient_accumulation 1 x 2 process(es)") == 1  # main only
    assert out.count("Saved the SFT model") == 1 and "parallel: DDP, 2 process(es)\n" in out

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(double / "out")
    assert not list((double / "out").glob(".final-model-tmp"))
    one = json.loads((single / "out" / "metrics.json").read_text())
    two = json.loads((double / "out" / "metrics.json").read_text())
    assert two["global_batch"] == one["global_batch"] == 8 and two["global_step"] == one["global_step"]
    assert abs(two["eval_loss"] - one["eval_loss"]) < 2e-3
    from safetensors.torch import load_file

    # The same training: 2 processes move the weights as 1 process with accumulation 2 does (AdamW's update of a
    # near-zero gradient may take either sign, so the updates are compared as a whole, relative to their size)
    base = load_file(small_base_dir / "model.safetensors")
    one_w, two_w = (load_file(folder / "out" / "model.safetensors") for folder in (single, double))
    update = sum(float((one_w[k] - base[k]).norm() ** 2) for k in base) ** 0.5
    differ = sum(float((one_w[k] - two_w[k]).norm() ** 2) for k in base) ** 0.5
    assert update > 0 and differ / update < 0.05, (differ, update)


def test_global_batch_size_sets_gradient_accumulation(tmp_path, small_base_dir):
    cfg = load_config(str(write_config(tmp_path, small_base_dir, global_batch_size=64)))
    assert apply_global_batch(cfg, 2).sft_training.gradient_accumulation == 8  # 64 / (4 x 2)
    assert apply_global_batch(cfg, 8).sft_training.gradient_accumulation == 2
    with pytest.raises(ConfigError, match=r"global_batch_size: 64 is not a multiple of batch_size 4 x 3 process"):
        apply_global_batch(cfg, 3)


def test_global_batch_size_and_gradient_accumulation_together_is_an_error(tmp_path, small_base_dir):
    with pytest.raises(ConfigError, match="set global_batch_size or gradient_accumulation, not both"):
        load_config(str(write_config(tmp_path, small_base_dir, global_batch_size=64,
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


def rank_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=`rank` (its children, read from /proc)."""
    from pathlib import Path

    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    for pid in (children.read_text().split() if children.exists() else []):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
        except OSError:
            continue
    return None


def signal_one_rank(tmp_path, small_base_dir, sig, after_steps: int):
    """Start a 2-process torchrun run; once every rank has its SIGTERM handler installed (training has begun on
    each, seen in /proc) and rank 0 has logged `after_steps` steps, send `sig` to rank 1 only; wait for the launcher
    to end (a guard against a hang, not a speed limit). No fixed delay: on a loaded machine each state is waited
    for. Returns (launch command, env, stderr, rank pids)."""
    import os
    import signal
    import subprocess

    config = write_config(tmp_path, small_base_dir, save_steps=1000, epochs=30, subset="train[:64]")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_sft.py"),
              "--config", str(config)]
    env = cli_env(OMP_NUM_THREADS="1")
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as stdout, open(err_file, "w") as stderr:
        agent = subprocess.Popen(launch, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)

    wait_until(lambda: None not in [rank_pid(agent.pid, rank) for rank in (0, 1)], agent)
    pids = [rank_pid(agent.pid, rank) for rank in (0, 1)]
    wait_until(lambda: all(catches(pid, signal.SIGTERM) for pid in pids), agent)
    wait_until(lambda: (out_file.read_text() + err_file.read_text()).count("'loss'") >= after_steps, agent)
    os.kill(pids[1], sig)
    agent.wait(timeout=600)
    return launch, env, err_file.read_text(), pids


@SEVERAL_PROCESSES
@pytest.mark.slow
@pytest.mark.parametrize("after_steps", [0, 3], ids=["as-training-starts", "after-3-steps"])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_launch_command_resumes(
        tmp_path, small_base_dir, after_steps):
    """SIGTERM to rank 1 only (what a scheduler that signals one node does), as training starts on every rank or
    later in the run: every rank stops at the same step, one complete checkpoint is written, no hang, no abort; the
    printed resume command is torchrun's, printed once, and running it resumes from that checkpoint to the end."""
    import signal
    import subprocess

    launch, env, err, _ = signal_one_rank(tmp_path, small_base_dir, signal.SIGTERM, after_steps)
    assert "Aborted" not in err and "SIGABRT" not in err, err[-3000:]
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1, err[-3000:]
    assert (checkpoints[0] / "trainer_state.json").exists() and (checkpoints[0] / "sft_run.json").exists()
    rng = sorted(p.name for p in checkpoints[0].glob("rng_state*"))
    assert rng == ["rng_state_0.pth", "rng_state_1.pth"]  # both ranks saved at that step
    resume_lines = [line for line in err.splitlines() if "Resume with the same command" in line]
    assert len(resume_lines) == 1 and f"--nproc_per_node 2 {REPO / 'train_sft.py'}" in resume_lines[0]
    step = int(checkpoints[0].name.split("-")[1])
    assert f"Stopped by SIGTERM at step {step}" in resume_lines[0]

    if after_steps:  # resumed once, from the later stop (the earlier one is the same mechanism)
        resumed = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                                 stdin=subprocess.DEVNULL)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"Resuming from {checkpoints[0]} (step {step})" in resumed.stdout


@SEVERAL_PROCESSES
@pytest.mark.slow
def test_kill_9_of_one_rank_ends_every_process(tmp_path, small_base_dir):
    import os
    import signal

    _, _, err, pids = signal_one_rank(tmp_path, small_base_dir, signal.SIGKILL, 1)
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], err[-2000:]
    assert not list((tmp_path / "out").glob("checkpoint-*"))
