"""What researchers expect from the tools they would otherwise pick, on the tiny in-process model: the best
checkpoint as the handoff, early stopping, replies to held-out prompts while training, NEFTune, activation
offloading (accepted on a CPU, said not to be in effect)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sft_report
from conftest import tiny_data, tiny_trainer, write_config
from sft_config import ConfigError, load_config

RISING = {"learning_rate": 0.2, "lr_scheduler_type": "constant", "batch_size": 2, "eval_steps": 2}
TURN = 8  # evaluations after this step score 10 nats worse: the best step is at most TURN on any machine


def evaluating_trainer(folder, steps=16, **sft):
    """The tiny trainer evaluating every 2 steps, its eval loss made to turn after step TURN by construction: the
    recorded eval loss gets +10 (a real loss moves by hundredths per step), so which step is best never depends on
    the machine's floating-point details. The penalty is added where the Trainer logs the metrics dict it then
    hands to load_best and early stopping, so the record and the selection see the same numbers."""
    trainer = tiny_trainer(folder, steps=steps, save_steps=2, **{**RISING, **sft})
    trainer.args.eval_strategy = "steps"  # tiny_trainer turns evaluation off
    log = trainer.log

    def turning_log(logs, *args, **kwargs):
        if "eval_loss" in logs and trainer.state.global_step > TURN:
            logs["eval_loss"] += 10.0
        return log(logs, *args, **kwargs)

    trainer.log = turning_log
    return trainer


def eval_losses(trainer):
    return {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}


@pytest.mark.slow
def test_load_best_hands_off_the_checkpoint_with_the_lowest_eval_loss(tmp_path):
    from model_io import save_final_model

    trainer = evaluating_trainer(tmp_path, load_best=True)
    trainer.train()
    losses = eval_losses(trainer)
    best = min(losses, key=losses.get)
    assert best <= TURN < max(losses) and losses[max(losses)] > losses[best]  # the loss rose after the best step
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    checkpoint = load_file(tmp_path / "out" / f"checkpoint-{best}" / "model.safetensors")  # survived rotation
    save_final_model(trainer, tiny_data()[0], str(tmp_path / "out"), "fp32")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(saved[k], checkpoint[k]) for k in checkpoint)
    metrics = {"global_step": 16, "best": {"step": best, "eval_loss": losses[best], "handed_off": True,
                                           "stopped_early": False}}
    assert sft_report.best_lines(metrics) == [f"  best eval loss {losses[best]:.4f} at step {best}; the saved "
                                              "model is that checkpoint's (load_best)"]


@pytest.mark.slow
def test_early_stopping_stops_after_patience_evals_without_improvement(tmp_path):
    trainer = evaluating_trainer(tmp_path, steps=40, load_best=True, early_stopping_patience=1)
    trainer.train()
    losses = eval_losses(trainer)
    last = max(losses)
    assert trainer.state.global_step == last < 40 and losses[last] > min(losses.values())
    assert sft_report.stopped_early(trainer)


@pytest.mark.slow
def test_a_resume_keeps_the_best_so_far(tmp_path):
    straight = evaluating_trainer(tmp_path / "straight", load_best=True)
    straight.train()
    first = evaluating_trainer(tmp_path / "resumed", steps=10, load_best=True)
    first.train()
    second = evaluating_trainer(tmp_path / "resumed", load_best=True)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-10"))
    assert second.state.best_metric == pytest.approx(straight.state.best_metric, rel=1e-6)
    assert second.state.best_model_checkpoint.rsplit("-", 1)[1] == straight.state.best_model_checkpoint.rsplit("-")[-1]


@pytest.mark.slow
def test_samples_while_training_are_written_at_each_eval_and_never_fail_the_run(tmp_path, monkeypatch):
    from sft_trainer import SampleReplies

    prompts = [([{"role": "user", "content": f"Question {i}?"}], "ref") for i in range(2)]
    trainer = evaluating_trainer(tmp_path, steps=4)
    trainer.add_callback(SampleReplies(prompts, str(tmp_path / "out")))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples_during_training.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, [{"role": "user", "content": f"Question {i}?"}])
                                                        for s in (2, 4) for i in range(2)]
    final = tmp_path / "samples.jsonl"  # one schema with the end-of-run samples (plus step and seconds)
    sft_report.write_samples(trainer.model, trainer.processing_class, [[*p, {"role": "assistant", "content": r}]
                                                                       for p, r in prompts], str(final))
    assert set(rows[0]) - {"step", "generate_s"} == set(json.loads(final.read_text().splitlines()[0]))
    assert all(isinstance(r["reply"], str) and isinstance(r["stopped_at_eot"], bool) for r in rows)

    import model_io

    monkeypatch.setattr(model_io, "model_reply", lambda *a: 1 / 0)
    failing = evaluating_trainer(tmp_path / "failing", steps=4)
    failing.add_callback(SampleReplies(prompts, str(tmp_path / "failing" / "out")))
    failing.train()  # the run finishes
    assert failing.state.global_step == 4 and not (tmp_path / "failing" / "out" /
                                                   "samples_during_training.jsonl").exists()


@pytest.mark.slow
def test_neftune_trains_with_noise_and_leaves_no_hook_in_the_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from model_io import save_final_model

    trainer = tiny_trainer(tmp_path, steps=3, neftune_noise_alpha=5.0)
    assert trainer.args.neftune_noise_alpha == 5.0
    trainer.train()
    embeddings = trainer.model.get_input_embeddings()
    assert not embeddings._forward_hooks  # transformers removes its hook when train() returns
    save_final_model(trainer, tiny_data()[0], str(tmp_path / "out"), "fp32")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([tiny_data()[1][0]["input_ids"][:30]])
    trainer.model.train(), reloaded.train()  # NEFTune's noise acts in training mode only
    with torch.no_grad():
        assert torch.allclose(trainer.model(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_activation_offloading_is_accepted_on_a_cpu_and_said_not_to_be_in_effect(tmp_path, base_model_dir):
    from sft_report import extras_line
    from sft_trainer import build_sft_config

    cfg = load_config(str(write_config(tmp_path, base_model_dir, activation_offloading=True)))
    assert build_sft_config(cfg).activation_offloading is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "activation offloading requested, NOT in effect (it needs a CUDA GPU)" in extras_line(cfg.sft_training)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("load_best", "yes please", "sft_training.load_best: expected true or false"),
    ("early_stopping_patience", 0, "sft_training.early_stopping_patience: must be at least 1"),
    ("sample_prompts", -1, "sft_training.sample_prompts: must be at least 0"),
    ("neftune_noise_alpha", 0, "sft_training.neftune_noise_alpha: must be greater than 0"),
    ("activation_ofloading", True, "unknown key 'activation_ofloading' in 'sft_training' (did you mean "
                                   "'activation_offloading'?)")])
def test_the_new_keys_are_validated_by_name(tmp_path, base_model_dir, key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config(str(write_config(tmp_path, base_model_dir, **{key: value})))
    assert str(error.value).startswith(message)


def test_load_best_needs_a_checkpoint_at_evaluations(tmp_path, base_model_dir):
    import run_env

    cfg = load_config(str(write_config(tmp_path, base_model_dir, load_best=True, eval_steps=20, save_steps=50)))
    with pytest.raises(ConfigError, match=r"save_steps \(50\) must be a multiple of eval_steps \(20\)"):
        run_env.check_before_loading(cfg)


def test_the_fingerprint_covers_what_changes_training(tmp_path, base_model_dir):
    import save_dir_contract

    report = type("Report", (), {"rows_kept": 3, "tokens": 9})()
    plain = load_config(str(write_config(tmp_path, base_model_dir)))
    noisy = load_config(str(write_config(tmp_path, base_model_dir, neftune_noise_alpha=5, early_stopping_patience=2,
                                         load_best=True, sample_prompts=0)))
    a, b = (save_dir_contract.run_fingerprint(c, report, "d", 1) for c in (plain, noisy))
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {"sft_training.neftune_noise_alpha", "sft_training.early_stopping_patience"}


def test_the_keys_reach_the_trainers_arguments(tmp_path, base_model_dir):
    from sft_trainer import build_sft_config

    cfg = load_config(str(write_config(tmp_path, base_model_dir, load_best=True, neftune_noise_alpha=5)))
    args = build_sft_config(cfg)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert args.neftune_noise_alpha == 5
    assert not build_sft_config(cfg, max_steps=10).load_best_model_at_end  # --dry-run saves no checkpoint
    patient = load_config(str(write_config(tmp_path, base_model_dir, early_stopping_patience=2)))
    assert build_sft_config(patient).metric_for_best_model == "eval_loss"
    assert not build_sft_config(patient).load_best_model_at_end


def test_samples_of_a_step_are_written_once_and_none_after_training(tmp_path, monkeypatch):
    """A resume replays the evaluation of a step whose samples are already written; with load_best the evaluation
    after training scores an earlier step's model: neither appends rows labelled with the wrong step or twice."""
    import types

    import model_io
    from sft_trainer import SampleReplies

    monkeypatch.setattr(model_io, "model_reply", lambda *a: ("a reply", True))
    path = tmp_path / "samples_during_training.jsonl"
    path.write_text(json.dumps({"step": 2, "prompt": "Q?", "reply": "before the kill"}) + "\n")
    callback = SampleReplies([([{"role": "user", "content": "Q?"}], "ref")], str(tmp_path))
    args = types.SimpleNamespace(deepspeed=None, fsdp=None)
    model = torch.nn.Linear(1, 1)

    def evaluate(step):
        state = types.SimpleNamespace(is_world_process_zero=True, global_step=step)
        callback.on_evaluate(args, state, None, model=model, processing_class=None)

    callback.on_train_begin(args, None, None)
    for step in (2, 4):
        evaluate(step)
    callback.on_train_end(args, None, None)
    evaluate(4)
    evaluate(6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["reply"]) for r in rows] == [(2, "before the kill"), (4, "a reply")]


@pytest.mark.slow
def test_with_load_best_the_report_gives_the_handed_off_models_numbers(tmp_path):
    """The end of a load_best run, as train_sft.finish runs it: metrics.json's eval loss is the best checkpoint's
    (the model handed off), not the last step's, and `best` says it was handed off."""
    import train_sft
    from hh_sft_chat import DataReport
    from sft_config import load_config

    trainer = evaluating_trainer(tmp_path, load_best=True, readiness_pairs=0, sample_prompts=0)
    trainer.train()
    del trainer.log  # the turn was for choosing the best; the final evaluation scores the loaded model as it is
    losses = eval_losses(trainer)
    best = min(losses, key=losses.get)
    tokenizer, data = tiny_data()
    prepared = train_sft.Prepared(tokenizer, DataReport(), data.train_test_split(test_size=0.25, seed=1),
                                  None, {}, raw=None)
    run = train_sft.Run(load_config(str(tmp_path / "c.yaml")), mode=train_sft.MODES["train"], overwrite=False)
    assert train_sft.finish(run, trainer, prepared, start=0.0) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["best"]["step"] == best and metrics["best"]["handed_off"] is True
    assert metrics["eval_loss"] == pytest.approx(losses[best], rel=1e-5)  # the best model's, evaluated again
    assert metrics["eval_loss"] < losses[max(losses)]


def test_best_says_not_handed_off_without_load_best():
    import types

    from hh_sft_chat import DataReport

    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(metric_for_best_model="eval_loss", world_size=1),
        state=types.SimpleNamespace(log_history=[{"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 0.9}],
                                    epoch=1.0, global_step=2, best_model_checkpoint="out/checkpoint-2",
                                    best_metric=0.9),
        callback_handler=types.SimpleNamespace(callbacks=[]))
    tokenizer, data = tiny_data()
    cfg = load_config_of(early_stopping_patience=2)
    metrics = sft_report.collect_metrics(cfg, trainer, DataReport(), {"train": data, "test": data}, {}, 1.0)
    assert metrics["best"]["handed_off"] is False and metrics["best"]["step"] == 2


def load_config_of(**sft):
    import tempfile

    from sft_config import load_config

    path = tempfile.mktemp(suffix=".yaml")
    with open(path, "w") as f:
        f.write(f"policy_name: tiny\ndataset: {{}}\nsft_training: {sft}\n")
    return load_config(path)


def test_stopped_at_eot_holds_for_a_list_of_stop_ids_and_held_out_prompts_need_a_prompt():
    import types

    from model_io import held_out_prompts, model_reply

    tokenizer, _ = tiny_data()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    class Scripted:  # generates two tokens, the second one a stop id of a list
        generation_config = types.SimpleNamespace(eos_token_id=[7, eot])
        device = torch.device("cpu")

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, torch.tensor([[5, eot]])], dim=1)

    reply, stopped = model_reply(Scripted(), tokenizer, [{"role": "user", "content": "Hi"}], 8)
    assert stopped is True
    assistant_first = [{"role": "assistant", "content": "Hello."}]
    usual = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert held_out_prompts([assistant_first, usual], 4) == [(usual[:1], "Hello.")]  # never an empty prompt
