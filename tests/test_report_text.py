"""What a run and the handoff check say, word for word: the start summary, the end-of-run best-eval lines, the
model card and `dpo_handoff.py check`'s table, each compared with a reviewed copy in tests/golden/ (a changed
number format, a dropped line or a swapped label fails here; the end-to-end runs only look for phrases).

An intended change: `UPDATE_GOLDEN=1 python -m pytest tests/test_report_text.py`, then review `git diff tests/golden`.
"""

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dpo_handoff
import handoff_record
import sft_report
from conftest import REPO, matches_golden
from hh_sft_chat import DataReport
from sft_config import load_config
from test_dpo_handoff import Killed, check_result, killer, make_repo

SHIPPED_FILE = "data/hh_sample.jsonl"


def config(tmp_path, monkeypatch, *overrides):
    """The shipped config_dpo.yaml with `overrides`, its save_dir relative to a tmp working folder."""
    monkeypatch.chdir(tmp_path)
    return load_config(str(REPO / "config_dpo.yaml"), overrides=["sft_training.save_dir=sft_out", *overrides])


def data_report(**changes):
    fields = {"rows_read": 1500, "rows_kept": 1487, "dropped": {"empty_reply": 9, "no_assistant_turn": 4},
              "tokens": 412_345, "assistant_tokens": 131_072, "truncated": 17,
              "length_percentiles": {"p50": 210, "p95": 700}, "assistant_turns_mean": 2.25}
    return DataReport(**{**fields, **changes})


def trainer(model, world_size=1, max_steps=-1, fsdp=False):
    """What start_summary reads from transformers' Trainer."""
    args = SimpleNamespace(world_size=world_size, max_steps=max_steps, learning_rate=2e-5, warmup_steps=12,
                           optim="adamw_torch_fused")
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))
    return SimpleNamespace(args=args, model=model, accelerator=SimpleNamespace(state=state),
                           is_fsdp_enabled=fsdp, is_deepspeed_enabled=False)


def lora_model():
    """A frozen 1M-parameter base with a 2,080-parameter trainable adapter."""
    base, adapter = torch.nn.Linear(1000, 1000), torch.nn.Linear(40, 52)
    base.requires_grad_(False)
    return torch.nn.Sequential(base, adapter)


SPLIT = {"train": [None] * 1190, "test": [None] * 297}


def test_the_start_summary_of_the_default_run(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cfg = config(tmp_path, monkeypatch)
    text = sft_report.start_summary(cfg, trainer(torch.nn.Linear(300, 400)), data_report(), SPLIT, 1190)
    matches_golden("start_summary_default.txt", text + "\n", tmp_path)


def test_the_start_summary_of_a_lora_packed_run_on_a_messages_file_with_every_extra(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = config(tmp_path, monkeypatch, f"dataset.dataset_name={REPO / SHIPPED_FILE}", "sft_training.packing=true",
                 "sft_training.max_steps=40", "sft_training.lora={r: 8, alpha: 16}", "sft_training.load_best=true",
                 "sft_training.early_stopping_patience=3", "sft_training.neftune_noise_alpha=5",
                 "sft_training.activation_offloading=true", "sft_training.sample_prompts=2",
                 "sft_training.gradient_accumulation=2", "sft_training.save_steps=50", "sft_training.eval_steps=50")
    text = sft_report.start_summary(cfg, trainer(lora_model(), world_size=2, max_steps=40),
                                    data_report(format="messages"), SPLIT, 640)
    matches_golden("start_summary_lora_packed.txt", text.replace(str(REPO), "<repo>") + "\n", tmp_path)


def test_the_parallel_mode_under_fsdp_and_counts_as_people_say_them():
    assert sft_report.parallel_mode(trainer(torch.nn.Linear(2, 2), world_size=4, fsdp=True)).startswith(
        "FSDP2 (sharded), 4 process(es)")
    assert [sft_report.parameters(n) for n in (1_235_814_400, 11_300_000, 400_000, 99_999, 12)] == [
        "1.236B", "11.3M", "0.4M", "99,999", "12"]


def metrics(cfg, *, best=None, readiness=None):
    """A finished run's metrics.json, as collect_metrics and the readiness report write it."""
    out = {"train_loss": 1.23456, "eval_loss": 1.5, "eval_accuracy": 0.61234, "global_step": 297, "global_batch": 16,
           "train_conversations": 1190, "eval_conversations": 297, "tokens_trained": 131072, "tokens_seen": 412345,
           "data": dataclasses.asdict(data_report(truncated=1)), "runtime_s": 812.4}
    if best:
        out["best"] = best
        out["config"] = {"sft_training": {"early_stopping_patience": 3}}
    if readiness:
        out["readiness"] = readiness
    return out


READINESS = {"pairs": 64, "sft_chosen_logp": -101.23456, "base_chosen_logp": -140.5, "sft_rejected_logp": -110.25,
             "base_rejected_logp": -139.75, "sft_chosen_logp_per_token": -1.234567,
             "base_chosen_logp_per_token": -1.75, "chosen_raised_share": 0.9375, "pref_accuracy": 0.59375,
             "pref_accuracy_per_token": 0.5625, "margin_mean": 2.5, "margin_std": 10.125,
             "margin_percentiles": {"p5": -12.5, "p25": -3.25, "p50": 1.5, "p75": 7.75, "p95": 20.0}}


def test_the_model_card_of_a_local_full_fine_tune(tmp_path, monkeypatch):
    cfg = config(tmp_path, monkeypatch)
    matches_golden("model_card_full.md", sft_report.model_card(cfg, metrics(cfg)), tmp_path)


def test_the_model_card_of_a_local_dataset_without_drops_has_no_hub_dataset_tag(tmp_path, monkeypatch):
    data = tmp_path / "mine.jsonl"
    data.write_text("{}\n")
    for name in (str(data), "mine.jsonl"):  # a local path (with a / or not) is no Hub dataset
        cfg = config(tmp_path, monkeypatch, f"dataset.dataset_name={name}")
        m = metrics(cfg)
        m["data"]["dropped"] = {}
        card = sft_report.model_card(cfg, m)
        assert card.startswith("---\nbase_model: meta-llama/Llama-3.2-1B\nlibrary_name: transformers\n")
        assert "- rows read 1500, kept 1487; dropped: none\n" in card


def test_the_model_card_of_a_pushed_lora_run_with_its_best_eval_and_readiness(tmp_path, monkeypatch):
    cfg = config(tmp_path, monkeypatch, "sft_training.lora={r: 8, alpha: 16, dropout: 0.05}",
                 "sft_training.push_to_hub=true", "sft_training.hub_model_id=you/llama-3.2-1b-hh-sft",
                 "sft_training.load_best=true", "sft_training.save_steps=50", "sft_training.eval_steps=50")
    best = {"step": 150, "eval_loss": 1.4321, "handed_off": True, "stopped_early": False}
    card = metrics(cfg, best=best, readiness=READINESS)
    card["data"]["truncated"] = 3
    matches_golden("model_card_lora_pushed.md", sft_report.model_card(cfg, card), tmp_path)


@pytest.mark.parametrize(("handed_off", "stopped_early"), [(True, True), (False, False)])
def test_the_best_eval_lines_and_card_row_say_which_model_was_saved(tmp_path, monkeypatch, handed_off,
                                                                    stopped_early):
    cfg = config(tmp_path, monkeypatch)
    m = metrics(cfg, best={"step": 150, "eval_loss": 1.4321, "handed_off": handed_off,
                           "stopped_early": stopped_early})
    text = "\n".join([*sft_report.best_lines(m), sft_report.best_row(m)])
    matches_golden(f"best_lines_{handed_off}_{stopped_early}.txt", text + "\n", tmp_path)
    assert sft_report.best_lines(metrics(cfg)) == [] and sft_report.best_row(metrics(cfg)) == ""
    unknown = metrics(cfg, best={"step": None, "eval_loss": None, "handed_off": False, "stopped_early": False})
    assert sft_report.best_lines(unknown) == [] and sft_report.best_row(unknown) == ""


@pytest.mark.parametrize(("state", "scored", "diff"), [
    ("installed", [[5, 7, 5, 7], [3, 4, 3, 4]], [[0, 1e-6, 0, 0], [0, 0, 2e-7, 0]]),
    ("upstream", [[2, 3, 2, 3], [3, 4, 3, 4]], [[1.5, 2.25, 1.5, 2.25], [0, 0, 0, 0]]),
    ("installed", [[5, 7, 5, 7], [3, 4, 3, 4]], [[0, 0, 0, 0], [0, 2e-3, 0, 0]]),
])
def test_the_handoff_checks_table_and_verdict(capsys, tmp_path, state, scored, diff):
    code = dpo_handoff._verdict(check_result(state, scored), np.array(diff, dtype=float), Path("dpo"))
    out, err = capsys.readouterr()
    passed = "passed" if code == 0 else "failed"
    matches_golden(f"check_{state}_{passed}.txt", f"exit {code}\n--- stdout\n{out}--- stderr\n{err}", tmp_path)


def test_the_rows_named_by_the_check_stop_at_twelve():
    assert dpo_handoff._rows(np.arange(12)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11"
    assert dpo_handoff._rows(np.arange(13)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (13 in all)"
    assert dpo_handoff._rows(np.arange(0)) == "none"


@pytest.mark.parametrize("command", [[], ["install"], ["uninstall"], ["check"]])
def test_the_handoffs_help(capsys, tmp_path, monkeypatch, command):
    """What `python dpo_handoff.py [install|uninstall|check] --help` prints (the help is the tool's manual)."""
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setattr("sys.argv", ["dpo_handoff.py"])
    monkeypatch.chdir(tmp_path)  # the default --data by a relative path: the help wraps the same in any checkout
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hh.jsonl.gz").write_bytes(b"")
    monkeypatch.setattr(dpo_handoff, "DEFAULT_DATA", Path("data/hh.jsonl.gz"))
    with pytest.raises(SystemExit) as stop:
        dpo_handoff.main([*command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out.replace(str(REPO), "<repo>")
    matches_golden(f"help_dpo_handoff_{'_'.join(command) or 'top'}.txt", text, tmp_path)


def test_what_metrics_json_holds_after_a_run_with_load_best_and_early_stopping(tmp_path, monkeypatch):
    import json

    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    cfg = config(tmp_path, monkeypatch, "sft_training.load_best=true", "sft_training.early_stopping_patience=2",
                 "sft_training.save_steps=50", "sft_training.eval_steps=50", "sft_training.gradient_accumulation=2")
    stopper = EarlyStoppingCallback(early_stopping_patience=2)
    stopper.early_stopping_patience_counter = 2
    history = [{"step": 50, "loss": 2.0}, {"step": 50, "eval_loss": 1.5, "eval_accuracy": 0.4},
               {"step": 100, "loss": 1.0}, {"step": 100, "eval_loss": 1.6, "eval_accuracy": 0.5},
               {"step": 100, "train_loss": 1.5}]
    trainer = SimpleNamespace(
        args=SimpleNamespace(metric_for_best_model="eval_loss", world_size=2),
        state=SimpleNamespace(log_history=history, epoch=1.5, global_step=100,
                              best_model_checkpoint="sft_out/checkpoint-50", best_metric=1.5),
        callback_handler=SimpleNamespace(callbacks=[object(), stopper]))
    split = {"train": Dataset.from_dict({"num_trained": [30, 40, 50], "length": [100, 110, 121]}),
             "test": Dataset.from_dict({"num_trained": [1], "length": [2]})}
    metrics = sft_report.collect_metrics(cfg, trainer, data_report(), split, {"eval_loss": 1.5}, 812.44)
    metrics.pop("config")  # the whole config, as its own tests read it
    matches_golden("metrics_load_best.json", json.dumps(metrics, indent=1, sort_keys=True) + "\n", tmp_path)
    without = sft_report.collect_metrics(cfg, SimpleNamespace(**{**vars(trainer), "args": SimpleNamespace(
        metric_for_best_model=None, world_size=1)}), data_report(), split, {}, 1.0)
    assert "best" not in without and without["eval_loss"] == 1.6 and without["eval_accuracy"] == 0.5
    assert without["global_batch"] == 16 * 2 * 1


def describe_figure(fig) -> str:
    """What a saved figure shows, as text: size, titles, axis labels and limits, each line and bar, the legend."""
    def pair(values):
        return tuple(round(float(v), 4) for v in values)

    suptitle = (fig._suptitle.get_text(), fig._suptitle.get_fontsize()) if fig._suptitle else None
    lines = [f"figure {pair(fig.get_size_inches())} in, dpi {fig.dpi:g}, suptitle {suptitle!r}"]
    for i, ax in enumerate(fig.axes):
        lines.append(f"axes {i}: title {ax.get_title()!r} ({ax.title.get_fontsize():g} pt); x {ax.get_xlabel()!r} "
                     f"{pair(ax.get_xlim())}; y {ax.get_ylabel()!r} {pair(ax.get_ylim())}")
        for line in ax.get_lines():
            label = "" if line.get_label().startswith("_") else repr(line.get_label())
            lines.append(f"  line {label} {line.get_color()} {line.get_marker()} {line.get_linestyle()} "
                         f"alpha {line.get_alpha()} width {line.get_linewidth():g}: "
                         f"{list(zip(pair(line.get_xdata()), pair(line.get_ydata())))}")
        if ax.patches:
            first, last = ax.patches[0], ax.patches[-1]
            lines.append(f"  {len(ax.patches)} bars, {sum(p.get_height() for p in ax.patches):g} counted, colour "
                         f"{pair(first.get_facecolor())}, from {first.get_x():.4g} to "
                         f"{last.get_x() + last.get_width():.4g}")
        if ax.get_legend():
            lines.append(f"  legend {[t.get_text() for t in ax.get_legend().get_texts()]} at {ax.get_legend()._loc}")
        grid = [g for g in ax.get_xgridlines() if g.get_visible()]
        lines.append(f"  grid {grid[0].get_alpha() if grid else None}; integer y ticks "
                     f"{getattr(ax.yaxis.get_major_locator(), '_integer', False)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the report saves, kept open for describe_figure (and still written to disk)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    saved, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    return saved


def test_the_training_curves(tmp_path, saved_figures):
    history = [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 2.0}, {"step": 20, "eval_loss": 2.2,
               "eval_accuracy": 0.3}, {"step": 30, "loss": 1.5}, {"step": 40, "eval_loss": 1.9, "eval_accuracy": 0.4},
               {"step": 40, "train_loss": 2.0}]
    sft_report.plot_curves(history, str(tmp_path / "curves.png"), "SFT of base on data -> out")
    assert (tmp_path / "curves.png").stat().st_size > 0
    matches_golden("figure_training_curves.txt", describe_figure(saved_figures[0]), tmp_path)


def test_the_readiness_histograms(tmp_path, saved_figures):
    margins = [-30.0, -2.0, -1.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 80.0]
    report = {"margins": margins, "margins_per_token": [m / 10 for m in margins]}
    sft_report.plot_margins(report, "hh.jsonl", str(tmp_path / "margins.png"))
    sft_report.plot_margins({"margins": [0.0, *margins[:4]]}, "hh.jsonl", str(tmp_path / "one.png"))
    many = np.linspace(-50, 50, 201).tolist()  # one bar per two pairs: 100 bars, at most 40
    sft_report.plot_margins({"margins": many}, "hh.jsonl", str(tmp_path / "many.png"))
    sft_report.plot_margins({"margins": many[:40]}, "hh.jsonl", str(tmp_path / "forty.png"))  # 20 bars
    text = "".join(describe_figure(figure) for figure in saved_figures)
    matches_golden("figure_readiness_margins.txt", text, tmp_path)


def test_samples_jsonl_holds_the_prompt_messages_the_reply_and_the_reference(tmp_path, monkeypatch):
    """One schema: each line the prompt as messages, the greedy reply, whether it stopped at <|eot_id|>, and the
    held-out reference; the first n conversations that have a prompt, with the model in eval mode."""
    import json

    asked = []

    def reply(model, tokenizer, prompt, max_new_tokens):
        asked.append((prompt, max_new_tokens))
        return f"reply {len(asked)}", len(asked) == 1

    monkeypatch.setattr(sft_report, "model_reply", reply)
    model = torch.nn.Linear(1, 1).train()
    asked_with = []
    monkeypatch.setattr(sft_report, "model_reply", lambda *args: asked_with.append(args) or reply(*args))
    conversations = [[{"role": "assistant", "content": "no prompt"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                     [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}],
                     [{"role": "user", "content": "third"}, {"role": "assistant", "content": "not asked"}]]
    path = tmp_path / "samples.jsonl"
    sft_report.write_samples(model, None, conversations, str(path), n=2, max_new_tokens=7)
    assert not model.training and [n for _, n in asked] == [7, 7]
    assert [(m, t, p) for m, t, p, _ in asked_with] == [(model, None, conversations[1][:1]),
                                                       (model, None, conversations[2][:4])]
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"prompt": conversations[1][:1], "reply": "reply 1", "stopped_at_eot": True, "reference": "Hello"},
        {"prompt": conversations[2][:4], "reply": "reply 2", "stopped_at_eot": False, "reference": "A2"}]
    many = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "café"}] for i in range(6)]
    sft_report.write_samples(model, "tok", many, str(path))  # the report's call: 4 prompts, up to 128 new tokens
    assert asked_with[-1][:3] == (model, "tok", many[3][:1])
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4 and asked[-1][1] == 128
    assert '"reference": "café"' in path.read_text(encoding="utf-8")  # JSON lines keep the text readable


def test_metrics_json_is_the_metrics_whole(tmp_path):
    import json

    sft_report.save_metrics(str(tmp_path), {"train_loss": 1.5, "data": {"rows_read": 3}})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"train_loss": 1.5, "data": {"rows_read": 3}}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_report_writes_each_part_under_its_name_with_the_runs_title(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(sft_report, "write_samples", lambda model, tokenizer, messages, path: calls.setdefault(
        "samples", (model, tokenizer, messages, path)))
    monkeypatch.setattr(sft_report, "plot_curves", lambda history, path, title: calls.setdefault(
        "curves", (history, path, title)))
    monkeypatch.setattr(sft_report, "plot_margins", lambda report, source, path: calls.setdefault(
        "margins", (report, source, path)))
    cfg = config(tmp_path, monkeypatch)
    (tmp_path / "sft_out").mkdir()
    model = torch.nn.Linear(1, 1)
    trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: ("unwrapped", m)), model=model)
    m = {**metrics(cfg, readiness=READINESS), "log_history": [{"step": 1, "loss": 2.0}]}
    sft_report.write_report(cfg, trainer, "tok", ["conversation"], m)
    out = "sft_out"  # as configured (relative to the working folder)
    assert calls["samples"] == (("unwrapped", model), "tok", ["conversation"], os.path.join(out, "samples.jsonl"))
    assert calls["curves"] == (m["log_history"], os.path.join(out, "training_curves.png"),
                               "SFT of meta-llama/Llama-3.2-1B on Anthropic/hh-rlhf -> sft_out")
    assert calls["margins"] == (READINESS, "Anthropic/hh-rlhf", os.path.join(out, "readiness_margins.png"))
    assert (tmp_path / "sft_out" / "README.md").read_text(encoding="utf-8") == sft_report.model_card(cfg, m)
    assert list(sft_report.card_parts(cfg, metrics(cfg))) == ["README.md"]
    sharded = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False)
    monkeypatch.setattr(sft_report, "_unsharded_model", lambda trainer, save_dir: ("reloaded from", save_dir))
    sft_report.write_report(cfg, sharded, "tok", [], m)
    assert calls["samples"][0] == ("unwrapped", model)  # the first call's
    calls.clear()
    sft_report.write_report(cfg, sharded, "tok", [], m)
    assert calls["samples"][0] == ("reloaded from", "sft_out")
    assert list(sft_report.card_parts(cfg, metrics(cfg, readiness={"pairs": 0}))) == ["README.md"]


def test_log_to_wandb_logs_with_the_step_only_when_a_run_is_open(monkeypatch):
    logged = []
    fake = SimpleNamespace(run=SimpleNamespace(log=logged.append))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    sft_report.log_to_wandb({"readiness/pairs": 8}, 40)
    sft_report.log_to_wandb({}, 41)
    fake.run = None
    sft_report.log_to_wandb({"readiness/pairs": 8}, 42)
    assert logged == [{"readiness/pairs": 8, "train/global_step": 40}]
    monkeypatch.delitem(__import__("sys").modules, "wandb")
    sft_report.log_to_wandb({"readiness/pairs": 8}, 43)  # wandb need not be installed


# --- the small rules behind the texts (each found by mutation testing: broken, every test above still passed) ----
def test_uninstall_says_what_it_put_back_file_by_file(tmp_path, capsys):
    repo = make_repo(tmp_path)
    assert dpo_handoff.install(repo) == 0
    capsys.readouterr()
    assert dpo_handoff.uninstall(repo) == 0
    done = capsys.readouterr().out.replace(str(repo), "<repo>")
    assert dpo_handoff.install(repo) == 0
    with pytest.MonkeyPatch.context() as m:  # an uninstall killed at its third write, then run again
        m.setattr(os, "replace", killer(3)(os.replace))
        with pytest.raises(Killed):
            dpo_handoff.uninstall(repo)
    capsys.readouterr()
    assert dpo_handoff.uninstall(repo) == 0
    resumed = capsys.readouterr().out.replace(str(repo), "<repo>")
    matches_golden("uninstall.txt", f"--- after an install\n{done}--- after a killed uninstall\n{resumed}", tmp_path)


def test_an_uninstall_with_nothing_installed_names_the_temporary_files_it_removed(tmp_path, capsys):
    repo = make_repo(tmp_path)
    assert dpo_handoff.uninstall(repo) == 0
    assert capsys.readouterr().out == (f"nothing installed in {repo} (no handoff record {handoff_record.RECORD}): "
                                       "nothing touched\n")
    leftover = f".{handoff_record.RECORD}{handoff_record.TEMPORARY}"  # a record being written when killed
    (repo / leftover).write_bytes(b"half")
    assert dpo_handoff.uninstall(repo) == 0
    assert capsys.readouterr().out == (f"nothing installed in {repo} (no handoff record {handoff_record.RECORD}): "
                                       f"nothing touched but a temporary file a killed install left ({leftover})\n")
    assert not (repo / leftover).exists()


@pytest.mark.parametrize("leftovers", [(), ("model_io.py", "training.py.hh-sft-backup")])
def test_the_older_install_advice_lists_exactly_what_to_remove(tmp_path, leftovers):
    repo = make_repo(tmp_path)
    for name in leftovers:
        (repo / name).write_text("x")
    said = str(dpo_handoff._older_install(repo, ["training.py", "risk_dpo_trainer.py"]))
    remove = f" && rm {' '.join(leftovers)}" if leftovers else ""
    assert said == (f"training.py, risk_dpo_trainer.py in {repo} carry lines marked '{dpo_handoff.MARK}' but there "
                    f"is no handoff record ({handoff_record.RECORD}): an older dpo_handoff.py changed them. Put the "
                    f"repo back first (in {repo}: git checkout -- training.py risk_dpo_trainer.py train_sft.py "
                    f"data_process_sft.py{remove}), then rerun; nothing was changed")


def test_checks_input_rules_word_for_word(tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    config = repo / "config_dpo.yaml"
    config.write_text("dataset: [unclosed\n")
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._dpo_max_len(repo)
    assert str(bad.value) == f"{config} cannot be read: while parsing a flow sequence"
    config.write_text("dataset:\n  max_len: many\n")
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._dpo_max_len(repo)
    assert str(bad.value) == (f"{config} has no integer dataset.max_len: its training.py reads it (e.g. `max_len: "
                              "512` under `dataset:`)")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._require_model_folder(model)
    assert str(bad.value) == f"--model {model}: no readable config.json (expected the folder train_sft.py saved)"
    (model / "config.json").write_text("{}")
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._require_model_folder(model)
    assert str(bad.value) == (f"--model {model}: config.json describes no architecture, not LlamaForCausalLM "
                              "(expected the folder train_sft.py saved from a Llama-3 base)")
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors.index.json").write_text("{}")  # sharded weights count
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._require_model_folder(model)
    assert str(bad.value) == (f"--model {model}: no tokenizer files (tokenizer.json; expected the folder "
                              "train_sft.py saved, which holds its tokenizer)")
    (model / "tokenizer.model").write_text("a sentencepiece model")
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    dpo_handoff._require_model_folder(model)  # a slow tokenizer's file is a tokenizer too; a template in its config
    with pytest.raises(dpo_handoff.HandoffError) as bad:
        dpo_handoff._read_rows(str(tmp_path / "missing.jsonl"), 4)
    assert str(bad.value).startswith(f"cannot load the dataset {tmp_path / 'missing.jsonl'}: ")
    monkeypatch.setattr("importlib.metadata.version", lambda name: {"trl": "0.26.2"}[name])
    dpo_handoff._require_dpo_stack()  # the DPO repo's pin passes


def test_the_handoffs_command_line_reaches_each_command_with_its_arguments(tmp_path, monkeypatch, capsys):
    called = []
    monkeypatch.setattr(dpo_handoff, "install", lambda repo, **kw: called.append(("install", repo, kw)) or 0)
    monkeypatch.setattr(dpo_handoff, "check", lambda *args: called.append(("check", *args)) or 0)
    assert dpo_handoff.main(["install", "--dpo-repo", str(tmp_path), "--discard-changes"]) == 0
    assert dpo_handoff.main(["check", "--dpo-repo", str(tmp_path), "--model", "m", "-n", "1", "--batch-size",
                             "1"]) == 0
    assert called == [("install", tmp_path, {"discard_changes": True}),
                      ("check", tmp_path, Path("m"), str(dpo_handoff.DEFAULT_DATA), 1, 1, None)]
    assert dpo_handoff.main(["check", "--dpo-repo", str(tmp_path), "--model", "m", "-n", "0"]) == 2
    assert capsys.readouterr().err == "error: -n/--rows and --batch-size must be at least 1\n"
    for argv in ([], ["check", "--dpo-repo", str(tmp_path), "--model", "m", "--batch-size", "two"]):
        with pytest.raises(SystemExit) as usage:
            dpo_handoff.main(argv)
        assert usage.value.code == 2
    monkeypatch.setattr(dpo_handoff, "DEFAULT_DATA", tmp_path / "not-shipped.jsonl.gz")
    with pytest.raises(SystemExit):
        dpo_handoff.main(["check", "--help"])
    assert "(default: Anthropic/hh-rlhf)" in " ".join(capsys.readouterr().out.split())


def test_a_difference_of_exactly_the_tolerance_passes(capsys):
    scored = [[5, 7, 5, 7], [3, 4, 3, 4]]
    at = np.full((2, 4), dpo_handoff.TOLERANCE)
    assert dpo_handoff._verdict(check_result("installed", scored), at, Path("dpo")) == 0


def test_the_schedule_line_counts_steps_from_epochs_and_max_steps_and_says_when_wandb_is_off(tmp_path, monkeypatch):
    cfg = config(tmp_path, monkeypatch, "sft_training.epochs=2", "sft_training.wandb_project=null",
                 "sft_training.sample_prompts=0")
    text = sft_report.start_summary(cfg, trainer(torch.nn.Linear(2, 2)), data_report(), SPLIT, 1190)
    assert "epochs 2, ~150 optimizer steps of 16\n" in text and "extras" not in text
    assert text.endswith(f"W&B: off; checkpoints and final model: {tmp_path / 'sft_out'}")
    one = config(tmp_path, monkeypatch, "sft_training.max_steps=1")
    assert "max_steps: 1 optimizer steps of 16 (max_steps sets the length" in sft_report.start_summary(
        one, trainer(torch.nn.Linear(2, 2), max_steps=1), data_report(), SPLIT, 1190)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    offload = config(tmp_path, monkeypatch, "sft_training.activation_offloading=true", "sft_training.sample_prompts=0")
    assert sft_report.extras_line(offload.sft_training) == "  extras: activation offloading on\n"
    assert sft_report.extras_line(cfg.sft_training) == ""


def test_counts_round_as_people_read_them_at_each_boundary():
    assert [sft_report.parameters(n) for n in (1_000_000_000, 999_999_999, 1_234_500_001, 100_000, 1_250_001)] == [
        "1.000B", "1000.0M", "1.235B", "0.1M", "1.3M"]
    lora = SimpleNamespace(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj"])
    base, adapter = torch.nn.Linear(300, 300), torch.nn.Linear(1000, 1000)
    base.requires_grad_(False)
    said = sft_report.training_mode(trainer(torch.nn.Sequential(base, adapter)), lora)
    assert said.endswith("1.0M trainable of 1.1M parameters (91.73%); weights, gradients and AdamW state ~15.6 MiB "
                         "instead of ~16.7 MiB for full fine-tuning (activations not counted)")
    deepspeed = SimpleNamespace(**{**vars(trainer(base, world_size=2)), "is_deepspeed_enabled": True})
    deepspeed.accelerator.state.deepspeed_plugin = SimpleNamespace(zero_stage=3)
    assert sft_report.parallel_mode(deepspeed).startswith("DeepSpeed ZeRO-3 (sharded), 2 process(es)")


def test_metrics_of_a_run_without_an_eval_or_a_best_checkpoint(tmp_path, monkeypatch):
    import math

    from datasets import Dataset

    cfg = config(tmp_path, monkeypatch, "sft_training.load_best=true", "sft_training.save_steps=50",
                 "sft_training.eval_steps=50")
    trainer = SimpleNamespace(args=SimpleNamespace(metric_for_best_model="eval_loss", world_size=1),
                              state=SimpleNamespace(log_history=[{"step": 1, "loss": 2.0}], epoch=None, global_step=0,
                                                    best_model_checkpoint=None, best_metric=None),
                              callback_handler=SimpleNamespace(callbacks=[]))
    split = {"train": Dataset.from_dict({"num_trained": [3], "length": [5]}), "test": []}
    m = sft_report.collect_metrics(cfg, trainer, data_report(), split, {}, 0.0)
    assert math.isnan(m["eval_loss"]) and math.isnan(m["eval_accuracy"])
    assert (m["tokens_trained"], m["tokens_seen"]) == (0, 0) and m["best"]["step"] is None


def test_sharded_weights_are_reloaded_from_save_dir_for_the_samples(monkeypatch):
    from transformers import AutoModelForCausalLM

    loaded = []

    class Loaded:
        def to(self, device):
            loaded.append(device)
            return self

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path: loaded.append(path) or Loaded())
    for fsdp, deepspeed in ((True, False), (False, True)):
        sharded = SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed,
                                  args=SimpleNamespace(device="cuda:1"))
        assert isinstance(sft_report._unsharded_model(sharded, "out"), Loaded)
    assert loaded == ["out", "cuda:1", "out", "cuda:1"]


@pytest.mark.parametrize(("error", "said"), [(ValueError(""), "ValueError: "),
                                             (OSError("disk full\nsecond line"), "OSError: disk full")])
def test_a_report_part_that_fails_is_one_warning_line(tmp_path, capsys, error, said):
    def fail(path):
        raise error

    sft_report.write_parts(str(tmp_path), {"training_curves.png": fail,
                                           "README.md": lambda path: sft_report._write_text(path, "é")})
    assert capsys.readouterr().err == f"warning: could not write training_curves.png ({said}); the model is saved\n"
    assert (tmp_path / "README.md").read_bytes() == "é".encode()


def test_the_margin_plot_range_keeps_zero_in_view_and_widens_a_single_value():
    assert sft_report.plot_range(np.array([3.0, 3.0, 3.0]))[:2] == (-0.1, 4.0)  # a width of 1 on each side
    low, high, below, above = sft_report.plot_range(np.array([5.0, 6.0, 7.0, 8.0]))
    assert low < 0 < high and (below, above) == (0, 0)
    low, high, _, _ = sft_report.plot_range(np.array([-8.0, -7.0, -6.0]))
    assert low < high and high > 0
