"""Several datasets in one run (sft_training.datasets): each source read and reported on its own, its fraction of
rows drawn with the run's seed, the sources mixed; dataset.dataset_name stays what the readiness report scores; a
bad entry is one line before torch."""

import json

import numpy as np
import pytest
import yaml

from conftest import REAL_HH, assert_ok, run_cli, run_traced, write_config
from data_process_sft import build_sft_mixture, load_raw_dataset
from sft_config import load_config
from test_formats import converted


def with_sources(config, sources, **dataset):
    raw = yaml.safe_load(config.read_text())
    raw["sft_training"]["datasets"] = sources
    raw["dataset"].update(dataset)
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.fixture
def hh_and_messages(tmp_path):
    """The first 96 shipped HH rows, and the same rows as a `messages` .jsonl."""
    hh = tmp_path / "hh.jsonl"
    rows = list(load_raw_dataset(str(REAL_HH), "train[:96]"))
    hh.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hh, converted(tmp_path, "messages", rows)


@pytest.mark.slow
def test_a_mixture_trains_on_both_sources_and_reports_each_while_readiness_scores_the_dpo_data(
        tmp_path, small_base_dir, hh_and_messages):
    hh, messages = hh_and_messages
    config = with_sources(write_config(tmp_path, small_base_dir, readiness_pairs=16, max_length=128),
                          [{"dataset_name": str(hh), "subset": "train"},
                           {"dataset_name": str(messages), "subset": "train"}], dataset_name=str(hh), subset="train")
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert f"    source 0: {hh} [train]: format HH text; rows read 96" in out
    assert f"    source 1: {messages} [train]: format messages (TRL conversational); rows read 96" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    first, second = metrics["sources"]
    assert first["rows_kept"] == second["rows_kept"] > 80  # the same conversations, twice
    (tmp_path / "one").mkdir()
    single = build_sft_mixture(load_config(str(write_config(tmp_path / "one", small_base_dir, max_length=128)))
                               .replace(datasets=[{"dataset_name": str(hh), "subset": "train"}]),
                               *tokenizer_and_collator(small_base_dir))[1]
    assert metrics["data"]["tokens"] == 2 * single.tokens  # the token count of both sources
    assert metrics["train_conversations"] + metrics["eval_conversations"] == 2 * first["rows_kept"]
    assert metrics["readiness"]["pairs"] > 0  # dataset.dataset_name's held-out pairs
    card = (tmp_path / "out" / "README.md").read_text()
    assert "a mixture of 2 datasets (listed under Data)" in card and f"`{messages}` (`train`)" in card


def tokenizer_and_collator(base):
    from data_process_sft import CompletionOnlyCollator, load_tokenizer
    from model_io import prepare_tokenizer

    tokenizer = prepare_tokenizer(load_tokenizer(str(base)))
    return tokenizer, CompletionOnlyCollator(tokenizer)


def test_a_fraction_takes_that_share_of_a_sources_rows_the_same_ones_for_the_same_seed(tmp_path, small_base_dir,
                                                                                       hh_and_messages):
    hh, _ = hh_and_messages
    cfg = load_config(str(write_config(tmp_path, small_base_dir, max_length=128)))
    tokenizer, collator = tokenizer_and_collator(small_base_dir)

    def taken(seed, fraction=0.5):
        mixed = cfg.replace(seed=seed, datasets=[{"dataset_name": str(hh), "subset": "train", "fraction": fraction}])
        _, _, (source,) = build_sft_mixture(mixed, tokenizer, collator)
        return source.rows

    half = taken(1)
    assert len(half) == 48 and len(set(half)) == 48 and set(half) <= set(range(96))
    assert np.array_equal(taken(1), half) and not np.array_equal(taken(2), half)
    assert len(taken(1, fraction=1.0)) == 96


@pytest.mark.cli
@pytest.mark.parametrize(("sources", "said"), [
    ([], "sft_training.datasets: must have at least 1 item(s), got []"),
    ([{"dataset_name": "HH", "fracton": 0.5}], "unknown key 'fracton' in 'sft_training.datasets.0' (did you mean "
                                              "'fraction'?)"),
    ([{"dataset_name": "HH", "fraction": 0}], "sft_training.datasets.0.fraction: must be greater than 0, got 0"),
    ([{"dataset_name": "HH", "fraction": 1.5}], "sft_training.datasets.0.fraction: must be at most 1, got 1.5"),
    ([{"subset": "train"}], "missing required key 'dataset_name' in 'sft_training.datasets.0'"),
    ([{"dataset_name": "HH"}, {"dataset_name": "missing.jsonl"}],
     "sft_training.datasets.1.dataset_name: no such file or folder: missing.jsonl")])
def test_a_bad_entry_is_one_line_naming_it_before_torch(tmp_path, small_base_dir, hh_and_messages, sources, said):
    hh, _ = hh_and_messages
    sources = [{**s, "dataset_name": str(hh)} if s.get("dataset_name") == "HH" else s for s in sources]
    config = with_sources(write_config(tmp_path, small_base_dir), sources)
    result, trace = run_traced("--config", str(config), tmp_path=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == f"error: {said}\n"
    assert "torch" not in trace["imported"]


def test_a_source_that_yields_no_rows_is_one_line_naming_it(tmp_path, small_base_dir):
    from sft_config import ConfigError

    empty = tmp_path / "assistant-less.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cfg = load_config(str(write_config(tmp_path, small_base_dir))).replace(
        datasets=[{"dataset_name": str(empty), "subset": "train"}])
    with pytest.raises(ConfigError, match=rf"^sft_training\.datasets\.0 \({empty} \[train\]\): no usable rows \("):
        build_sft_mixture(cfg, *tokenizer_and_collator(small_base_dir))


def test_the_dpo_data_is_the_source_it_names_or_its_own_rows_when_it_is_not_trained_on(tmp_path, hh_and_messages):
    from data_process_sft import Source, dpo_rows

    hh, messages = hh_and_messages
    cfg = load_config(str(write_config(tmp_path, "base", dataset=hh, subset="train[:8]")))
    sources = [Source(str(messages), "train[:8]", 1.0, None, np.arange(8), "messages rows"),
               Source(str(hh), "train[:8]", 1.0, None, np.arange(8), "hh rows")]
    assert dpo_rows(cfg, sources) == ("hh rows", 1)
    other_split = [Source(str(hh), "train", 1.0, None, np.arange(8), "all hh rows")]  # same file, another subset
    raw, which = dpo_rows(cfg, other_split)
    assert which is None and raw["chosen"] == load_raw_dataset(str(hh), "train[:8]")["chosen"]


def test_held_out_rows_are_the_dpo_sources_eval_rows_or_all_rows_when_not_trained_on():
    from data_process_sft import held_out_rows

    eval_split = {"row": [5, 2, 7, 1, 3], "source": [1, 0, 1, 0, 1]}
    assert held_out_rows(eval_split, 10, 1) == [5, 7, 3]
    assert held_out_rows(eval_split, 10, 0) == [2, 1]
    assert held_out_rows(eval_split, 4, None) == [0, 1, 2, 3]


@pytest.mark.parametrize(("rows", "val_ratio", "said"), [
    (1, 0.1, "fewer than 2 usable rows in DATA (the summary)"),
    (0, 0.1, "fewer than 2 usable rows in DATA (the summary)"),
    (10, 0.95, "dataset.val_ratio: 0.95 of 10 usable rows gives 0 train and 10 eval conversations; both need at "
               "least 1: lower val_ratio or use more rows"),
    (10, 0.0, "dataset.val_ratio: 0.0 of 10 usable rows gives 10 train and 0 eval conversations")])
def test_a_split_that_leaves_a_side_empty_is_one_line_with_its_counts(rows, val_ratio, said):
    from types import SimpleNamespace

    from data_process_sft import check_split_sizes
    from sft_config import ConfigError

    cfg = SimpleNamespace(dataset=SimpleNamespace(dataset_name="DATA", val_ratio=val_ratio))
    report = SimpleNamespace(summary=lambda: "the summary")
    with pytest.raises(ConfigError) as refused:
        check_split_sizes(cfg, rows, report)
    assert str(refused.value).startswith(said)


@pytest.mark.parametrize(("rows", "val_ratio"), [(2, 0.5), (10, 0.1), (10, 0.9), (3, 0.01)])
def test_a_split_with_a_row_on_each_side_passes(rows, val_ratio):
    from types import SimpleNamespace

    from data_process_sft import check_split_sizes

    check_split_sizes(SimpleNamespace(dataset=SimpleNamespace(dataset_name="D", val_ratio=val_ratio)), rows, None)


def test_the_mixtures_report_adds_each_sources_counts_and_weights_its_means():
    from hh_sft_chat import DataReport, merge_reports

    hh = DataReport(format="hh", rows_read=10, rows_kept=8, dropped={"empty_reply": 2}, tokens=100,
                    assistant_tokens=40, truncated=1, assistant_turns_mean=1.5, prompt_repeated=1)
    messages = DataReport(format="messages", rows_read=5, rows_kept=3, dropped={"empty_reply": 1, "not_text": 1},
                          tokens=50, assistant_tokens=30, truncated=2, assistant_turns_mean=2.0, prompt_repeated=4)
    merged = merge_reports([hh, messages], np.arange(1, 101))
    assert merged == DataReport(format="mixture", rows_read=15, rows_kept=11,
                                dropped={"empty_reply": 3, "not_text": 1}, tokens=150, assistant_tokens=70,
                                truncated=3, length_percentiles={"p50": 50, "p90": 90, "p99": 99},
                                assistant_turns_mean=1.64, prompt_repeated=5)  # (1.5 * 8 + 2 * 3) / 11, 2 places
    assert merge_reports([hh, hh], np.array([7])).format == "hh"  # one format: its name, not "mixture"
    empty = merge_reports([DataReport(format="hh", rows_read=3, dropped={"empty_reply": 3})], [])
    assert (empty.rows_kept, empty.assistant_turns_mean, empty.length_percentiles) == (0, 0.0, {})


def test_a_mixture_keeps_each_sources_name_rows_and_fraction_and_mixes_them_in_the_seeds_order(
        tmp_path, small_base_dir, hh_and_messages):
    hh, messages = hh_and_messages
    plain = load_config(str(write_config(tmp_path, small_base_dir, max_length=128, dataset=hh, subset="train[:90]")))
    tokenizer, collator = tokenizer_and_collator(small_base_dir)
    cfg = plain.replace(seed=3, datasets=[{"dataset_name": str(hh), "subset": "train", "fraction": 0.25},
                                          {"dataset_name": str(messages), "subset": "train"}])
    data, report, (first, second) = build_sft_mixture(cfg, tokenizer, collator)
    again, _, _ = build_sft_mixture(cfg, tokenizer, collator)
    assert (data["source"], data["row"]) == (again["source"], again["row"])  # the same seed, the same order
    assert data["source"] != sorted(data["source"])  # mixed, not one source after the other
    assert (first.dataset_name, first.subset, first.fraction, len(first.raw)) == (str(hh), "train", 0.25, 96)
    assert (second.dataset_name, second.subset, second.fraction, len(second.raw)) == (str(messages), "train", 1.0, 96)
    assert len(first.rows) == 24 and {r for r, s in zip(data["row"], data["source"]) if s == 0} <= set(first.rows)
    assert report.format == "mixture" and report.rows_read == 24 + 96
    tiny = cfg.replace(datasets=[{"dataset_name": str(hh), "subset": "train", "fraction": 0.001}])
    assert len(build_sft_mixture(tiny, tokenizer, collator)[2][0].rows) == 1  # never an empty source
    sliced = build_sft_mixture(cfg, tokenizer, collator, slice_rows=5)[2]
    assert [len(s.rows) for s in sliced] == [5, 5]

    alone, _, (source,) = build_sft_mixture(plain, tokenizer, collator)  # no sft_training.datasets: the dataset
    assert (source.dataset_name, source.subset, len(source.raw)) == (str(hh), "train[:90]", 90)
    assert alone["row"] == sorted(alone["row"]) and set(alone["source"]) == {0}  # in its own order
