"""save_dir integrity: resume only the same run (with the lowered learning rate applied for real), one run per
folder, damaged checkpoints set aside, a full disk in one line, a cut final save finished, whole-run metrics,
and bad input named by file and line."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import run_env
from conftest import REPO, SAMPLE, assert_ok, cli_env, real_checkpoint, run_cli, write_config
from data_process_sft import load_hh_rows
from sft_config import ConfigError


def injected(tmp_path, patch: str):
    """A launcher script that applies `patch` (test-only fault injection) and then runs train_sft.py."""
    script = tmp_path / "inject.py"
    script.write_text(f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n{patch}\n"
                      f"sys.argv[0] = {str(REPO / 'train_sft.py')!r}\n"
                      f"runpy.run_path({str(REPO / 'train_sft.py')!r}, run_name='__main__')\n")
    return script


def logged(save_dir, key):
    state = json.loads((save_dir / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


# --- resume only the same run; a lowered learning rate is applied for real -----------------------------------
@pytest.mark.slow
def test_the_nan_advice_works_lower_learning_rate_and_run_the_same_command(tmp_path, base_model_dir):
    """The run's loss turns NaN from step 5 while learning_rate > 0.01 (injected: a tiny model does not blow up
    on cue); the README says: lower learning_rate, run the same command. Changing a run-defining key instead
    is refused naming it."""
    patch = ("import math, trl\nbase = trl.SFTTrainer.training_step\n"  # under our NaN guard
             "def step(self, *a, **k):\n    loss = base(self, *a, **k)\n"
             "    return loss * math.nan if self.args.learning_rate > 0.01 and self.state.global_step >= 4 else loss\n"
             "trl.SFTTrainer.training_step = step")
    config = write_config(tmp_path, base_model_dir, subset="train[:96]", learning_rate=0.05, save_steps=2,
                          lr_scheduler_type="constant", epochs=1, wandb_project="nan-advice", readiness_pairs=0)
    script = injected(tmp_path, patch)
    env = cli_env(WANDB_DIR=str(tmp_path))
    first = run_cli("--config", str(config), cwd=tmp_path, script=str(script), env=env)
    assert first.returncode == 1 and "the training loss became nan at step 5" in first.stderr
    assert "Last good checkpoint: " + str(tmp_path / "out" / "checkpoint-4") in first.stderr

    changed = run_cli("--config", str(config), "sft_training.batch_size=8", cwd=tmp_path, script=str(script),
                      env=env)
    assert changed.returncode == 2
    assert "was written by a run with other settings (sft_training.batch_size 4 -> 8)" in changed.stderr

    config.write_text(config.read_text().replace("learning_rate: 0.05", "learning_rate: 0.001"))
    second = run_cli("--config", str(config), cwd=tmp_path, script=str(script), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    run_id = (tmp_path / "out" / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # the resume continued the run
    assert "Resuming with learning_rate 0.001 (the checkpoint was trained with 0.05) from step 4" in second.stderr
    rates = logged(tmp_path / "out", "learning_rate")
    assert all(rate == 0.05 for step, rate in rates.items() if step <= 4)
    assert all(rate == 0.001 for step, rate in rates.items() if step > 4) and max(rates) > 4
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_checkpoint_of_other_settings_is_refused_naming_each_change(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / run_env.FINGERPRINT_FILE).write_text(json.dumps(
        {"sft_training.max_length": 512, "dataset.dataset_name": "a.jsonl", "processes": 1}))
    with pytest.raises(ConfigError, match=r"\(sft_training\.max_length 512 -> 256; dataset\.dataset_name "
                                          r"'a\.jsonl' -> 'b\.jsonl'\); resume with the same ones, or start fresh"):
        run_env.check_same_run(str(tmp_path / "checkpoint-4"), {"sft_training.max_length": 256,
                                                                "dataset.dataset_name": "b.jsonl", "processes": 1})
    run_env.check_same_run(str(tmp_path / "checkpoint-4"), {"sft_training.max_length": 512,
                                                            "dataset.dataset_name": "a.jsonl", "processes": 1})


# --- one run per save_dir ------------------------------------------------------------------------------------
@pytest.mark.cli
def test_a_second_run_on_a_locked_save_dir_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path, base_model_dir):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(REPO)!r}); "
                               f"import run_env; run_env.lock_save_dir({str(tmp_path / 'out')!r}); time.sleep(120)"])
    (tmp_path / "out").mkdir()
    deadline = time.time() + 30
    while not (tmp_path / "out" / ".lock").exists() or not (tmp_path / "out" / ".lock").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    result = run_cli("--config", str(write_config(tmp_path, base_model_dir)), cwd=tmp_path)
    assert result.returncode == 2
    assert f"is in use by a running train_sft.py (pid {holder.pid}: -c)" in result.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run_env.lock_save_dir(str(tmp_path / "out"))  # the kernel released the dead holder's lock
    run_env.unlock_save_dir(str(tmp_path / "out"))


# --- damaged checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", "truncate"), ("optimizer.pt", "truncate"),
                                              ("scheduler.pt", "empty")])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, name, damage, capsys):
    real_checkpoint(tmp_path, 9)
    newest = real_checkpoint(tmp_path, 12)
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    assert run_env.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-9")
    assert not newest.exists() and (tmp_path / "checkpoint-12.damaged" / name).exists()
    assert capsys.readouterr().out == (f"Setting aside damaged checkpoint {newest} ({name} does not open whole) as "
                                       f"{newest}.damaged\n")
    run_env.unlock_save_dir(str(tmp_path))


def test_damage_is_found_in_every_checkpoint_file_kind_and_whole_files_pass(tmp_path):
    from safetensors.torch import save_file

    path = real_checkpoint(tmp_path, 5)
    save_file({}, path / "empty.safetensors")  # no tensors: its size is just the header
    save_file({"w": torch.ones(8)}, path / "with_metadata.safetensors", metadata={"format": "pt"})
    for name in ("rng_state.pth", "training_args.bin"):
        torch.save({"x": torch.ones(4)}, path / name)
    assert run_env.damaged_file(str(path)) is None
    for name in ("with_metadata.safetensors", "rng_state.pth", "training_args.bin"):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:-10])
        assert run_env.damaged_file(str(path)) == name
        (path / name).write_bytes(data)


def test_nothing_to_resume_in_a_missing_or_half_written_folder(tmp_path):
    assert run_env.last_complete_checkpoint(str(tmp_path / "absent")) is None
    real_checkpoint(tmp_path, 3, complete=False)
    assert run_env.last_complete_checkpoint(str(tmp_path)) is None
    run_env.check_same_run(str(real_checkpoint(tmp_path, 4)), {"processes": 1})  # no fingerprint: older run


# --- a full disk ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_at_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path, base_model_dir):
    patch = ("import errno, torch\nsave = torch.save\n"
             "def full(obj, f, *a, **k):\n"
             "    if 'checkpoint-4' in str(f):\n"
             "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "    return save(obj, f, *a, **k)\ntorch.save = full")
    config = write_config(tmp_path, base_model_dir, save_steps=2)
    result = run_cli("--config", str(config), cwd=tmp_path, script=str(injected(tmp_path, patch)))
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert line == (f"error: no space left on device in {tmp_path / 'out'}; free some GiB or lower "
                    "save_total_limit, then run the same command (it resumes from the last complete checkpoint)")
    assert "Traceback" not in result.stderr
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path))
    assert "Removing incomplete checkpoint" in out and "Resuming from" in out and "checkpoint-2" in out


def test_disk_full_is_recognised_in_torch_words_by_the_free_space(tmp_path, monkeypatch):
    error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 214")
    assert run_env.disk_full(error, str(tmp_path)) is None
    monkeypatch.setattr(run_env.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert run_env.disk_full(error, str(tmp_path)).startswith("no space left on device in ")


def test_disk_budget_counts_save_total_limit_plus_one_checkpoints(tmp_path, base_model_dir, monkeypatch):
    from sft_config import load_config

    cfg = load_config(str(write_config(tmp_path, base_model_dir, save_total_limit=3)))
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(run_env.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(ConfigError, match=r"GiB free, 4 checkpoints and the final model of 0\.00B parameters"):
        run_env.check_disk_space(cfg)


# --- a final save cut short; whole-run metrics -----------------------------------------------------------------
@pytest.mark.slow
def test_a_run_killed_after_its_weights_were_renamed_is_finished_by_the_rerun(tmp_path, base_model_dir):
    config = write_config(tmp_path, base_model_dir, save_steps=4)
    assert_ok(run_cli("--config", str(config), cwd=tmp_path))
    out = tmp_path / "out"
    complete = json.loads((out / "metrics.json").read_text())
    history = logged(out, "loss")
    assert abs(complete["train_loss"] - sum(history.values()) / len(history)) < 1e-9  # every step logged
    for name in ("metrics.json", "samples.jsonl", "training_curves.png", "README.md"):
        (out / name).unlink()
    rerun = assert_ok(run_cli("--config", str(config), cwd=tmp_path))
    assert "whose final save was cut short: finishing it from" in rerun
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_loss"] == pytest.approx(complete["train_loss"], abs=1e-9)  # the whole run, not 0.0
    assert (out / "samples.jsonl").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_overwrite_on_the_command_line_trains_fresh_over_a_finished_model(tmp_path, base_model_dir):
    config = write_config(tmp_path, base_model_dir, save_steps=4, readiness_pairs=0)
    assert_ok(run_cli("--config", str(config), cwd=tmp_path))
    refused = run_cli("--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a finished model; pass --overwrite" in refused.stderr
    (tmp_path / "out" / "checkpoint-999").mkdir()  # would be resumed from, were it not removed
    (tmp_path / "out" / "checkpoint-999" / "trainer_state.json").write_text("{}")
    out = assert_ok(run_cli("--config", str(config), "--overwrite", cwd=tmp_path))
    assert "Resuming" not in out and not (tmp_path / "out" / "checkpoint-999").exists()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] > 0


def test_weights_without_metrics_are_finished_from_the_last_checkpoint(tmp_path, capsys):
    real_checkpoint(tmp_path, 8)
    (tmp_path / "model.safetensors").write_text("weights renamed into place, then killed")
    assert run_env.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-8")
    assert "whose final save was cut short: finishing it from " + str(tmp_path / "checkpoint-8") in \
        capsys.readouterr().out


def test_an_unwritable_save_dir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=rf"^sft_training\.save_dir: {tmp_path}/a_file/out is not writable \("):
        run_env.prepare_save_dir(str(tmp_path / "a_file" / "out"), overwrite=False)


def test_overwrite_removes_every_file_of_the_older_run(tmp_path):
    real_checkpoint(tmp_path, 3)
    (tmp_path / ".final-model-tmp").mkdir()  # a final save cut short
    for name in ("model.safetensors", "metrics.json", "samples.jsonl", "training_curves.png", "readiness_margins.png",
                 "README.md"):
        (tmp_path / name).write_text("old")
    assert run_env.prepare_save_dir(str(tmp_path), overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    run_env.unlock_save_dir(str(tmp_path))


# --- bad input named by file and line --------------------------------------------------------------------------
def test_a_non_utf8_row_is_named_by_file_line_and_byte_offset(tmp_path):
    data = tmp_path / "hh.jsonl"
    data.write_bytes(b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n{"chosen": "\\n\\nHuman: h\xffi"}\n')
    with pytest.raises(ConfigError, match=rf"line 2 of {data} is not UTF-8 \(byte offset 69\)"):
        load_hh_rows(str(data), "train")


def test_a_malformed_jsonl_line_is_named(tmp_path):
    data = tmp_path / "hh.jsonl"
    data.write_text(SAMPLE.read_text().splitlines()[0] + "\n{not json}\n")
    with pytest.raises(ConfigError, match=rf"line 2 of {data} is not valid JSON"):
        load_hh_rows(str(data), "train")


@pytest.mark.cli
def test_inspect_on_data_without_chosen_is_one_line(tmp_path, base_model_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hi"}\n')
    config = write_config(tmp_path, base_model_dir, dataset=data, subset="train")
    result = run_cli("--config", str(config), "--inspect", cwd=tmp_path, script="data_process_sft.py",
                     env=cli_env())
    assert result.returncode == 2
    assert [x for x in result.stderr.splitlines() if x.startswith("error")] == [
        f"error: dataset {data} has no 'chosen' column"]
