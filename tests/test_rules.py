"""The small rules a held-out mutation audit (round four) found unpinned: each test fails when its rule breaks, on the
real Llama-3 tokenizers and the shipped HH rows where the rule is about them."""

import json
import os
import types

import pytest

import hh_sft_chat as chat
from conftest import REPO, run_traced, write_config
from sft_config import ConfigError, load_config


def test_max_steps_zero_is_refused_not_a_full_run():
    with pytest.raises(ConfigError, match=r"^sft_training\.max_steps: must be at least 1, got 0$"):
        load_config(str(REPO / "config_dpo.yaml"), ["sft_training.max_steps=0"])


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_padding_free_keeps_a_configured_flash_attention(kernel):
    from sft_trainer import attention_implementation

    t = types.SimpleNamespace(padding_free=True, attn_implementation=kernel)
    assert attention_implementation(t) == (kernel, f"padding_free: one row per step, attention through {kernel}")


def test_a_tokenizer_as_long_as_the_table_has_no_gap_and_one_more_token_has(llama30_dir, llama32_tokenizer):
    """Llama-3's tokenizer (128,256 tokens) on its 128,256-row table: no note; the shipped Llama-3.2 tokenizer with
    <|image|> (id 128,256, from Llama-3.2-Vision) on the same table: that id is named."""
    from conftest import base_tokenizer
    from model_io import vocabulary_gap

    standard = base_tokenizer(llama30_dir)
    assert len(standard) == 128256 and vocabulary_gap(standard, 128256) is None
    assert len(llama32_tokenizer) == 128257
    assert vocabulary_gap(llama32_tokenizer, 128256) == ("the tokenizer has 128,257 tokens, the model 128,256 "
                                                         "embedding rows: id 128,256 (<|image|> (128256)) has no row")
    assert vocabulary_gap(llama32_tokenizer, 128254) == (  # three ids, each named
        "the tokenizer has 128,257 tokens, the model 128,254 embedding rows: ids 128,254..128,256 "
        "(<|reserved_special_token_245|> (128254), <|reserved_special_token_246|> (128255), <|image|> (128256)) "
        "have no row")
    assert vocabulary_gap(llama32_tokenizer, 128253).endswith("(128255), ...) have no row")  # the first three named


def test_trailing_user_turns_are_all_dropped_and_such_a_pair_is_kept(hh_rows):
    """A conversation that ends in two user turns trains up to its last assistant turn; a preference pair whose
    sides end so is a pair on that turn (not dropped)."""
    from datasets import Dataset

    turns = chat.parse_hh_to_messages(next(r["chosen"] for r in hh_rows if r["chosen"].count("Assistant:") == 1))
    extra = [{"role": "user", "content": "one more"}, {"role": "user", "content": "and another"}]
    messages, reason = chat.conversation("messages", {"messages": turns + extra})
    assert (messages, reason) == (turns, "")
    rejected = turns[:-1] + [{"role": "assistant", "content": "No."}]
    pairs = chat.build_dpo_dataset(Dataset.from_list([{"chosen": turns + extra, "rejected": rejected + extra}]))
    assert len(pairs) == 1 and pairs[0]["chosen"] == turns[-1:] and pairs[0]["rejected"] == rejected[-1:]


def test_completion_without_a_prompt_is_no_format():
    with pytest.raises(chat.FormatError, match=r"its columns \(completion\) are none of the formats SFT reads"):
        chat.detect(["completion"])


@pytest.mark.parametrize("name", ["adamw_bnb_8bit", "rmsprop_bnb", "paged_adamw_8bit", "adamw_8bit", "lion_8bit"])
def test_bitsandbytes_optimizers_need_bitsandbytes(name):
    from run_env import optimizer_package

    assert optimizer_package(name) == ("bitsandbytes", "bitsandbytes")
    assert optimizer_package("adamw_torch_fused") is None


@pytest.mark.cli
def test_a_local_folder_in_no_format_is_refused_before_torch(tmp_path, small_base_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    config = write_config(tmp_path, small_base_dir, dataset=folder)
    result, trace = run_traced("--config", str(config), tmp_path=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: dataset {folder}: its columns (instruction, "
                                                                "output) are none of the formats SFT reads")
    assert "torch" not in trace["imported"]


def test_a_broken_rejected_side_is_dropped_under_its_own_reason():
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]
    assert chat.preference_pair({"chosen": good, "rejected": bad})[2] == "unknown_role"
    assert chat.preference_pair({"chosen": good, "rejected": "text"})[2] == "messages_not_a_list"


def test_a_record_of_version_zero_is_refused(tmp_path):
    import handoff_record
    from dpo_handoff import SCOPE

    (tmp_path / handoff_record.RECORD).write_text(json.dumps(
        {"tool": handoff_record.TOOL, "version": 0, "state": "installed", "files": {}}))
    with pytest.raises(handoff_record.RecordError, match="version 0; this tool reads version 1"):
        handoff_record.read_record(tmp_path, SCOPE)


def test_a_link_at_a_temporary_path_survives_an_uninstall_without_a_record(tmp_path):
    """remove_leftovers deletes only regular files of ours: a link (and what it points to) stays."""
    import dpo_handoff
    from test_dpo_handoff import make_repo

    repo = make_repo(tmp_path)
    target = tmp_path / "precious"
    target.write_text("keep")
    link = repo / ".training.py.hh-sft-tmp"
    link.symlink_to(target)
    assert dpo_handoff.uninstall(repo) == 0
    assert os.path.islink(link) and target.read_text() == "keep"


def test_the_curves_draw_a_short_last_interval_apart_on_whole_steps(tmp_path, monkeypatch):
    """A run whose last log covers fewer steps (a short final batch, say) draws that point apart and says so; step
    ticks are whole numbers (a 3-step run once showed 1.5, 2.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sft_report

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig: None)
    history = [{"step": s, "loss": 2.0} for s in (10, 20, 30)] + [{"step": 33, "loss": 9.0}]
    sft_report.plot_curves(history, str(tmp_path / "c.png"), "t")
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train loss"].get_xdata()) == [10, 20, 30]
    assert list(lines["train loss of the last 3 steps (a shorter interval)"].get_xdata()) == [30, 33]
    assert ax.xaxis.get_major_locator()._integer
    sft_report.plot_curves(history[:3], str(tmp_path / "d.png"), "t")  # even intervals: one line, nothing apart
    assert [line.get_label() for line in figures[1].axes[0].get_lines()] == ["train loss"]


def test_inspect_takes_the_same_overrides_as_a_run(tmp_path, small_base_dir, capsys):
    import data_process_sft

    config = write_config(tmp_path, small_base_dir, max_length=64)
    assert data_process_sft.inspect(str(config), 1, ["sft_training.max_length=32"]) == 0
    out = capsys.readouterr().out
    assert "max_length 32 ===" in out and "token length percentiles: {'p50': 32" in out
    assert data_process_sft.inspect(str(config), 1, ["sft_training.max_lenght=32"]) == 2
    assert "unknown key 'max_lenght' in 'sft_training' (did you mean 'max_length'?)" in capsys.readouterr().err


def test_the_readiness_report_on_few_pairs_says_it_is_too_few_and_how_many_were_left_out():
    from sft_readiness import summary_lines

    report = {"pairs": 2, "pairs_over_max_length": 4, "seconds": 1.0, "sft_chosen_logp": -1.0,
              "base_chosen_logp": -2.0, "chosen_raised_share": 1.0, "sft_rejected_logp": -1.5,
              "base_rejected_logp": -2.5, "pref_accuracy": 0.5, "pref_accuracy_per_token": 0.5, "margin_std": 0.1,
              "margin_percentiles": {"p5": 0.0, "p50": 0.1, "p95": 0.2}}
    lines = summary_lines(report, max_length=64)
    assert lines[0] == ("  too few to read: 2 pairs (under 50, one pair moves a share by over 2%); 4 more were "
                        "left out because a side is over max_length 64; more held-out preference rows (a larger "
                        "val_ratio or dataset) give a readable report")
    assert not any("too few" in line for line in summary_lines({**report, "pairs": 50}, max_length=64))


def test_the_start_summary_names_the_optimizer_as_written_and_constants_missing_warmup():
    from sft_report import warmup_words

    t = types.SimpleNamespace(lr_scheduler_type="constant")
    assert warmup_words(t, types.SimpleNamespace(warmup_steps=5)) == (
        "no warmup: constant ignores warmup_steps 5, constant_with_warmup uses them")
    t.lr_scheduler_type = "constant_with_warmup"
    assert warmup_words(t, types.SimpleNamespace(warmup_steps=5)) == "warmup 5 steps"
    golden = (REPO / "tests" / "golden" / "start_summary_default.txt").read_text()
    assert "adamw_torch_fused)" in golden and "OptimizerNames" not in golden
