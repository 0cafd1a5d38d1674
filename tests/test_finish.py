"""Runs that finish: the end-of-run report never fails a trained and saved model, every launcher saves one folder
in the run's precision, and the start summary names the parallel mode really in effect."""

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import sft_report
from conftest import REPO, SAMPLE, SEVERAL_PROCESSES, assert_ok, cli_env, run_cli, write_config
from model_io import cast_saved_weights
from sft_config import load_config


def no_prompt_rows(path, n=24):
    """HH rows like the real ones whose first human turn is empty: they parse to assistant-first conversations."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]
    for row in rows[::2]:
        if isinstance(row["chosen"], str):
            row["chosen"] = "\n\nHuman: \n\nAssistant: " + row["chosen"].split("\n\nAssistant: ", 1)[-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_eval_rows_without_a_prompt_do_not_fail_the_report(tmp_path, small_base_dir):
    data = no_prompt_rows(tmp_path / "hh.jsonl")
    config = write_config(tmp_path, small_base_dir, dataset=data, subset="train", val_ratio=0.5, readiness_pairs=0)
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "Reference readiness" not in out and not (tmp_path / "out" / "readiness_margins.png").exists()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["readiness"] is None  # readiness_pairs: 0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] and s["prompt"][-1]["role"] == "user" for s in samples)
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "training_curves.png").is_file()


def test_a_failing_report_part_is_one_warning_and_the_rest_is_written(tmp_path, small_base_dir, monkeypatch,
                                                                     capsys, llama32_tokenizer):
    cfg = load_config(str(write_config(tmp_path, small_base_dir)))
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(sft_report, "plot_curves", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    monkeypatch.setattr(sft_report, "write_samples", lambda model, tok, messages, path: open(path, "w").close())
    trainer = types.SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False,
                                    accelerator=types.SimpleNamespace(unwrap_model=lambda m: m), model=None)
    metrics = {"log_history": [], "data": {"rows_read": 1, "rows_kept": 1, "dropped": {}, "truncated": 1,
                                           "tokens": 1, "assistant_tokens": 1},
               "train_conversations": 1, "eval_conversations": 1, "train_loss": 1.0, "eval_loss": 1.0,
               "eval_accuracy": 0.5, "global_step": 1, "global_batch": 4, "tokens_trained": 1, "tokens_seen": 1,
               "runtime_s": 1.0}
    sft_report.write_report(cfg, trainer, llama32_tokenizer, [], metrics)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: could not write training_curves.png (OSError: disk gone); the model is saved"]
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "samples.jsonl").is_file()
    assert "(1 row cut)" in (tmp_path / "out" / "README.md").read_text()  # not "1 rows"


def test_gathered_weights_are_cast_to_the_run_precision(tmp_path):
    weights = {"w": torch.randn(4, 4), "steps": torch.arange(3)}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "model_type": "llama"}))
    cast_saved_weights(str(tmp_path), torch.bfloat16)
    cast = load_file(tmp_path / "model.safetensors")
    assert cast["w"].dtype == torch.bfloat16 and torch.equal(cast["w"], weights["w"].to(torch.bfloat16))
    assert cast["steps"].dtype == torch.int64
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


@SEVERAL_PROCESSES
@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_fsdp_config_on_cpu_says_it_does_not_shard_and_ends_with_one_bf16_model(tmp_path, small_base_dir,
                                                                                 processes):
    """accelerate runs FSDP only on GPUs; on CPU the run must say so (not silently run DDP) and still end with
    exit 0, the report and one model in `precision`."""
    config = write_config(tmp_path, small_base_dir)
    config.write_text(config.read_text().replace("precision: fp32", "precision: bf16"))
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "accelerate_configs" / "fsdp.yaml"), "--num_processes", str(processes))
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                            launcher=launcher))
    mode = "DDP" if processes == 2 else "single process"
    assert (f"parallel: {mode}, {processes} process(es); the accelerate config asks for FSDP, which accelerate "
            "runs only on GPUs: NOT sharded") in out
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert (tmp_path / "out" / "samples.jsonl").read_text() and (tmp_path / "out" / "README.md").is_file()


def test_readiness_logging_needs_no_wandb_when_wandb_is_off(monkeypatch):
    """With `wandb_project: null` wandb need not be installed (the lent GPU machine has none): logging the
    readiness numbers after the final save must not import it (it once failed a finished H100 run there)."""
    import sft_report

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise ImportError
    sft_report.log_to_wandb({"eval/ref_pref_accuracy": 0.5}, step=3)


def test_one_extreme_margin_does_not_hide_the_others_in_the_readiness_plot(tmp_path):
    """20 margins within +-8 and one at -120 (as seen on the demo): the plotted range is set by the bulk, the
    outlier is counted, and the plot is written with a title from the run's data source."""
    import numpy as np

    margins = np.concatenate([np.linspace(-8, 8, 20), [-120.0]])
    low, high, below, above = sft_report.plot_range(margins)
    assert (below, above) == (1, 0) and -30 < low < -8 and 8 < high < 30
    assert sum(low <= m <= high for m in margins) == 20
    sft_report.plot_margins({"margins": list(margins), "margins_per_token": list(margins / 50)}, "my_data.jsonl",
                            str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 10_000


def kept_figure(monkeypatch):
    """pyplot with close() turned off: the test reads back the figure a plot function drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *a: None)
    return plt


def test_the_accuracy_axis_of_the_curves_is_the_whole_fraction(tmp_path, monkeypatch):
    plt = kept_figure(monkeypatch)
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.9, "eval_accuracy": 0.412},
               {"step": 4, "eval_loss": 1.8, "eval_accuracy": 0.421}]
    sft_report.plot_curves(history, str(tmp_path / "c.png"), "SFT of base on data -> out")
    accuracy = [ax for ax in plt.gcf().axes if ax.get_ylabel() == "next-token accuracy"]
    assert len(accuracy) == 1 and accuracy[0].get_ylim() == (0, 1)
    assert plt.gcf().axes[0].get_title() == "SFT of base on data -> out"  # names the model, not "Anthropic HH"


def test_readiness_histograms_count_whole_pairs_and_their_axes_match_the_titles(tmp_path, monkeypatch):
    import re

    import numpy as np

    plt = kept_figure(monkeypatch)
    margins = np.concatenate([np.linspace(-3, 5, 5), [-80.0]])  # few pairs, one outlier
    sft_report.plot_margins({"margins": list(margins)}, "d.jsonl", str(tmp_path / "m.png"))
    [ax] = plt.gcf().axes
    low, high, below, _ = sft_report.plot_range(margins)
    assert ax.get_xlim() == pytest.approx((low, high))
    assert f"not shown: {below} below {low:.3g}" in " ".join(ax.get_title().split())  # (wrapped to fit)
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert re.search(r"\d+ of 6 pairs > 0", ax.get_title())


def test_ctrl_c_in_the_final_save_is_one_line_naming_the_command_that_finishes_it(tmp_path, small_base_dir,
                                                                                  monkeypatch, capsys):
    import model_io
    import train_sft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io, "save_final_model", interrupted)
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--config", "c.yaml"])
    cfg = load_config(str(write_config(tmp_path, small_base_dir)))
    run = train_sft.Run(cfg=cfg, mode=train_sft.MODES["train"], overwrite=False)
    trainer = types.SimpleNamespace(state=types.SimpleNamespace(log_history=[], global_step=3),
                                    evaluate=lambda: {"eval_loss": 1.0})
    assert train_sft.finish(run, trainer, types.SimpleNamespace(tokenizer=None), start=0.0) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the final save was interrupted")
    assert "the same command finishes the run from its last checkpoint: python train_sft.py --config c.yaml" in err


@pytest.mark.parametrize(("rows", "data_max", "refused"), [(128256, 128000, False), (1000, 5000, True),
                                                       (128256, 128256, True)])  # <|image|> itself: refused
def test_a_tokenizer_longer_than_the_models_vocabulary_is_said_at_the_start(tmp_path, base_model_dir, capsys, rows,
                                                                           data_max, refused):
    """Llama-3.2-Vision's tokenizer has <|image|> (128256) past a 128,256-row table: said in one line when the data
    never uses such an id; refused before any model is loaded when it does."""
    import shutil

    from datasets import Dataset
    from transformers import AutoTokenizer

    from data_process_sft import max_token_id
    from model_io import check_vocabulary, model_vocab_size
    from sft_config import ConfigError

    model = tmp_path / "model"
    shutil.copytree(base_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = Dataset.from_dict({"input_ids": [[1, 2, data_max], [3]]})

    def check():
        return check_vocabulary("policy_name m", tokenizer, model_vocab_size(str(model)), max_token_id(data),
                                holds="the data's token ids")

    if refused:
        with pytest.raises(ConfigError, match=rf"the model {rows:,} embedding rows: ids? {rows:,}.* and the "
                                              r"data's token ids hold such ids"):
            check()
    else:
        assert check() == ("note: the tokenizer has 128,257 tokens, the model 128,256 embedding rows: "
                           "id 128,256 (<|image|> (128256)) has no row; the data's token ids hold none "
                           "of them, so they are never trained or scored")


def test_weights_in_checkpoints_and_the_final_folder_follow_the_umask(tmp_path):
    """safetensors writes 0600: colleagues on a shared folder could not read the weights."""
    import os

    from conftest import tiny_data, tiny_trainer
    from model_io import save_final_model

    previous = os.umask(0o022)
    try:
        trainer = tiny_trainer(tmp_path, steps=2, save_steps=2)
        trainer.train()
        save_final_model(trainer, tiny_data()[0], str(tmp_path / "out"), "fp32")
    finally:
        os.umask(previous)
    for path in (tmp_path / "out" / "checkpoint-2" / "model.safetensors", tmp_path / "out" / "model.safetensors",
                 tmp_path / "out" / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
