"""Your own data in TRL's formats (hh_sft_chat): `messages` conversations, conversational preference pairs (with
or without a shared prompt) and conversational prompt-completion rows train on exactly what the HH path trains on,
row for row, on the real shipped HH rows converted; bad rows are dropped with a reason named after the rule; a
dataset in no format (or two) is one line, from its first row, before torch is imported."""

import json

import pytest

import hh_sft_chat
from conftest import REAL_HH, SAMPLE, assert_ok, run_cli, run_traced, write_config
from data_process_sft import build_sft_dataset, load_raw_dataset, load_rows
from hh_sft_chat import build_dpo_dataset, parse_hh_to_messages
from sft_config import ConfigError

ROWS = 240  # of the shipped 1,500: enough shapes (empty turns, assistant-first, long), seconds to tokenize


def converted(tmp_path, fmt, rows):
    """The HH rows as a .jsonl file in `fmt`, conversation for conversation (the raw parse: trailing user turns
    and empty turns stay for the format's own rules to handle)."""
    out = []
    for row in rows:
        good, bad = parse_hh_to_messages(row["chosen"]), parse_hh_to_messages(row["rejected"])
        if fmt == "messages":
            out.append({"messages": good})
        elif fmt == "preference":
            out.append({"chosen": good, "rejected": bad})
        elif fmt == "preference_prompt":  # TRL's explicit-prompt variant: the shared turns, then one reply each
            cut = len(good) - 1 if good and good[-1]["role"] == "assistant" else len(good)
            out.append({"prompt": good[:cut], "chosen": good[cut:], "rejected": bad[cut:]})
        else:
            cut = len(good) - 1 if good and good[-1]["role"] == "assistant" else len(good)
            out.append({"prompt": good[:cut], "completion": good[cut:]})
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.fixture(scope="module")
def hh_path(llama32_tokenizer):
    raw = load_raw_dataset(str(REAL_HH), f"train[:{ROWS}]")
    return raw, build_sft_dataset(raw, llama32_tokenizer, max_length=256, return_report=True)


@pytest.mark.parametrize("fmt", ["messages", "preference", "preference_prompt", "prompt_completion"])
def test_each_format_gives_the_hh_paths_token_ids_and_labels_row_for_row(tmp_path, llama32_tokenizer, hh_path, fmt):
    raw, (want, want_report) = hh_path
    rows = load_rows(str(converted(tmp_path, fmt, raw)), "train")
    got, report = build_sft_dataset(rows, llama32_tokenizer, max_length=256, return_report=True)
    assert report.format == {"preference_prompt": "preference"}.get(fmt, fmt)
    assert got["row"] == want["row"] and len(got) > 0.9 * ROWS
    for column in ("input_ids", "labels", "messages"):
        assert got[column] == want[column], column
    assert (report.rows_kept, report.tokens, report.assistant_tokens, report.truncated) == (
        want_report.rows_kept, want_report.tokens, want_report.assistant_tokens, want_report.truncated)
    assert f"format {hh_sft_chat.NAMES[report.format]}; rows read {ROWS}" in report.summary()


@pytest.mark.parametrize("fmt", ["preference", "preference_prompt"])
def test_conversational_preference_pairs_are_the_hh_pairs(tmp_path, llama32_tokenizer, fmt):
    raw = load_raw_dataset(str(REAL_HH), f"train[:{ROWS}]")
    want = build_dpo_dataset(raw, llama32_tokenizer, max_length=256)
    got = build_dpo_dataset(load_rows(str(converted(tmp_path, fmt, raw)), "train"), llama32_tokenizer, max_length=256)
    assert len(got) > 0.8 * ROWS
    for column in ("row", "prompt", "chosen", "rejected"):
        assert got[column] == want[column], column


def test_a_system_turn_is_kept_and_never_trained(tmp_path, llama32_tokenizer):
    path = tmp_path / "system.jsonl"
    row = {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky?"},
                        {"role": "assistant", "content": "Blue."}]}
    path.write_text(json.dumps(row) + "\n")
    data = build_sft_dataset(load_rows(str(path), "train"), llama32_tokenizer, max_length=64)
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    text = llama32_tokenizer.decode(ids)
    assert "<|start_header_id|>system<|end_header_id|>\n\nAnswer in one word.<|eot_id|>" in text
    trained = llama32_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == "Blue.<|eot_id|>"


BAD = {
    "messages_not_a_list": {"messages": "Human: hi"},
    "message_without_role_or_content": {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    "unknown_role": {"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]},
    "content_not_a_string": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
}


def test_each_rule_of_the_format_drops_and_counts_its_rows(llama32_tokenizer):
    from datasets import Dataset

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, *BAD.values()]
    conversations = [hh_sft_chat.conversation("messages", row) for row in rows]
    assert [reason for _, reason in conversations] == ["", *BAD]
    # Through the dataset path too, with the rows Arrow can hold in one column (same types)
    same_types = [good, BAD["unknown_role"], BAD["no_assistant_turn"], good]
    data, report = build_sft_dataset(Dataset.from_list(same_types), llama32_tokenizer, max_length=64,
                                     return_report=True)
    assert report.dropped == {"unknown_role": 1, "no_assistant_turn": 1} and data["row"] == [0, 3]


@pytest.mark.parametrize(("rows", "said"), [
    ([{"text": "hello"}], "its columns (text) are none of the formats SFT reads. Accepted, one row each: HH text: "),
    ([{"messages": [{"role": "user", "content": "hi"}]}, {"chosen": "\n\nHuman: hi\n\nAssistant: yo"}],
     "its rows mix two formats (columns chosen, messages: 'messages' and 'chosen')"),
    ([{"prompt": "hi", "chosen": "x", "rejected": "y"}], None),
])
def test_a_dataset_in_no_format_or_two_is_one_line_naming_its_columns_and_the_formats(tmp_path, rows, said):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if said is None:  # TRL's standard (text) preference rows: `chosen` is text, read as HH and dropped row by row
        assert hh_sft_chat.peek(str(path)) == "hh"
        return
    with pytest.raises(ConfigError, match="dataset .*" + said.replace("(", r"\(").replace(")", r"\)")):
        load_rows(str(path), "train")
    for example in hh_sft_chat.EXAMPLES.values():
        assert example in hh_sft_chat.accepted()


@pytest.mark.cli
def test_an_unknown_format_is_refused_from_its_first_row_before_torch_is_imported(tmp_path, small_base_dir):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    config = write_config(tmp_path, small_base_dir, dataset=data)
    result, trace = run_traced("--config", str(config), tmp_path=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: dataset {data}: its columns (instruction, output) are none of")
    assert "torch" not in trace["imported"]


@pytest.mark.slow
def test_a_run_on_conversational_pairs_trains_and_readiness_scores_them(tmp_path, small_base_dir):
    """`dataset_name` a .jsonl of TRL's conversational preference pairs: SFT trains `chosen`, evaluates, saves,
    says the DPO stage cannot read the file as is, scores the held-out pairs; `--readiness` scores them again."""
    raw = load_raw_dataset(str(SAMPLE), "train[:64]")
    data = converted(tmp_path, "preference", [r for r in raw if isinstance(r["chosen"], str)])
    config = write_config(tmp_path, small_base_dir, dataset=data, subset="train", readiness_pairs=16)
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "data: format conversational preference (TRL); rows read" in out
    assert "note: the DPO stage (dynamic-dpo-v1) reads dataset.dataset_name with its own loader" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["readiness"]["pairs"] > 0
    again = assert_ok(run_cli("--config", str(config), "--readiness", cwd=tmp_path, warm=True))
    assert "Updated in" in again
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["readiness"]["pairs"] == \
        metrics["readiness"]["pairs"]


@pytest.mark.slow
def test_a_run_on_a_messages_file_trains_evaluates_and_saves(tmp_path, small_base_dir):
    raw = load_raw_dataset(str(SAMPLE), "train[:64]")
    data = converted(tmp_path, "messages", [r for r in raw if isinstance(r["chosen"], str)])
    config = write_config(tmp_path, small_base_dir, dataset=data, subset="train")
    out = assert_ok(run_cli("--config", str(config), cwd=tmp_path, warm=True))
    assert "data: format messages (TRL conversational); rows read" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert metrics["readiness"] is None  # no rejected replies: nothing to score, and the end says so
    assert f"Reference readiness: skipped: {data} has no preference pairs (no `rejected`); dataset.dataset_name " \
           "with HH rows or conversational preference pairs gets it scored" in out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "on the `messages` conversations of" in card  # the format trained, not "the chosen conversations"


def test_an_explicit_prompt_repeated_in_chosen_is_trained_once_and_said(tmp_path, llama32_tokenizer, hh_rows):
    """TRL rows whose `chosen`/`rejected` hold the whole conversation beside an explicit `prompt` (the prompt
    twice): the user turns are taken once, as the same rows without the repetition give, and the start says so."""
    explicit = converted(tmp_path, "preference_prompt", hh_rows[:ROWS])
    rows = [json.loads(line) for line in explicit.read_text().splitlines()]
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["prompt"] + r["chosen"],
                                            "rejected": r["prompt"] + r["rejected"]}) + "\n" for r in rows))
    once, report_once = build_sft_dataset(load_raw_dataset(str(explicit), "train"), llama32_tokenizer,
                                          max_length=512, return_report=True)
    twice, report = build_sft_dataset(load_raw_dataset(str(repeated), "train"), llama32_tokenizer, max_length=512,
                                      return_report=True)
    assert twice["input_ids"] == once["input_ids"] and twice["labels"] == once["labels"]
    assert report_once.prompt_repeated == 0 and report.prompt_repeated == report.rows_kept > 0
    assert (f"{report.rows_kept} rows repeat their prompt at the start of the reply side: the prompt is taken once"
            in report.summary())
    pairs = build_dpo_dataset(load_raw_dataset(str(repeated), "train"))
    assert pairs["prompt"] == build_dpo_dataset(load_raw_dataset(str(explicit), "train"))["prompt"]


def test_an_empty_split_is_one_line():
    with pytest.raises(ConfigError) as refused:
        load_rows(str(SAMPLE), "train[50%:10%]")
    assert str(refused.value) == (f"dataset {SAMPLE}: the split 'train[50%:10%]' selects no rows; set dataset.subset "
                                  "to a non-empty split, e.g. train[:100%]")


@pytest.mark.parametrize(("fmt", "row", "repeated"), [
    ("prompt_completion", {"prompt": [{"role": "user", "content": "Q"}],
                           "completion": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     True),
    ("prompt_completion", {"prompt": [{"role": "user", "content": "Q"}],
                           "completion": [{"role": "assistant", "content": "A"}]}, False),
    ("preference", {"prompt": [{"role": "user", "content": "Q"}],
                    "chosen": [{"role": "user", "content": " Q "}, {"role": "assistant", "content": "A"}]}, True),
    ("preference", {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, False),
    ("messages", {"prompt": [{"role": "user", "content": "Q"}], "messages": [{"role": "user", "content": "Q"}]},
     False),
    ("hh", {"chosen": "\n\nHuman: Q\n\nAssistant: A"}, False)])
def test_prompt_repeated_is_an_explicit_prompt_at_the_start_of_the_reply_side(fmt, row, repeated):
    from hh_sft_chat import prompt_repeated

    assert prompt_repeated(fmt, row) is repeated


@pytest.mark.parametrize(("message", "reason"), [
    ({"content": "x"}, "message_without_role_or_content"), ({"role": "user"}, "message_without_role_or_content"),
    ("user: x", "message_without_role_or_content"), ({"role": "tool", "content": "x"}, "unknown_role"),
    ({"role": "user", "content": ["x"]}, "content_not_a_string")])
def test_a_malformed_message_drops_its_row_under_its_reason(message, reason):
    from hh_sft_chat import conversation

    assert conversation("messages", {"messages": [message, {"role": "assistant", "content": "A"}]}) == ([], reason)


def test_content_token_ids_leave_the_tokenizer_reading_control_tokens_again(llama32_tokenizer):
    from hh_sft_chat import content_token_ids

    eot = llama32_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    [literal] = content_token_ids(llama32_tokenizer, [" <|eot_id|> "])
    assert eot not in literal and len(literal) > 1  # the text, stripped
    assert llama32_tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"] == [eot]  # and after it, control
    assert not llama32_tokenizer.backend_tokenizer.encode_special_tokens  # for a direct user of the Rust tokenizer


def test_hh_rows_never_count_as_repeating_a_prompt(hh_rows):
    from datasets import Dataset

    from hh_sft_chat import prompts_repeated

    batch = Dataset.from_list(hh_rows[:8])[:]
    assert prompts_repeated(batch) == [False] * 8
    assert prompts_repeated({"messages": [[{"role": "user", "content": "Q"}]] * 3}) == [False] * 3


@pytest.mark.parametrize(("name", "kind"), [("rows.jsonl", "json"), ("rows.json.gz", "json"), ("r.parquet", "parquet"),
                                            ("rows.csv", None), ("folder", None)])
def test_a_data_file_kind_comes_from_its_suffix_or_is_none(name, kind):
    assert hh_sft_chat.data_file_kind(name) == kind


@pytest.mark.parametrize(("columns", "said"), [(["text", "id"], "its columns (id, text) are none of the formats"),
                                               ([], "its columns (none) are none of the formats")])
def test_columns_in_no_format_are_named_sorted(columns, said):
    with pytest.raises(hh_sft_chat.FormatError) as refused:
        hh_sft_chat.detect(columns)
    assert str(refused.value).startswith(said + " SFT reads. ")
