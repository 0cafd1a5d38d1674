"""The save_dir contract (save_dir_contract.py) as a third fault trial found it broken, and the behaviours a
mutation audit found unpinned: each test fails if its behaviour breaks."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import save_dir_contract as contract
from conftest import REPO, SAMPLE, assert_ok, cli_env, real_checkpoint, run_cli, tiny_trainer, write_config
from sft_config import ConfigError, load_config


def fingerprint(checkpoint, **values):
    (checkpoint / contract.FINGERPRINT_FILE).write_text(json.dumps({"processes": 1, **values}))
    return checkpoint


# --- 1. kept checkpoints continue a finished run for more epochs ---------------------------------------------
@pytest.mark.slow
def test_a_finished_run_with_kept_checkpoints_continues_when_epochs_are_raised(tmp_path, small_base_dir):
    config = write_config(tmp_path, small_base_dir, subset="train[:24]", save_steps=4, keep_checkpoints=True,
                          readiness_pairs=0, sample_prompts=0)
    first = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "raise sft_training.epochs and run the same command to continue" in first
    steps = json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"]

    again = run_cli("--config", str(config), cwd=tmp_path, warm=True)
    assert again.returncode == 2 and "raise sft_training.epochs to continue from it" in again.stderr
    assert "--overwrite deletes both" in again.stderr  # the destructive route says what it destroys
    assert list((tmp_path / "out").glob("checkpoint-*"))  # nothing deleted

    more = assert_ok(run_cli("--config", str(config), "sft_training.epochs=2", cwd=tmp_path, warm=True))
    assert "holds a finished run of 1 epoch(s) with its resume state kept: continuing from" in more
    assert "to 2 epochs" in more
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 * steps and metrics["config"]["sft_training"]["epochs"] == 2


# --- 2. another tool's Trainer output is foreign ---------------------------------------------------------------
def test_another_tools_trainer_output_is_foreign_and_nothing_is_deleted(tmp_path):
    theirs = real_checkpoint(tmp_path, 500, complete=False)
    (theirs / "trainer_state.json").write_text('{"global_step": 500}')  # complete for the Trainer, not ours
    (tmp_path / "trainer_state.json").write_text('{"global_step": 500}')
    (tmp_path / "notes.md").write_text("my notes")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"holds files that train_sft\.py did not write \(checkpoint-500, notes\.md, "
                                          r"trainer_state\.json\)"):
        contract.prepare_save_dir(str(tmp_path), overwrite=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_folder_of_ours_is_recognised_by_its_mark_or_an_older_runs_files(tmp_path):
    assert not contract.is_ours(str(tmp_path))
    (tmp_path / "metrics.json").write_text('{"eval_loss": 1.0}')  # someone else's metrics.json
    assert not contract.is_ours(str(tmp_path))
    (tmp_path / "metrics.json").write_text('{"tokens_trained": 10}')  # ours, from a run before the mark
    assert contract.is_ours(str(tmp_path))
    (tmp_path / "metrics.json").unlink()
    fingerprint(real_checkpoint(tmp_path, 3, complete=False))
    assert contract.is_ours(str(tmp_path))


# --- 3. a checkpoint a resume cannot use is damaged ------------------------------------------------------------
@pytest.mark.parametrize(("missing", "reason"), [
    ("optimizer.pt", "no optimizer.pt: a resume would restart AdamW and the schedule"),
    ("model.safetensors", "it holds no model weights")])
def test_a_checkpoint_missing_what_a_resume_needs_is_set_aside(tmp_path, capsys, missing, reason):
    fingerprint(real_checkpoint(tmp_path, 4), **{"sft_training.save_only_model": False})
    newest = fingerprint(real_checkpoint(tmp_path, 8), **{"sft_training.save_only_model": False})
    (newest / missing).unlink()
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False) == str(tmp_path / "checkpoint-4")
    assert f"Setting aside damaged checkpoint {newest} ({reason}) as {tmp_path / 'damaged-checkpoint-8'}" in \
        capsys.readouterr().out
    assert (tmp_path / "damaged-checkpoint-8").is_dir()
    contract.unlock_save_dir(str(tmp_path))


def test_a_model_only_checkpoint_without_optimizer_state_is_whole(tmp_path):
    path = fingerprint(real_checkpoint(tmp_path, 4), **{"sft_training.save_only_model": True})
    (path / "optimizer.pt").unlink()
    (path / "scheduler.pt").unlink()
    assert contract.damage(str(path)) is None


def test_two_damaged_checkpoints_of_the_same_step_are_both_kept(tmp_path):
    (tmp_path / "damaged-checkpoint-4").mkdir()
    (tmp_path / "damaged-checkpoint-4" / "earlier").write_text("kept")
    broken = real_checkpoint(tmp_path, 4)
    (broken / "model.safetensors").write_bytes(b"cut")
    assert contract.prepare_save_dir(str(tmp_path), overwrite=False) is None
    assert (tmp_path / "damaged-checkpoint-4" / "earlier").is_file() and (tmp_path / "damaged-checkpoint-4-2").is_dir()
    assert contract.set_aside(str(tmp_path)) == ["damaged-checkpoint-4", "damaged-checkpoint-4-2"]
    contract.unlock_save_dir(str(tmp_path))


# --- 4. --readiness scores the run's own split or nothing ------------------------------------------------------
def finished_folder(tmp_path, small_base_dir, **changes):
    cfg = load_config(str(write_config(tmp_path, small_base_dir)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    contract.write_whole(str(out / "metrics.json"), {"tokens_trained": 1, "config": cfg.to_dict()})
    config = write_config(tmp_path, small_base_dir, **changes)
    return load_config(str(config)), out


def test_readiness_refuses_a_config_that_would_score_another_split(tmp_path, small_base_dir):
    cfg, out = finished_folder(tmp_path, small_base_dir)
    assert contract.finished_run(str(out), cfg)["tokens_trained"] == 1
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["dataset"]["seed"] = 7
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"this config differs from that run's \(dataset\.seed 1 -> 7\): it would "
                                          r"score other rows"):
        contract.finished_run(str(out), load_config(str(tmp_path / "config.yaml")))


def test_readiness_refuses_an_unreadable_report_in_one_line(tmp_path, small_base_dir):
    cfg, out = finished_folder(tmp_path, small_base_dir)
    (out / "metrics.json").write_text('{"cut')
    with pytest.raises(ConfigError, match=r"metrics\.json does not read as a finished run's report \(JSONDecodeError"):
        contract.finished_run(str(out), cfg)


@pytest.mark.slow
def test_readiness_never_replaces_the_report_with_an_empty_one(tmp_path, small_base_dir):
    chosen_only = tmp_path / "chosen.jsonl"
    chosen_only.write_text("".join(json.dumps({"chosen": json.loads(line)["chosen"]}) + "\n"
                                   for line in SAMPLE.read_text().splitlines()[:64]))
    cfg, out = finished_folder(tmp_path, small_base_dir, dataset=chosen_only, readiness_pairs=8)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["config"] = cfg.to_dict()  # the run trained on rows without a rejected reply
    (out / "metrics.json").write_text(json.dumps(metrics))
    before = (out / "metrics.json").read_bytes()
    result = run_cli("--config", str(tmp_path / "config.yaml"), "--readiness", cwd=tmp_path)
    assert result.returncode == 2 and "error: no preference pair of the held-out split could be scored" in \
        result.stderr
    assert (out / "metrics.json").read_bytes() == before and not (out / "README.md").exists()


# --- 5. every config error is one line; YAML merge keys; overrides after a mode flag -----------------------------
@pytest.mark.parametrize("value", ["[]", "q_proj", "{a: 1}", "[1]"])
def test_bad_lora_target_modules_are_one_line(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"policy_name: x\ndataset: {{}}\nsft_training: {{lora: {{target_modules: {value}}}}}\n")
    with pytest.raises(ConfigError, match=r"^sft_training\.lora\.target_modules(\.0)?: ") as error:
        load_config(str(path))
    assert "\n" not in str(error.value)


def test_every_error_kind_pydantic_can_raise_gives_one_line():
    """Walks pydantic-core's whole list of error kinds through the formatter (it once crashed on unknown ones)."""
    import typing

    from pydantic_core import core_schema

    from sft_config import _one_line

    context = {"expected": "'a'", "gt": 1, "ge": 1, "lt": 1, "le": 1, "min_length": 1, "max_length": 1,
               "multiple_of": 2, "error": "bad", "field_type": "List", "actual_length": 0}
    kinds = typing.get_args(core_schema.ErrorType)
    assert len(kinds) > 50
    for kind in kinds:
        line = _one_line({"type": kind, "loc": ("sft_training", "x"), "input": [1], "ctx": context,
                          "msg": f"Message of\n{kind}"})
        assert "sft_training" in line and "x" in line and "\n" not in line, kind


def test_a_yaml_merge_key_is_read_like_pyyaml_reads_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_name: x\ndataset: {}\ndpo_training: &shared\n  batch_size: 4\n  eval_batch_size: 2\n"
                    "sft_training:\n  <<: *shared\n  eval_batch_size: 3\n")
    training = load_config(str(path)).sft_training
    assert (training.batch_size, training.eval_batch_size) == (4, 3)


def test_overrides_may_follow_a_mode_flag():
    import train_sft

    args = train_sft.parse_args(["--config", "c.yaml", "--dry-run", "sft_training.epochs=2", "--overwrite",
                                 "sft_training.batch_size=4"])
    assert args.dry_run and args.overwrite and args.overrides == ["sft_training.epochs=2", "sft_training.batch_size=4"]


# --- behaviours a mutation audit found unpinned ---------------------------------------------------------------
def test_the_run_fingerprint_holds_the_lora_settings(tmp_path, small_base_dir):
    lora = {"r": 8, "alpha": 24.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    cfg = load_config(str(write_config(tmp_path, small_base_dir, lora=lora)))
    report = type("Report", (), {"rows_kept": 3, "tokens": 9})()
    assert contract.run_fingerprint(cfg, report, "d", 1)["sft_training.lora"] == lora
    plain = load_config(str(write_config(tmp_path, small_base_dir)))
    assert contract.run_fingerprint(plain, report, "d", 1)["sft_training.lora"] is None


def test_lora_under_deepspeed_is_refused_like_fsdp(tmp_path, small_base_dir, monkeypatch):
    import run_env

    cfg = load_config(str(write_config(tmp_path, small_base_dir, lora={})))
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(variable, "true")
        with pytest.raises(ConfigError, match=r"^sft_training\.lora runs single-process or with DDP"):
            run_env.check_before_loading(cfg)
        monkeypatch.delenv(variable)


@pytest.mark.parametrize(("lora", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights(small_base_dir, lora, dtype):
    from model_io import load_model

    model = load_model(str(small_base_dir), precision="bf16", lora=lora)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_the_data_digest_changes_when_a_token_changes_with_the_length_kept():
    from datasets import Dataset

    from data_process_sft import token_digest

    def digest(rows):
        return token_digest(Dataset.from_dict({"input_ids": rows}))

    assert digest([[1, 2, 3], [4, 5]]) != digest([[1, 2, 3], [4, 6]])
    assert digest([[1, 2, 3], [4, 5]]) == digest([[1, 2, 3], [4, 5]])


def test_a_save_dir_beside_the_base_whose_name_starts_with_the_bases_is_allowed(tmp_path):
    import run_env

    (tmp_path / "base").mkdir()
    run_env.check_apart(str(tmp_path / "base-sft"), str(tmp_path / "base"))
    with pytest.raises(ConfigError):
        run_env.check_apart(str(tmp_path / "base" / "sft"), str(tmp_path / "base"))


@pytest.mark.slow
def test_metrics_json_is_written_after_samples_curves_and_card_and_eos_keeps_the_bases(sft_run):
    from transformers import AutoTokenizer

    save_dir = sft_run[1]
    written = {name: (save_dir / name).stat().st_mtime_ns for name in
               ("samples.jsonl", "training_curves.png", "README.md", "metrics.json")}
    assert written["metrics.json"] >= max(written.values())
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    eos = json.loads((save_dir / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos) >= {tokenizer.convert_tokens_to_ids("<|eot_id|>"),
                        tokenizer.convert_tokens_to_ids("<|end_of_text|>")}


def test_the_seed_reaches_the_length_sampler(tmp_path):
    from sft_trainer import ConversationLengthSampler

    trainer = tiny_trainer(tmp_path, seed=7)
    sampler = trainer._get_train_sampler()
    lengths = trainer.train_dataset["length"]
    assert sampler.seed == 7 and list(sampler) == list(ConversationLengthSampler(lengths, 4, seed=7))
    assert list(sampler) != list(ConversationLengthSampler(lengths, 4, seed=42))


@pytest.mark.slow
def test_the_train_loss_after_a_resume_covers_every_step_with_log_steps_above_one(tmp_path):
    """A checkpoint at a step that is not a logging step (4, log_steps 3) keeps that step's loss, so the train loss
    of an interrupted run equals an uninterrupted one's."""
    from sft_trainer import whole_run_train_loss as train_loss

    constant = {"log_steps": 3, "lr_scheduler_type": "constant"}  # the same rate whatever max_steps
    straight = tiny_trainer(tmp_path / "straight", steps=8, **constant)
    straight.train()
    first = tiny_trainer(tmp_path / "resumed", steps=4, save_steps=4, **constant)
    first.train()
    second = tiny_trainer(tmp_path / "resumed", steps=8, save_steps=4, **constant)
    output = second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-4"))
    assert 4 in [h["step"] for h in second.state.log_history if "loss" in h]
    assert train_loss(second.state.log_history) == pytest.approx(train_loss(straight.state.log_history), rel=1e-6)
    # The Trainer's own train_loss (printed at the end, logged to W&B) is the same whole-run number, not the
    # mean of the steps since the resume: one train loss per run
    assert output.metrics["train_loss"] == pytest.approx(train_loss(straight.state.log_history), rel=1e-6)
    assert second.state.log_history[-1]["train_loss"] == output.metrics["train_loss"]


def test_nothing_outside_the_contract_deletes_or_renames_in_save_dir():
    """The contract module is the only code of the training side that removes or renames files."""
    calls = ("rmtree(", "os.remove(", "os.replace(", "os.rename(", "os.unlink(", ".unlink(", "shutil.move(")
    for path in REPO.glob("*.py"):
        if path.name in ("save_dir_contract.py", "handoff_record.py"):  # handoff_record: the DPO repo's
            continue
        text = path.read_text()
        assert not [call for call in calls if call in text], path.name


def test_a_subprocess_can_import_the_contract_without_torch():
    code = "import sys, save_dir_contract; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=cli_env())
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("key", "value"), [("optim", "sgd"), ("weight_decay", 0.1), ("lr_scheduler_type", "linear")])
def test_a_resume_under_another_optimizer_or_scheduler_is_refused_naming_it(tmp_path, key, value):
    """optimizer.pt and scheduler.pt hold one optimizer's and one schedule's state: another one's resume crashed
    (KeyError: 'momentum' resuming sgd from AdamW)."""
    from hh_sft_chat import DataReport

    cfg = load_config(str(REPO / "config_dpo.yaml"))
    checkpoint = real_checkpoint(tmp_path, 4)
    (checkpoint / contract.FINGERPRINT_FILE).write_text(json.dumps(contract.run_fingerprint(cfg, DataReport(), "d", 1)))
    now = contract.run_fingerprint(cfg.replace(**{key: value}), DataReport(), "d", 1)
    with pytest.raises(ConfigError, match=rf"\(sft_training\.{key} {getattr(cfg.sft_training, key)!r} -> {value!r}\)"):
        contract.check_same_run(str(checkpoint), now)


def test_a_writer_names_only_files_of_the_save_dir_table():
    import os

    assert contract.run_file("out", "metrics.json") == os.path.join("out", "metrics.json")
    with pytest.raises(KeyError, match=r"notes\.txt is not in save_dir_contract\.SAVE_DIR_FILES"):
        contract.run_file("out", "notes.txt")
