"""Loading HH rows from local files, and the build report on the shipped sample."""

import functools
import gzip
import json

import pytest
from datasets import Dataset

from conftest import SAMPLE
from data_process_sft import build_sft_dataset, load_raw_dataset
from hh_sft_chat import hh_to_sft_messages

ROWS = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]


def write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    else:
        Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "parquet"])
def test_local_files_load(tmp_path, fmt):
    ds = load_raw_dataset(str(write(tmp_path / f"hh.{fmt}", fmt)), "train")
    assert ds["chosen"] == [r["chosen"] for r in ROWS]


def test_folder_of_files_and_split_expression(tmp_path):
    write(tmp_path / "a.jsonl", "jsonl")
    write(tmp_path / "b.jsonl", "jsonl")
    assert len(load_raw_dataset(str(tmp_path), "train")) == 4
    assert len(load_raw_dataset(str(tmp_path), "train[:3]")) == 3


def test_mixed_or_unknown_files_are_an_error(tmp_path):
    write(tmp_path / "a.jsonl", "jsonl")
    write(tmp_path / "b.parquet", "parquet")
    with pytest.raises(ValueError, match="of one kind"):
        load_raw_dataset(str(tmp_path), "train")


def test_sample_report_counts_every_drop_reason(llama32_tokenizer):
    raw = load_raw_dataset(str(SAMPLE), "train")
    data, report = build_sft_dataset(raw, llama32_tokenizer, max_length=128, num_proc=2, return_report=True)
    assert report.rows_read == len(raw) == report.rows_kept + sum(report.dropped.values())
    assert report.dropped == {"chosen_not_a_string": 1, "no_assistant_turn": 1}
    assert len(data) == report.rows_kept
    assert set(data.column_names) == {"messages", "row", "input_ids", "labels", "length", "num_trained"}
    rows = data["row"]
    assert rows == sorted(set(rows)) and len(rows) == len(raw) - 2  # the two dropped rows are missing
    assert all(hh_to_sft_messages(raw[r]["chosen"])[0] == m for r, m in zip(rows, data["messages"]))
    assert max(len(ids) for ids in data["input_ids"]) <= 128
    assert report.assistant_tokens == sum(sum(x != -100 for x in lab) for lab in data["labels"])
    full = build_sft_dataset(raw, llama32_tokenizer, max_length=100_000)
    assert report.truncated == sum(n > 128 for n in full["length"]) > 0
    turns = [sum(m["role"] == "assistant" for m in conv) for conv in data["messages"]]
    assert report.assistant_turns_mean == round(sum(turns) / len(turns), 2)
    assistant_first = Dataset.from_list([{"chosen": "\n\nHuman: \n\nAssistant: a\n\nHuman: b\n\nAssistant: c"}])
    _, first = build_sft_dataset(assistant_first, llama32_tokenizer, max_length=128, return_report=True)
    assert first.assistant_turns_mean == 2  # assistant, user, assistant
    _, short = build_sft_dataset(raw, llama32_tokenizer, max_length=24, return_report=True)
    assert short.dropped["reply_truncated_away"] > 0
    assert short.rows_kept + sum(short.dropped.values()) == len(raw)


def test_without_a_tokenizer_only_messages_are_built():
    data, report = build_sft_dataset(Dataset.from_list(ROWS + [{"chosen": None, "rejected": None}]),
                                     return_report=True)
    assert data.column_names == ["messages", "row"] and report.dropped == {"chosen_not_a_string": 1}
    assert data["row"] == list(range(len(ROWS)))  # the dropped row was the last one


def test_second_build_of_the_same_file_reuses_the_cache(tmp_path, llama32_tokenizer, monkeypatch):
    """A second run with the same data and settings skips tokenization (datasets' fingerprint cache)."""
    import datasets

    path = write(tmp_path / "hh.jsonl", "jsonl")
    calls = []
    original = datasets.Dataset._map_single

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(1)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "_map_single", staticmethod(counted))
    first = build_sft_dataset(load_raw_dataset(str(path), "train"), llama32_tokenizer, max_length=64)
    assert calls
    calls.clear()
    second = build_sft_dataset(load_raw_dataset(str(path), "train"), llama32_tokenizer, max_length=64)
    assert not calls and second["input_ids"] == first["input_ids"]
    build_sft_dataset(load_raw_dataset(str(path), "train"), llama32_tokenizer, max_length=32)
    assert calls  # another max_length is another cache entry
    calls.clear()
    import data_process_sft

    monkeypatch.setattr(data_process_sft, "SOURCE_HASH", "changed-code")  # the preprocessing code changed
    build_sft_dataset(load_raw_dataset(str(path), "train"), llama32_tokenizer, max_length=64)
    assert calls  # not served from the old code's cache
