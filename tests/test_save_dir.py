"""save_dir integrity: resume only the same run (with the lowered learning rate applied for real), one run per
folder, damaged checkpoints set aside, a full disk in one line, a cut final save finished, whole-run metrics,
and bad input named by file and line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import conftest
import run_env
import save_dir_contract
from conftest import REPO, SAMPLE, assert_ok, cli_env, real_checkpoint, run_cli, wait_until, write_config
from data_process_sft import load_rows
from sft_config import ConfigError


def injected(tmp_path, patch: str):
    """A launcher script that applies `patch` (test-only fault injection) and then runs train_sft.py."""
    script = tmp_path / "inject.py"
    script.write_text(f"import runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n{patch}\n"
                      f"sys.argv[0] = {str(REPO / 'train_sft.py')!r}\n"
                      f"runpy.run_path({str(REPO / 'train_sft.py')!r}, run_name='__main__')\n")
    return script


def refusal(save_dir, **length) -> str:
    """prepare_save_dir's refusal of save_dir (epochs 1 unless `length` says), as the line a user reads."""
    with pytest.raises(ConfigError) as refused:
        save_dir_contract.prepare_save_dir(str(save_dir), overwrite=False, **{"epochs": 1, **length})
    return str(refused.value)


def logged(save_dir, key):
    state = json.loads((save_dir / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


# --- resume only the same run; a lowered learning rate is applied for real -----------------------------------
@pytest.mark.slow
def test_the_nan_advice_works_lower_learning_rate_and_run_the_same_command(tmp_path, small_base_dir):
    """The run's loss turns NaN from step 5 while learning_rate > 0.01 (injected: a tiny model does not blow up
    on cue); the README says: lower learning_rate, run the same command. Changing a run-defining key instead
    is refused naming it."""
    patch = ("import math, trl\nbase = trl.SFTTrainer.training_step\n"  # under our NaN guard
             "def step(self, *a, **k):\n    loss = base(self, *a, **k)\n"
             "    return loss * math.nan if self.args.learning_rate > 0.01 and self.state.global_step >= 4 else loss\n"
             "trl.SFTTrainer.training_step = step")
    config = write_config(tmp_path, small_base_dir, subset="train[:96]", learning_rate=0.05, save_steps=2,
                          lr_scheduler_type="constant", epochs=1, wandb_project="nan-advice", readiness_pairs=0)
    script = injected(tmp_path, patch)
    env = cli_env(WANDB_DIR=str(tmp_path))
    first = run_cli("--config", str(config), cwd=tmp_path, script=str(script), env=env, warm=True)
    assert first.returncode == 1 and "the training loss became nan at step 5" in first.stderr
    assert "Last good checkpoint: " + str(tmp_path / "out" / "checkpoint-4") in first.stderr

    changed = run_cli("--config", str(config), "sft_training.batch_size=8", cwd=tmp_path, script=str(script),
                      env=env, warm=True)
    assert changed.returncode == 2
    assert "was written by a run with other settings (sft_training.batch_size 4 -> 8)" in changed.stderr

    config.write_text(config.read_text().replace("learning_rate: 0.05", "learning_rate: 0.001"))
    second = run_cli("--config", str(config), cwd=tmp_path, script=str(script), env=env, warm=True)
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-3000:]
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
    (tmp_path / "checkpoint-4" / save_dir_contract.FINGERPRINT_FILE).write_text(json.dumps(
        {"sft_training.max_length": 512, "dataset.dataset_name": "a.jsonl", "processes": 1}))
    with pytest.raises(ConfigError, match=r"\(sft_training\.max_length 512 -> 256; dataset\.dataset_name "
                                          r"'a\.jsonl' -> 'b\.jsonl'\); resume with the same ones, or start fresh"):
        save_dir_contract.check_same_run(str(tmp_path / "checkpoint-4"), {"sft_training.max_length": 256,
                                                                "dataset.dataset_name": "b.jsonl", "processes": 1})
    save_dir_contract.check_same_run(str(tmp_path / "checkpoint-4"), {"sft_training.max_length": 512,
                                                            "dataset.dataset_name": "a.jsonl", "processes": 1})


# --- one run per save_dir ------------------------------------------------------------------------------------
@pytest.mark.cli
def test_a_second_run_on_a_locked_save_dir_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path, small_base_dir):
    # the holder keeps the lock until the test kills it (it blocks reading its stdin: no fixed lifetime)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                               f"import save_dir_contract as c; c.prepare_save_dir({str(tmp_path / 'out')!r}, False); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE)
    lock = tmp_path / "out" / ".lock"
    wait_until(lambda: lock.exists() and lock.read_text(), holder)
    result = run_cli("--config", str(write_config(tmp_path, small_base_dir)), cwd=tmp_path)
    assert result.returncode == 2
    assert f"is in use by a running train_sft.py (pid {holder.pid}: -c)" in result.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    save_dir_contract.lock_save_dir(str(tmp_path / "out"))  # the kernel released the dead holder's lock
    save_dir_contract.unlock_save_dir(str(tmp_path / "out"))


# --- damaged checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "damage"), [("model.safetensors", "truncate"), ("optimizer.pt", "truncate"),
                                              ("scheduler.pt", "empty")])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, name, damage, capsys):
    real_checkpoint(tmp_path, 9)
    newest = real_checkpoint(tmp_path, 12)
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-9")
    aside = tmp_path / "damaged-checkpoint-12"
    assert not newest.exists() and (aside / name).exists()
    assert capsys.readouterr().out == (f"Setting aside damaged checkpoint {newest} ({name} does not open whole) as "
                                       f"{aside}\n")
    assert save_dir_contract.set_aside(str(tmp_path)) == ["damaged-checkpoint-12"]
    save_dir_contract.unlock_save_dir(str(tmp_path))


def test_a_checkpoint_set_aside_is_out_of_the_trainers_rotation(tmp_path):
    """transformers' rotation keeps save_total_limit checkpoints by `checkpoint-*`: what we set aside must not be
    one of them (a `checkpoint-N.damaged` was deleted by the next rotation)."""
    from transformers.trainer_utils import rotate_checkpoints

    for step in (2, 4, 6):
        real_checkpoint(tmp_path, step)
    (tmp_path / "damaged-checkpoint-3").mkdir()
    rotate_checkpoints(str(tmp_path), save_total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "damaged-checkpoint-3"]


def test_damage_is_found_in_every_checkpoint_file_kind_and_whole_files_pass(tmp_path):
    from safetensors.torch import save_file

    path = real_checkpoint(tmp_path, 5)
    save_file({}, path / "empty.safetensors")  # no tensors: its size is just the header
    save_file({"w": torch.ones(8)}, path / "with_metadata.safetensors", metadata={"format": "pt"})
    for name in ("rng_state.pth", "training_args.bin"):
        torch.save({"x": torch.ones(4)}, path / name)
    assert save_dir_contract.damage(str(path)) is None
    for name in ("with_metadata.safetensors", "rng_state.pth", "training_args.bin"):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:-10])
        assert save_dir_contract.damage(str(path)) == f"{name} does not open whole"
        (path / name).write_bytes(data)


def test_a_checkpoint_without_its_run_fingerprint_does_not_count_as_complete(tmp_path, capsys):
    """Killed between the Trainer's trainer_state.json and our sft_run.json: resumed, a changed batch_size went
    unchecked and two runs were mixed. Such a checkpoint is incomplete: removed, the previous one resumed."""
    real_checkpoint(tmp_path, 4)
    cut = real_checkpoint(tmp_path, 6)
    (cut / "sft_run.json").unlink()
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-4")
    assert not cut.exists() and f"Removing incomplete checkpoint {cut}" in capsys.readouterr().out
    save_dir_contract.unlock_save_dir(str(tmp_path))


def test_nothing_to_resume_in_a_missing_or_half_written_folder(tmp_path):
    assert save_dir_contract.last_complete_checkpoint(str(tmp_path / "absent")) is None
    real_checkpoint(tmp_path, 3, complete=False)
    assert save_dir_contract.last_complete_checkpoint(str(tmp_path)) is None
    save_dir_contract.check_same_run(str(real_checkpoint(tmp_path, 4)), {"processes": 1})  # no fingerprint: older run


# --- a full disk ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_at_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path, small_base_dir):
    patch = ("import errno, torch\nsave = torch.save\n"
             "def full(obj, f, *a, **k):\n"
             "    if 'checkpoint-4' in str(f):\n"
             "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
             "    return save(obj, f, *a, **k)\ntorch.save = full")
    config = write_config(tmp_path, small_base_dir, save_steps=2)
    result = run_cli("--config", str(config), cwd=tmp_path, script=str(injected(tmp_path, patch)), warm=True)
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert line == (f"error: no space left on device in {tmp_path / 'out'}; free some GiB or lower "
                    "save_total_limit, then run the same command (it resumes from the last complete checkpoint)")
    assert "Traceback" not in result.stderr
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "Removing incomplete checkpoint" in out and "Resuming from" in out and "checkpoint-2" in out


def test_disk_full_is_recognised_in_torch_words_by_the_free_space(tmp_path, monkeypatch):
    error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 214")
    assert run_env.disk_full(error, str(tmp_path)) is None
    monkeypatch.setattr(run_env.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert run_env.disk_full(error, str(tmp_path)).startswith("no space left on device in ")


def test_disk_budget_counts_save_total_limit_plus_one_checkpoints(tmp_path, small_base_dir, monkeypatch):
    from sft_config import load_config

    cfg = load_config(str(write_config(tmp_path, small_base_dir, save_total_limit=3)))
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(run_env.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(ConfigError, match=r": 0\.0 MiB free, 4 checkpoints and the final model of 0\.00B "
                                          r"parameters need ~\d+\.\d MiB; "):  # not "0.0 GiB ... ~0.0 GiB"
        run_env.check_disk_space(cfg)
    assert save_dir_contract.size(3 * 2**30) == "3.0 GiB" and save_dir_contract.size(5 * 2**20) == "5.0 MiB"


# --- a final save cut short; whole-run metrics -----------------------------------------------------------------
@pytest.mark.slow
def test_a_run_killed_after_its_weights_were_renamed_is_finished_by_the_rerun(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, save_steps=4, keep_checkpoints=True)
    assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    out = tmp_path / "out"
    complete = json.loads((out / "metrics.json").read_text())
    history = logged(out, "loss")
    assert abs(complete["train_loss"] - sum(history.values()) / len(history)) < 1e-9  # every step logged
    for name in ("metrics.json", "samples.jsonl", "training_curves.png", "README.md"):
        (out / name).unlink()
    rerun = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "whose final save was cut short: finishing it from" in rerun
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_loss"] == pytest.approx(complete["train_loss"], abs=1e-9)  # the whole run, not 0.0
    assert (out / "samples.jsonl").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_overwrite_on_the_command_line_trains_fresh_over_a_finished_model(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, save_steps=4, readiness_pairs=0)
    assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    refused = run_cli("--config", str(config), cwd=tmp_path, warm=True)
    assert refused.returncode == 2 and "already holds a finished model; --overwrite deletes it" in refused.stderr
    (tmp_path / "out" / "checkpoint-999").mkdir()  # would be resumed from, were it not removed
    (tmp_path / "out" / "checkpoint-999" / "trainer_state.json").write_text("{}")
    out = assert_ok(run_cli("--config", str(config), "--overwrite", cwd=tmp_path, warm=True))
    assert "Resuming" not in out and not (tmp_path / "out" / "checkpoint-999").exists()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] > 0


def test_weights_without_metrics_are_finished_from_the_last_checkpoint(tmp_path, capsys):
    real_checkpoint(tmp_path, 8)
    (tmp_path / "model.safetensors").write_text("weights renamed into place, then killed")
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-8")
    assert "whose final save was cut short: finishing it from " + str(tmp_path / "checkpoint-8") in \
        capsys.readouterr().out


def test_an_unwritable_save_dir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=rf"^sft_training\.save_dir: {tmp_path}/a_file/out is not writable \("):
        save_dir_contract.prepare_save_dir(str(tmp_path / "a_file" / "out"), overwrite=False)


def test_overwrite_removes_every_file_of_the_older_run(tmp_path):
    real_checkpoint(tmp_path, 3)
    (tmp_path / ".final-model-tmp").mkdir()  # a final save cut short
    for name in ("model.safetensors", "metrics.json", "samples.jsonl", "training_curves.png", "readiness_margins.png",
                 "README.md"):
        (tmp_path / name).write_text("old")
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hh-sft-run", ".lock"]
    save_dir_contract.unlock_save_dir(str(tmp_path))


# --- bad input named by file and line --------------------------------------------------------------------------
def test_a_non_utf8_row_is_named_by_file_line_and_byte_offset(tmp_path):
    data = tmp_path / "hh.jsonl"
    data.write_bytes(b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n{"chosen": "\\n\\nHuman: h\xffi"}\n')
    with pytest.raises(ConfigError, match=rf"line 2 of {data} is not UTF-8 \(byte offset 69\)"):
        load_rows(str(data), "train")


@pytest.mark.parametrize(("line", "said"), [
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a reply cut', "cut off: it ends inside a value after 51 characters"),
    ('{"chosen": "tab\there"}', "a raw control character '\\t' inside a string, column 16"),
    ("<html>rate limited</html>", "not a JSON object: it starts '<html>rate limited</html'"),
    ("{not json}", "Expecting property name enclosed in double quotes, column 2"),
])
def test_a_malformed_jsonl_line_is_named_with_what_it_holds(tmp_path, line, said):
    data = tmp_path / "hh.jsonl"
    data.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ConfigError) as error:
        load_rows(str(data), "train")
    assert f"line 2 of {data} is not valid JSON ({said})" in str(error.value)


@pytest.mark.cli
def test_inspect_on_data_without_chosen_is_one_line(tmp_path, small_base_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hi"}\n')
    config = write_config(tmp_path, small_base_dir, dataset=data, subset="train")
    result = run_cli("--config", str(config), "--inspect", cwd=tmp_path, script="data_process_sft.py",
                     env=cli_env())
    assert result.returncode == 2
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: dataset {data}: its columns (text) are none of the "
                                                     "formats SFT reads")


# --- round two: what a second fault trial found -------------------------------------------------------------
def test_a_folder_of_someone_elses_files_is_refused_by_name(tmp_path):
    for name in ("README.md", "config.json", "notes.txt"):
        (tmp_path / name).write_text("the user's own")
    with pytest.raises(ConfigError, match=r"holds files that train_sft\.py did not write \(README\.md, config\.json, "
                                          r"notes\.txt\); pass --overwrite"):
        save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False)
    assert not (tmp_path / ".lock").exists()  # refused before anything was written
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hh-sft-run", ".lock", "notes.txt"]  # ours replaced
    save_dir_contract.unlock_save_dir(str(tmp_path))


@pytest.mark.parametrize("where", ["is", "is inside", "holds"])
def test_save_dir_and_the_base_model_folder_must_be_apart(tmp_path, where):
    base = tmp_path / "base"
    base.mkdir()
    save_dir = {"is": base, "is inside": base / "sft", "holds": tmp_path}[where]
    with pytest.raises(ConfigError, match=rf"^sft_training\.save_dir: {save_dir} {where} the base model's folder"):
        run_env.check_apart(str(save_dir), str(base))
    run_env.check_apart(str(tmp_path / "elsewhere"), str(base))
    run_env.check_apart(str(base), "meta-llama/Llama-3.2-1B")  # a Hub id: nothing local to protect


@pytest.mark.cli
def test_overwrite_into_the_base_model_folder_is_refused_before_anything_is_removed(tmp_path, small_base_dir):
    base = tmp_path / "base"
    shutil.copytree(small_base_dir, base)
    before = sorted(p.name for p in base.iterdir())
    config = write_config(tmp_path, base, save_dir=str(base))
    result = run_cli("--config", str(config), "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: sft_training.save_dir: {base} is the base")
    assert sorted(p.name for p in base.iterdir()) == before


@pytest.mark.cli
def test_readiness_with_no_pairs_to_score_is_refused(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, readiness_pairs=0)
    result = run_cli("--config", str(config), "--readiness", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: --readiness with sft_training.readiness_pairs: 0 would score nothing; set it, "
                             "e.g. sft_training.readiness_pairs=512\n")


@pytest.mark.cli
def test_a_val_ratio_that_leaves_no_train_rows_is_one_line(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, subset="train[:60]", val_ratio=0.999)
    result = run_cli("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert line.startswith("error: dataset.val_ratio: 0.999 of ") and " usable rows gives 0 train and " in line


def test_the_resume_command_is_quoted_for_the_shell(monkeypatch):
    import shlex

    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--config", "my configs/sft run.yaml", "x.y=it's"])
    command = run_env.rerun_command()
    assert command.startswith("python ") and shlex.split(command)[1:] == sys.argv


def test_wandb_that_cannot_be_reached_goes_offline_without_waiting(tmp_path, small_base_dir, monkeypatch, capsys):
    """A key but no route to the W&B server: one TCP connect decides, wandb.init is never asked to try (it
    stalled ~90 s before giving up)."""
    import wandb

    from sft_config import load_config

    cfg = load_config(str(write_config(tmp_path, small_base_dir, wandb_project="p")))
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("WANDB_MODE", raising=False)
    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kw: modes.append(os.environ.get("WANDB_MODE")) or
                        type("Run", (), {"id": "r1"})())
    run_env.start_wandb(cfg, resume_from=None)
    assert modes == ["offline"]
    assert "W&B: http://127.0.0.1:9 unreachable, logging offline" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_killed_in_its_end_of_run_report_is_finished_by_the_rerun(tmp_path, small_base_dir):
    """Killed while scoring readiness (after the final weights): the rerun finishes the report (readiness,
    samples, curves, our model card) instead of refusing a 'finished' model. A damaged checkpoint set aside is
    named at start and kept."""
    config = write_config(tmp_path, small_base_dir, save_steps=4, readiness_pairs=8)
    patch = "import os, sft_readiness\nsft_readiness.score_readiness = lambda *a, **k: os._exit(137)"
    killed = run_cli("--config", str(config), cwd=tmp_path, script=str(injected(tmp_path, patch)), warm=True)
    out = tmp_path / "out"
    assert killed.returncode == 137 and (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    (out / "damaged-checkpoint-1").mkdir()
    rerun = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "whose final save was cut short: finishing it from" in rerun
    assert "set aside in save_dir (damaged, never resumed or rotated; delete when done): damaged-checkpoint-1" in rerun
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["readiness"]["pairs"] > 0
    assert (out / "samples.jsonl").is_file() and (out / "training_curves.png").is_file()
    assert "base_model: " in (out / "README.md").read_text()  # our card, not TRL's generic one
    assert (out / "damaged-checkpoint-1").is_dir()


@pytest.mark.slow
def test_reordered_data_rows_are_refused_on_resume(tmp_path, small_base_dir):
    """Same rows, same tokens, another order: another train/eval split; the fingerprint covers the token ids."""
    data = tmp_path / "hh.jsonl"
    rows = SAMPLE.read_text().splitlines()[:40]
    data.write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, small_base_dir, dataset=data, subset="train", save_steps=4,
                          keep_checkpoints=True, readiness_pairs=0)
    first = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "  resume state kept (checkpoint-" in first
    (tmp_path / "out" / "metrics.json").unlink()  # a finish to complete: the rerun resumes the last checkpoint
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    result = run_cli("--config", str(config), cwd=tmp_path, warm=True)
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert "was written by a run with other settings (data (token ids, sha256) '" in line


@conftest.SEVERAL_PROCESSES
@pytest.mark.slow
def test_a_resume_refused_under_torchrun_is_one_line_on_every_rank(tmp_path, small_base_dir):
    """Resumed with 2 processes after a 1-process run: every rank says the same refusal and exits 2 (rank 1 used
    to die in gloo while rank 0 printed it)."""
    config = write_config(tmp_path, small_base_dir, save_steps=4, keep_checkpoints=True, readiness_pairs=0)
    assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    (tmp_path / "out" / "metrics.json").unlink()
    result = run_cli("--config", str(config), cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    assert result.returncode != 0
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 2 and errors[0] == errors[1] and "processes 1 -> 2" in errors[0]
    assert "gloo" not in result.stderr.lower() and "Connection" not in result.stderr
    # torchrun's summary: the first rank to finish exited 2 (torchrun may stop the other before it exits itself)
    assert "exitcode  : 2" in result.stderr


# --- round four: ours only by our own mark; odd checkpoint entries; ~; weights newer than their report ---------
@pytest.mark.parametrize("other", [("checkpoint-500", ".lock"), (".lock",)])
def test_another_tools_lock_and_checkpoint_are_no_mark_of_ours(tmp_path, other):
    for name in other:
        if name.startswith("checkpoint-"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "optimizer.bin").write_text("another tool's")
        else:
            (tmp_path / name).write_text("pid 1")
    with pytest.raises(ConfigError, match=r"holds files that train_sft\.py did not write \("):
        save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(other)  # nothing deleted, nothing added
    if "checkpoint-500" in other:
        assert (tmp_path / "checkpoint-500" / "optimizer.bin").read_text() == "another tool's"


@pytest.mark.parametrize("kind", ["file", "symlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_checkpoint_name_that_is_not_a_folder_is_refused_and_nothing_is_deleted_through_it(tmp_path, kind,
                                                                                              overwrite):
    save_dir, outside = tmp_path / "out", tmp_path / "elsewhere"
    real_checkpoint(save_dir, 4)
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's")
    if kind == "file":
        (save_dir / "checkpoint-5").write_text("a file")
    else:
        (save_dir / "checkpoint-9").symlink_to(outside)  # incomplete: no trainer_state.json
    name = "checkpoint-5" if kind == "file" else "checkpoint-9"
    said = "not a folder" if kind == "file" else "a symbolic link"
    with pytest.raises(ConfigError, match=rf"{save_dir / name} is {said}, so not a checkpoint train_sft\.py wrote"):
        save_dir_contract.prepare_save_dir(str(save_dir), overwrite=overwrite)
    assert (save_dir / name).is_symlink() == (kind == "symlink") and (save_dir / name).exists()
    assert (outside / "keep.txt").read_text() == "the user's" and (save_dir / "checkpoint-4").is_dir()


def test_path_keys_expand_the_home_folder(tmp_path, monkeypatch, small_base_dir):
    from sft_config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = write_config(tmp_path, small_base_dir, save_dir="~/sft_out")
    text = config.read_text().replace(str(SAMPLE), "~/data.jsonl")
    config.write_text(text.replace(f"policy_name: {small_base_dir}", "policy_name: ~/base"))
    cfg = load_config(str(config))
    assert cfg.sft_training.save_dir == str(tmp_path / "sft_out")
    assert cfg.dataset.dataset_name == str(tmp_path / "data.jsonl") and cfg.policy_name == str(tmp_path / "base")
    assert load_config(str(config), ["policy_name=meta-llama/Llama-3.2-1B"]).policy_name == "meta-llama/Llama-3.2-1B"


def test_weights_published_over_a_finished_run_are_not_finished_until_their_report(tmp_path, small_base_dir,
                                                                                    capsys):
    """A continuation (more epochs) killed after its new weights were published and before metrics.json: the old
    report is gone with the publish, so --readiness refuses the folder and the rerun finishes it."""
    from sft_config import load_config

    save_dir = tmp_path / "out"
    real_checkpoint(save_dir, 42)
    (save_dir / ".hh-sft-run").write_text("")
    (save_dir / "model.safetensors").write_text("step-28 weights")
    (save_dir / "metrics.json").write_text(json.dumps({"global_step": 28, "tokens_trained": 1}))
    staging = save_dir_contract.staging_dir(str(save_dir), clear=True)
    os.makedirs(staging)
    (save_dir / ".final-model-tmp" / "model.safetensors").write_text("step-42 weights")
    save_dir_contract.publish(str(save_dir))
    assert (save_dir / "model.safetensors").read_text() == "step-42 weights"
    assert not (save_dir / "metrics.json").exists()
    with pytest.raises(ConfigError, match="does not read as a finished run's report"):
        save_dir_contract.finished_run(str(save_dir), load_config(str(write_config(tmp_path, small_base_dir))))
    assert save_dir_contract.prepare_save_dir(str(save_dir), overwrite=False, epochs=2) == str(save_dir /
                                                                                                 "checkpoint-42")
    assert "whose final save was cut short: finishing it from" in capsys.readouterr().out


# --- held-out mutants: what the contract's writes must be --------------------------------------------------------
@pytest.mark.parametrize("missing", ["scheduler.pt", "optimizer.pt"])
def test_a_full_state_checkpoint_without_its_optimizer_or_scheduler_is_never_resumed(tmp_path, missing, capsys):
    real_checkpoint(tmp_path, 4)
    newest = real_checkpoint(tmp_path, 8)
    (newest / "sft_run.json").write_text(json.dumps({"processes": 1, "sft_training.save_only_model": False}))
    (newest / missing).unlink()
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-4")
    assert f"(no {missing}: a resume would restart AdamW and the schedule)" in capsys.readouterr().out


def test_publish_renames_the_weights_last_and_a_kill_between_renames_leaves_the_old_weights(tmp_path, monkeypatch):
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    (save_dir / "model.safetensors").write_text("old weights")
    (save_dir / "config.json").write_text("old config")
    staging = tmp_path / "out" / ".final-model-tmp"
    staging.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (staging / name).write_text(f"new {name}")
    renamed, real = [], os.replace

    def killed_after_two(src, dst):
        if len(renamed) == 2:
            raise KeyboardInterrupt  # stands for a kill between two renames
        renamed.append(os.path.basename(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        save_dir_contract.publish(str(save_dir))
    assert "model.safetensors" not in renamed and (save_dir / "model.safetensors").read_text() == "old weights"
    monkeypatch.setattr(os, "replace", real)
    renamed.clear()
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)), real(src, dst)))
    save_dir_contract.publish(str(save_dir))
    assert renamed[-1] == "model.safetensors"
    assert (save_dir / "model.safetensors").read_text() == "new model.safetensors"


def test_metrics_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    save_dir_contract.write_whole(str(path), {"global_step": 28})
    real_dump = json.dump

    def cut(value, f, **kwargs):  # a kill in the middle of the write
        f.write('{"global_step": 4')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", cut)
    with pytest.raises(KeyboardInterrupt):
        save_dir_contract.write_whole(str(path), {"global_step": 42})
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.loads(path.read_text()) == {"global_step": 28}  # the previous report, whole


@pytest.mark.parametrize("scored", [{"pairs": 0}, None])
def test_readiness_never_replaces_the_report_when_no_pair_was_scored(tmp_path, small_base_dir, monkeypatch, scored):
    """Data with pairs, none of them scored (all over max_length: pairs 0; or the scoring failed: None): exit 2 or
    1, and the run's metrics.json stays as it was."""
    from datasets import Dataset

    import train_sft
    from sft_config import load_config

    cfg = load_config(str(write_config(tmp_path, small_base_dir, readiness_pairs=8)))
    report = {"global_step": 3, "readiness": {"pairs": 5}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text(json.dumps(report))
    monkeypatch.setattr(run_env, "start_wandb", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_sft, "readiness", lambda *args, **kwargs: scored)
    raw = Dataset.from_dict({"chosen": ["\n\nHuman: a\n\nAssistant: b"], "rejected": ["\n\nHuman: a\n\nAssistant: c"]})
    prepared = train_sft.Prepared(None, None, None, None, {}, raw, finished=json.loads(json.dumps(report)))
    run = train_sft.Run(cfg, train_sft.MODES["readiness"], False)
    assert train_sft.readiness_only(run, prepared) == (2 if scored else 1)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == report


@pytest.mark.parametrize(("files", "ours"), [
    ({}, False),
    ({"metrics.json": '{"written_by": "hh-sft train_sft.py"}'}, True),
    ({"metrics.json": '{"tokens_trained": 5}'}, True),  # a report from before `written_by`
    ({"metrics.json": '{"written_by": "another tool"}'}, False),
    ({"metrics.json": "not json"}, False),
    ({"metrics.json": "[1, 2]"}, False),
    ({"checkpoint-3/sft_run.json": "{}"}, True),
    ({"checkpoint-3/trainer_state.json": "{}"}, False),  # the Trainer's own checkpoint: not ours
    ({".lock": ""}, False)])
def test_is_ours_reads_the_mark_the_report_and_our_checkpoints_only(tmp_path, monkeypatch, files, ours):
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    for name, text in files.items():
        (save_dir / name).parent.mkdir(exist_ok=True)
        (save_dir / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".hh-sft-run").write_text("")  # a mark in the working directory says nothing about save_dir
    assert save_dir_contract.is_ours(str(save_dir)) is ours


def test_is_ours_of_a_file_or_a_missing_path_is_false(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert not save_dir_contract.is_ours(str(tmp_path / "a_file"))
    assert not save_dir_contract.is_ours(str(tmp_path / "missing"))


def test_no_checkpoint_or_one_without_a_fingerprint_is_never_compared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft_run.json").write_text(json.dumps({"processes": 8}))  # in the working directory: not a run's
    save_dir_contract.check_same_run(None, {"processes": 1})
    older = real_checkpoint(tmp_path / "out", 2, complete=False)  # written before fingerprints
    save_dir_contract.check_same_run(str(older), {"processes": 1})


@pytest.mark.parametrize("keep", [False, True])
def test_tidy_finished_removes_or_keeps_the_resume_state_and_says_which_with_its_size(tmp_path, keep):
    for step in (10, 2):
        real_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x" * 3_000_000)  # a size the line shows (2.9 MiB)
    (tmp_path / "training_args.bin").write_bytes(b"x" * 10)
    (tmp_path / "model.safetensors").write_text("weights")
    save_dir_contract.lock_save_dir(str(tmp_path))  # the run's lock
    size = sum(f.stat().st_size for d in ("checkpoint-2", "checkpoint-10") for f in (tmp_path / d).rglob("*")
               if f.is_file())
    line = save_dir_contract.tidy_finished(str(tmp_path), keep, length_key="max_steps")
    shown = save_dir_contract.size(size)
    assert shown == "2.9 MiB"
    if keep:
        assert line == (f"  resume state kept (checkpoint-2, checkpoint-10, {shown}; sft_training.keep_checkpoints: "
                        "true): raise sft_training.max_steps and run the same command to continue")
    else:
        assert line == (f"  resume state removed (checkpoint-2, checkpoint-10, {shown}); to keep it for more epochs "
                        "or a resume, set sft_training.keep_checkpoints: true")
    left = {p.name for p in tmp_path.iterdir()}
    assert ({"checkpoint-2", "checkpoint-10", "training_args.bin"} <= left) is keep
    assert "model.safetensors" in left and ".lock" not in left  # the weights stay; the run's lock is released


@pytest.mark.parametrize(("keep", "said"), [(False, "  no resume state left"), (True, "  no resume state to keep")])
def test_tidy_finished_without_checkpoints_says_so(tmp_path, keep, said):
    (tmp_path / "training_args.bin").write_bytes(b"x")
    assert save_dir_contract.tidy_finished(str(tmp_path), keep, "epochs") == said
    assert (tmp_path / "training_args.bin").exists() is keep
    (tmp_path / "training_args.bin").unlink(missing_ok=True)
    assert save_dir_contract.tidy_finished(str(tmp_path), keep, "epochs") == said  # nothing to remove: no error


def test_the_hub_push_leaves_out_exactly_the_resume_state_and_the_bookkeeping():
    import fnmatch

    folder = ["checkpoint-12/model.safetensors", "checkpoint-12/optimizer.pt", ".final-model-tmp/model.safetensors",
              ".lock", ".hh-sft-run", "damaged-checkpoint-4/model.safetensors", "training_args.bin", "wandb_run_id",
              "model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
              "metrics.json", "samples.jsonl", "training_curves.png", "adapter/adapter_model.safetensors"]
    patterns = save_dir_contract.hub_ignore_patterns()
    pushed = [f for f in folder if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert pushed == ["model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
                      "metrics.json", "samples.jsonl", "training_curves.png", "adapter/adapter_model.safetensors"]


def test_foreign_files_are_named_four_at_most_and_the_refusal_says_both_ways_out(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text("x")
    assert refusal(tmp_path) == (f"sft_training.save_dir: {tmp_path} holds files that train_sft.py did not write "
                                 "(a.txt, b.txt, c.txt, d.txt); pass --overwrite to write this run's files there "
                                 "(files of other names are left alone), or set another save_dir")
    (tmp_path / "e.txt").write_text("x")
    assert "(a.txt, b.txt, c.txt, d.txt, ...); pass --overwrite" in refusal(tmp_path)


def test_a_checkpoint_name_that_is_a_file_is_refused_and_nothing_is_deleted(tmp_path):
    (tmp_path / ".hh-sft-run").write_text("")
    (tmp_path / "checkpoint-3").write_text("not a folder")
    assert refusal(tmp_path) == (f"sft_training.save_dir: {tmp_path / 'checkpoint-3'} is not a folder, so not a "
                                 "checkpoint train_sft.py wrote; move it out of save_dir (nothing was deleted), or "
                                 "set another save_dir")
    assert (tmp_path / "checkpoint-3").is_file()


def test_incomplete_checkpoints_are_removed_in_step_order(tmp_path, capsys):
    (tmp_path / ".hh-sft-run").write_text("")
    for step in (10, 9, 100):
        real_checkpoint(tmp_path, step, complete=False)
    assert save_dir_contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=1) is None
    removed = [line.split()[3] for line in capsys.readouterr().out.splitlines() if line.startswith("Removing")]
    assert removed == [str(tmp_path / f"checkpoint-{step}") for step in (9, 10, 100)]
