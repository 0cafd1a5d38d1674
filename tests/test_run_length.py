"""A run's length (sft_training.max_steps when set, else epochs) as the fifth fault trial found it broken: the same
command after a kill at any point ends with the weights and report of an uninterrupted run; a checkpoint past the
run's length is refused; a finished run continues when the key it uses grows, and its advice names that key."""

import json
import shutil

import pytest
from safetensors.torch import load_file

import save_dir_contract as contract
from conftest import real_checkpoint, run_cli, write_config
from sft_config import ConfigError
from test_save_dir import injected, refusal

# A max_steps run that stops mid-epoch (96 rows in batches of 4: ~20 steps an epoch), at a constant learning rate,
# so one step too many shows in the weights.
MAX_STEPS = {"subset": "train[:96]", "val_ratio": 0.1, "max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant",
             "readiness_pairs": 0, "sample_prompts": 0}
# Where a kill lands: os._exit(137) after (or instead of) one stage of the run's end.
KILL_POINTS = {
    "checkpoint at max_steps written": "import sft_trainer\nsave = sft_trainer.WriteRunFingerprint.on_save\n"
        "def on_save(self, args, state, control, **kw):\n    save(self, args, state, control, **kw)\n"
        "    if state.global_step == 4: os._exit(137)\nsft_trainer.WriteRunFingerprint.on_save = on_save",
    "final save started": "import model_io\nmodel_io.save_final_model = lambda *a, **k: os._exit(137)",
    "weights published": "import save_dir_contract\npublish = save_dir_contract.publish\n"
        "save_dir_contract.publish = lambda d: (publish(d), os._exit(137))",
    "report written": "import sft_report\nsft_report.write_report = lambda *a, **k: os._exit(137)",
    "metrics.json written": "import sft_report\nsft_report.save_metrics = lambda *a, **k: os._exit(137)",
}


def finished(out):
    return load_file(out / "model.safetensors"), json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_a_kill_at_every_point_of_a_max_steps_run_ends_with_the_uninterrupted_model_and_report(tmp_path,
                                                                                              small_base_dir):
    """Killed at each point in turn, in one save_dir: each kill lands in the rerun of the kill before it (which
    reaches that point with the same files on disk as a first run killed there), and each rerun is the same
    command; the last one ends with the uninterrupted run's weights and report."""
    reference = tmp_path / "reference"
    reference.mkdir()
    reference_config = write_config(reference, small_base_dir, **MAX_STEPS)
    assert run_cli("--config", str(reference_config), cwd=reference, warm=True).returncode == 0
    weights, metrics = finished(reference / "out")
    assert metrics["global_step"] == 4 and 0 < metrics["epochs_trained"] < 1  # stopped mid-epoch
    folder = tmp_path / "killed"
    folder.mkdir()
    config = write_config(folder, small_base_dir, **MAX_STEPS)
    for name, patch in KILL_POINTS.items():
        killed = run_cli("--config", str(config), cwd=folder, script=str(injected(folder, "import os\n" + patch)),
                         warm=True)
        assert killed.returncode == 137, (name, killed.stdout[-2000:], killed.stderr[-2000:])
        assert not (folder / "out" / "metrics.json").exists(), name  # the run is not finished yet
        if name == "final save started":  # the run killed at max_steps' checkpoint was finished, not trained on
            assert "Finishing from" in killed.stdout and "so no step is trained" in killed.stdout
    rerun = run_cli("--config", str(config), cwd=folder, warm=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got, report = finished(folder / "out")
    assert max((weights[k] - got[k]).abs().max().item() for k in weights) <= 1e-6
    assert (report["global_step"], report["epochs_trained"]) == (4, metrics["epochs_trained"])
    assert report["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-6)


def checkpoint_at(folder, step, epoch):
    path = real_checkpoint(folder, step)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))
    return path


@pytest.mark.parametrize(("length", "said"), [
    ({"max_steps": 2}, "is at step 4, past this run's sft_training.max_steps 2: resuming it would hand off a "
                       "longer-trained model than the config says; set sft_training.max_steps to at least 4"),
    ({"epochs": 1}, "is at epoch 1.5 (step 4), past this run's sft_training.epochs 1: resuming it would hand off a "
                    "longer-trained model than the config says; set sft_training.epochs to at least 1.5")])
def test_a_checkpoint_past_the_runs_length_is_refused_in_one_line(tmp_path, length, said):
    checkpoint_at(tmp_path, 4, 1.5)
    with pytest.raises(ConfigError) as refused:
        contract.prepare_save_dir(str(tmp_path), overwrite=False, **{"epochs": 2, **length})
    assert said in str(refused.value) and "\n" not in str(refused.value)
    assert (tmp_path / "checkpoint-4").is_dir()  # nothing deleted


def test_a_checkpoint_at_or_within_the_runs_length_is_resumed(tmp_path):
    checkpoint_at(tmp_path, 4, 1.5)
    for length in ({"max_steps": 4}, {"max_steps": 9}, {"epochs": 2}):
        assert contract.prepare_save_dir(str(tmp_path), overwrite=False, **{"epochs": 1, **length}) == \
            str(tmp_path / "checkpoint-4")
        contract.unlock_save_dir(str(tmp_path))


def finished_folder(folder, steps, epochs_trained, **sft):
    checkpoint_at(folder, steps, epochs_trained)
    (folder / "model.safetensors").write_text("weights")
    (folder / "metrics.json").write_text(json.dumps({
        "global_step": steps, "epochs_trained": epochs_trained, "tokens_trained": 1,
        "config": {"sft_training": {"epochs": 1, "max_steps": None, **sft}}}))


@pytest.mark.parametrize(("length", "continues"), [
    ({"max_steps": 6}, "holds a finished run of 4 steps with its resume state kept: continuing from"),
    ({"epochs": 2}, "holds a finished run of 0.4 epoch(s) with its resume state kept: continuing from"),
    ({"epochs": 1}, "holds a finished run of 0.4 epoch(s) with its resume state kept: continuing from")])
def test_a_finished_run_continues_when_the_key_it_uses_grows(tmp_path, capsys, length, continues):
    finished_folder(tmp_path, 4, 0.4, max_steps=4)
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False, **{"epochs": 1, **length}) == \
        str(tmp_path / "checkpoint-4")
    assert continues in capsys.readouterr().out


@pytest.mark.parametrize(("length", "key"), [({"max_steps": 4}, "max_steps"), ({"max_steps": 3}, "max_steps"),
                                             ({"epochs": 1}, "epochs")])
def test_a_finished_run_that_did_not_grow_is_refused_naming_the_key_the_run_uses(tmp_path, length, key):
    finished_folder(tmp_path, 4, 1.0)
    with pytest.raises(ConfigError, match=rf"already holds a finished model and its kept resume state "
                                          rf"\(checkpoint-4\): raise sft_training\.{key} to continue from it"):
        contract.prepare_save_dir(str(tmp_path), overwrite=False, **{"epochs": 1, **length})


def test_metrics_and_the_card_say_the_steps_and_epochs_the_weights_have():
    from conftest import REPO
    from sft_config import load_config
    from sft_report import model_card

    cfg = load_config(str(REPO / "config_dpo.yaml"))
    metrics = {"data": {"dropped": {}, "rows_read": 1, "rows_kept": 1, "truncated": 0, "tokens": 1,
                        "assistant_tokens": 1}, "train_conversations": 1, "eval_conversations": 1,
               "train_loss": 1.0, "eval_loss": 1.0, "eval_accuracy": 0.5, "global_step": 4, "epochs_trained": 0.25,
               "global_batch": 16, "tokens_trained": 1, "tokens_seen": 1, "runtime_s": 1.0}
    assert "| optimizer steps | 4 (0.25 epochs) |" in model_card(cfg, metrics)


def test_a_checkpoint_at_exactly_the_runs_epochs_is_resumed_and_one_past_them_is_not(tmp_path):
    checkpoint_at(tmp_path, 4, 1.5)
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=1.5) == str(tmp_path / "checkpoint-4")
    contract.unlock_save_dir(str(tmp_path))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 1.5001}))
    with pytest.raises(ConfigError, match=r"is at epoch 1\.5001 \(step 4\), past this run's sft_training\.epochs "
                                          r"1\.5.*; set sft_training\.epochs to at least 1\.5001 \(the run that "
                                          r"wrote it\), or start fresh with --overwrite or another save_dir$"):
        contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=1.5)


def test_a_checkpoint_state_without_step_or_epoch_counts_as_zero(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    assert contract.checkpoint_progress(str(tmp_path)) == (0, 0.0)


def test_a_finished_max_steps_run_continues_when_max_steps_grows_though_its_epochs_did_not(tmp_path, capsys):
    finished_folder(tmp_path, 4, 1.0, max_steps=4)
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=1, max_steps=6) == \
        str(tmp_path / "checkpoint-4")
    assert "holds a finished run of 4 steps with its resume state kept: continuing from" in capsys.readouterr().out


def test_a_finished_run_from_before_epochs_trained_continues_by_its_configured_epochs(tmp_path, capsys):
    finished_folder(tmp_path, 4, 1.0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    del metrics["epochs_trained"]  # older runs: the config's epochs is what they trained
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=2) == str(tmp_path / "checkpoint-4")
    assert "holds a finished run of 1 epoch(s) with its resume state kept: continuing from" in capsys.readouterr().out
    contract.unlock_save_dir(str(tmp_path))
    with pytest.raises(ConfigError, match=r"raise sft_training\.epochs to continue from it"):
        contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=1)


@pytest.mark.parametrize("metrics", ["not json", "[1, 2]", '{"global_step": "four"}', "unreadable"])
def test_a_finished_run_whose_metrics_cannot_be_read_is_refused_not_continued(tmp_path, metrics):
    finished_folder(tmp_path, 4, 0.4)
    if metrics == "unreadable":
        (tmp_path / "metrics.json").unlink()
        (tmp_path / "metrics.json").mkdir()  # reading it is an OSError
    else:
        (tmp_path / "metrics.json").write_text(metrics)
    with pytest.raises(ConfigError, match=r"already holds a finished model and its kept resume state"):
        contract.prepare_save_dir(str(tmp_path), overwrite=False, epochs=9)


def test_weights_without_a_report_or_a_checkpoint_are_refused_saying_both_ways_out(tmp_path):
    (tmp_path / "model.safetensors").write_text("weights")
    (tmp_path / ".hh-sft-run").write_text("")
    assert refusal(tmp_path) == (f"{tmp_path} holds a model but no metrics.json and no checkpoint to finish it from; "
                                 "pass --overwrite to train over it, or set another sft_training.save_dir")


def test_a_finished_run_without_resume_state_is_refused_saying_what_overwrite_does(tmp_path):
    finished_folder(tmp_path, 4, 1.0)
    shutil.rmtree(tmp_path / "checkpoint-4")
    assert refusal(tmp_path, epochs=3) == (f"{tmp_path} already holds a finished model; --overwrite deletes it and "
                                           "trains a new model from step 0, or set another sft_training.save_dir")
