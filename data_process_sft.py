"""Anthropic HH text (or TRL's conversational formats, see data_formats) -> chat messages -> Llama-3 token ids with
assistant-only labels.

The pieces, in the order the training script uses them:
  parse_hh_to_messages  one HH string ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> [{"role", "content"}, ...]
  load_raw_dataset      a Hub id or a local .jsonl/.jsonl.gz/.json/.parquet file or folder -> Dataset
  load_rows, load_tokenizer   the same with every failure as one ConfigError line (training, --inspect)
  build_sft_dataset     rows -> `messages` (+ `input_ids`, `labels`, `length`, `num_trained` with a tokenizer)
  CompletionOnlyCollator  pads a batch and puts labels on every assistant turn and nothing else
  build_dpo_dataset     HH preference rows -> prompt/chosen/rejected rows for TRL's DPOTrainer (0.26 and 1.x)
  python data_process_sft.py --config config_dpo.yaml --inspect -n 3   the data as the model will see it
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

import data_formats
from model_io import prepare_tokenizer
from run_env import check_before_loading, loading
from sft_config import ConfigError, load_config

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SOURCE_HASH = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:16]  # see _convert_batch
LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_END_OF_TURN = "<|eot_id|>"

# A role tag opens a turn at the start of the text or after a blank line; "Human:" anywhere else is text.
_HH_TAG = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_to_messages(text: str) -> list[dict[str, str]]:
    """Parse one HH conversation into alternating user/assistant messages.

    CRLF is normalised, contents are stripped, empty turns are dropped and consecutive turns of the same
    role are merged with a blank line, so roles always alternate. Text before the first tag has no
    speaker and is dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"HH text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = _HH_TAG.split(text)  # [preamble, tag, content, tag, content, ...]
    messages: list[dict[str, str]] = []
    for tag, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[tag], content.strip()
        if not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def hh_to_sft_messages(chosen) -> tuple[list[dict[str, str]], str]:
    """Messages to train on from one HH `chosen` field, and why the row is dropped ("" when kept)."""
    if not isinstance(chosen, str):
        return [], "chosen_not_a_string"
    messages = parse_hh_to_messages(chosen)
    while messages and messages[-1]["role"] == "user":  # nothing to learn from a question left unanswered
        messages.pop()
    if not messages:
        return [], "no_assistant_turn"
    return messages, ""


def load_raw_dataset(name: str, split: str):
    """Load HH rows from a Hub id or a local file/folder (.jsonl, .jsonl.gz, .json, .parquet)."""
    from datasets import load_dataset

    if not os.path.exists(name):
        return load_dataset(name, split=split)
    files = [name] if os.path.isfile(name) else sorted(
        os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs if _data_format(f)
    )
    formats = {_data_format(f) for f in files}
    if not files or None in formats or len(formats) > 1:
        raise ValueError(f"{name}: expected .jsonl, .jsonl.gz, .json or .parquet files of one kind")
    for path in files:
        if path.endswith((".jsonl", ".jsonl.gz")):
            check_jsonl(path)
    return load_dataset(formats.pop(), data_files=files, split=split)


def check_jsonl(path: str) -> None:
    """Raise ValueError naming the file, line and byte offset of the first line that is not UTF-8 JSON.
    The `datasets` JSON reader reports these as a position inside one of its chunks, without the line."""
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"line {number} of {path} is not UTF-8 (byte offset {offset + e.start})") from None
            if text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {number} of {path} is not valid JSON ({_json_problem(text, e)})") from None
            offset += len(line)


def _json_problem(text: str, error: json.JSONDecodeError) -> str:
    """What a bad JSONL line holds, in words: the decoder's message names a character, not the problem."""
    body = text.rstrip("\r\n")
    if not body.lstrip().startswith("{"):
        return f"not a JSON object: it starts {body.lstrip()[:24]!r}"
    if error.msg.startswith("Unterminated string") or error.pos >= len(body.rstrip()):
        return f"cut off: it ends inside a value after {len(body)} characters"
    if error.msg.startswith("Invalid control character"):
        return f"a raw control character {body[error.pos]!r} inside a string, column {error.colno}"
    return f"{error.msg}, column {error.colno}"


def load_rows(name: str, split: str):
    """Rows for training or --inspect: any load failure, or rows in none of the formats SFT reads
    (data_formats), is one ConfigError line."""
    with loading("dataset", name):
        rows = load_raw_dataset(name, split)
    if not len(rows):  # (every later stage would fail on a table with no columns)
        raise ConfigError(f"dataset {name}: the split {split!r} selects no rows; set dataset.subset to a non-empty "
                          "split, e.g. train[:100%]")
    try:
        data_formats.detect(rows.column_names, rows[0] if len(rows) else None)
    except data_formats.FormatError as e:
        raise ConfigError(f"dataset {name}: {e}") from None
    return rows


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    with loading("tokenizer", name):
        return AutoTokenizer.from_pretrained(name)


def _data_format(path: str) -> str | None:
    for suffix, fmt in ((".jsonl", "json"), (".jsonl.gz", "json"), (".json", "json"), (".json.gz", "json"),
                        (".parquet", "parquet")):
        if path.endswith(suffix):
            return fmt
    return None


def read_columns(ds, *names: str) -> dict[str, np.ndarray]:
    """Whole columns of a (possibly split or shuffled) dataset as numpy arrays: ~4x faster than iterating
    `ds[name]` row by row (measured on 135k rows: 1.3 s vs 5.0 s)."""
    return ds.select_columns(list(names)).with_format("numpy")[:]


def token_digest(ds) -> str:
    """sha256 of a tokenized dataset's `input_ids` in row order (one Arrow take, then the flat buffers: ~0.1 s
    per 100k rows): a resume checks that the data, and so the train/eval split, is the same."""
    column = ds.with_format("arrow")[:]["input_ids"].combine_chunks()
    offsets = np.asarray(column.offsets)
    digest = hashlib.sha256((offsets - offsets[0]).tobytes())
    digest.update(np.asarray(column.flatten()).tobytes())
    return digest.hexdigest()


@dataclass
class DataReport:
    """What happened to the rows: read, kept, dropped by reason; token counts when tokenized."""

    format: str = "hh"  # data_formats.detect
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    assistant_tokens: int = 0
    truncated: int = 0  # rows cut to max_length (kept: some assistant tokens remain)
    length_percentiles: dict[str, int] = field(default_factory=dict)
    assistant_turns_mean: float = 0.0
    prompt_repeated: int = 0  # kept rows whose reply side repeated the explicit prompt: taken once

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        line = (f"format {data_formats.NAMES[self.format]}; rows read {self.rows_read}, kept {self.rows_kept}, "
                f"dropped: {drops}")
        if self.tokens:
            line += (f"; tokens {self.tokens}, trained (assistant) tokens {self.assistant_tokens} "
                     f"({self.assistant_tokens / self.tokens:.0%}), rows cut to max_length {self.truncated}")
        if self.prompt_repeated:
            line += (f"; {self.prompt_repeated} rows repeat their prompt at the start of the reply side: the prompt "
                     "is taken once")
        return line


def build_sft_dataset(ds, tokenizer=None, *, max_length: int | None = None, num_proc: int | None = None,
                      collator: CompletionOnlyCollator | None = None, return_report: bool = False):
    """Rows of any format data_formats reads (HH text in `chosen`, `messages`, conversational preference or
    prompt-completion) -> `messages` and `row` (the index of the source row, so the eval split can be found among
    the preference pairs); with a tokenizer also `input_ids`, `labels`, `length` and `num_trained` (assistant
    tokens per row).

    Drops rows that break their format's rules (an HH `chosen` that is not a string, an unknown role, ...) or have
    no assistant turn, trailing user turns, and (with a tokenizer and `max_length`) rows whose every assistant
    token was cut away by truncation, so no batch trains on nothing. Logs a report of what was dropped and why, or
    with `return_report=True` returns it.
    """
    if tokenizer is not None and collator is None:
        collator = CompletionOnlyCollator(tokenizer)
    fmt = _format(ds)
    mapped = ds.map(
        _convert_batch,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "collator": collator, "code": SOURCE_HASH},
        desc=("Parsing HH" if fmt == "hh" else "Reading conversations") + (" and tokenizing" if tokenizer else ""),
    )
    return _keep_and_report(mapped, tokenized=tokenizer is not None, return_report=return_report, what="SFT",
                            fmt=fmt)


def _format(ds) -> str:
    return data_formats.detect(ds.column_names, ds[0] if len(ds) else None)


def _keep_and_report(mapped, *, tokenized: bool, return_report: bool, what: str, fmt: str):
    """Drop the rows that have a drop_reason, count them, log the report."""
    table = mapped.data  # fresh map output: plain Arrow columns, read whole (row-wise reads took 2.4 of 7.6 s)
    reasons = table.column("drop_reason").to_pylist()
    keep = np.array([not r for r in reasons], dtype=bool)
    report = DataReport(format=fmt, rows_read=len(reasons), rows_kept=int(keep.sum()),
                        dropped=dict(Counter(r for r in reasons if r)))
    kept = mapped.select(np.flatnonzero(keep)).remove_columns("drop_reason")
    if "prompt_repeated" in table.column_names:
        report.prompt_repeated = int(table.column("prompt_repeated").to_numpy(zero_copy_only=False)[keep].sum())
        kept = kept.remove_columns("prompt_repeated")
    if tokenized:
        lengths = table.column("length").to_numpy()[keep]
        report.tokens = int(lengths.sum())
        report.assistant_tokens = int(table.column("num_trained").to_numpy()[keep].sum())
        report.truncated = int(table.column("truncated").to_numpy()[keep].sum())
        if len(lengths):
            report.length_percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
        turns = table.column("assistant_turns").to_numpy()[keep]
        report.assistant_turns_mean = round(float(turns.mean()), 2) if len(turns) else 0.0
        kept = kept.remove_columns(["truncated", "assistant_turns"])
    if return_report:
        return kept, report
    logger.info("%s data: %s", what, report.summary())
    return kept


def _convert_batch(batch, rows, tokenizer, max_length, collator, code):
    """`code` (this file's hash) is only part of the `datasets` cache key: datasets keys a module-level
    function by its name, so without it a changed parser would silently reuse old cached results."""
    converted = _batch_conversations(batch)
    out = {"messages": [m for m, _ in converted], "drop_reason": [r for _, r in converted], "row": rows,
           "prompt_repeated": _prompts_repeated(batch)}
    if tokenizer is None:
        return out
    full = tokenize_conversations(tokenizer, out["messages"])
    input_ids = [ids[:max_length] for ids in full]
    out["truncated"] = [len(ids) > len(cut) for ids, cut in zip(full, input_ids)]
    out["assistant_turns"] = [sum(m["role"] == "assistant" for m in conv) for conv in out["messages"]]
    labels = collator.labels_for(input_ids)
    out["input_ids"], out["labels"] = input_ids, labels
    out["length"] = [len(ids) for ids in input_ids]  # read by the length-grouped sampler
    out["num_trained"] = [sum(label != IGNORE_INDEX for label in row) for row in labels]
    out["drop_reason"] = [
        reason or ("reply_truncated_away" if trained == 0 else "")
        for reason, trained in zip(out["drop_reason"], out["num_trained"])
    ]
    return out


def _batch_conversations(batch) -> list[tuple[list[dict[str, str]], str]]:
    """(messages, drop reason) of each row of a batch, in the batch's format (HH text: parse_hh_to_messages)."""
    fmt = _batch_format(batch)
    if fmt == "hh":
        return [hh_to_sft_messages(chosen) for chosen in batch["chosen"]]
    return [data_formats.conversation(fmt, dict(zip(batch, values))) for values in zip(*batch.values())]


def _prompts_repeated(batch) -> list[bool]:
    """Per row: an explicit prompt that the reply side repeats (taken once; counted in the report)."""
    fmt = _batch_format(batch)
    if fmt in ("hh", "messages"):
        return [False] * len(next(iter(batch.values())))
    return [data_formats.prompt_repeated(fmt, dict(zip(batch, values))) for values in zip(*batch.values())]


def _batch_format(batch) -> str:
    sample = next((value for value in batch.get("chosen", ()) if value is not None), None)
    return data_formats.detect(batch.keys(), {"chosen": sample})


def build_dpo_dataset(ds, tokenizer=None, *, max_length: int | None = None, num_proc: int | None = None,
                      return_report: bool = False):
    """Preference rows (`chosen`, `rejected`: HH text, or message lists in TRL's conversational preference format)
    -> `prompt`/`chosen`/`rejected` rows for TRL's DPOTrainer (and `row`, the source row's index), parsed with the
    same parser as SFT, so the DPO stage scores exactly the
    sequences the SFT model learned: one BOS, the chat-template turns, the assistant header, the reply and one
    `<|eot_id|>`.

    The row shape that gives those sequences depends on the installed TRL, so it is chosen here:
    - TRL 1.x, or no tokenizer: conversational rows: `prompt` = the messages up to the last user turn,
      `chosen`/`rejected` = one assistant message each; TRL renders them with the tokenizer's chat template.
      (TRL 1.x tokenizes a text prompt with a BOS in front, so rendered text would start with two.)
    - TRL < 1 with the SFT model's tokenizer (eos `<|eot_id|>`, as train_sft.py saves it): text rows: `prompt`
      is the template rendered up to the assistant header (its BOS included), the replies are their text, and
      TRL appends eos once. (TRL 0.26 appends eos after a rendered conversational reply too: two `<|eot_id|>`.)

    Dropped and counted: non-string fields, rows whose chosen and rejected do not share the conversation before
    the final reply, rows with an empty final reply, rows with no prompt, and (with `max_length`, which needs the
    tokenizer) pairs whose longer side is over `max_length` tokens, so that TRL never cuts a pair.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("build_dpo_dataset: max_length needs the tokenizer that counts the tokens")
    render = tokenizer if tokenizer is not None and _trl_major() < 1 else None
    if render is not None and render.eos_token != LLAMA3_END_OF_TURN:
        raise ValueError(f"build_dpo_dataset: the tokenizer's eos must be {LLAMA3_END_OF_TURN} (the SFT model's "
                         f"saved tokenizer has it), got {render.eos_token!r}")
    mapped = ds.map(_dpo_batch, batched=True, with_indices=True, num_proc=num_proc, remove_columns=ds.column_names,
                    fn_kwargs={"render": render, "counter": tokenizer if max_length else None,
                               "max_length": max_length, "code": SOURCE_HASH},
                    desc="Reading preference pairs")
    return _keep_and_report(mapped, tokenized=False, return_report=return_report, what="DPO", fmt=_format(ds))


def _preference_sides(chosen, rejected, prompt) -> tuple[list, list, str]:
    """The chosen and rejected conversations of one preference row (HH text or TRL's conversational preference
    format), and why the row is dropped ("" when kept)."""
    if isinstance(chosen, list) or isinstance(rejected, list):
        return data_formats.preference_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return [], [], "not_a_string"
    return parse_hh_to_messages(chosen), parse_hh_to_messages(rejected), ""


def _pair_problem(good: list, bad: list) -> str:
    """Why two parsed conversations are not a DPO pair ("" when they are: one prompt, two final replies)."""
    if not good or not bad or good[-1]["role"] != "assistant" or bad[-1]["role"] != "assistant":
        return "empty_final_reply"
    if good[:-1] != bad[:-1]:
        return "prompts_differ"
    return "" if good[:-1] else "no_prompt"


def _trl_major() -> int:
    from importlib.metadata import version

    return int(version("trl").split(".")[0])


def _dpo_batch(batch, rows, render, counter, max_length, code):  # `code`: part of the cache key, see _convert_batch
    pairs, reasons = [], []
    prompts = batch.get("prompt") or [None] * len(batch["chosen"])
    for chosen, rejected, prompt in zip(batch["chosen"], batch["rejected"], prompts):
        good, bad, reason = _preference_sides(chosen, rejected, prompt)
        reason = reason or _pair_problem(good, bad)
        pairs.append(None if reason else (good[:-1], good[-1], bad[-1]))
        reasons.append(reason)
    sides = []
    for pair in pairs:
        sides += [pair[0] + [pair[1]], pair[0] + [pair[2]]] if pair else [[], []]
    ids_from = render if render is not None else counter
    sequences = tokenize_conversations(ids_from, sides) if ids_from is not None else []
    if counter is not None:  # the SFT tokenization: the same token count TRL gets for prompt + reply + eos
        reasons = [r or ("over_max_length" if max(map(len, sequences[2 * i: 2 * i + 2])) > max_length else "")
                   for i, r in enumerate(reasons)]
    out = {"prompt": [], "chosen": [], "rejected": [], "row": rows, "drop_reason": reasons}
    if render is not None:
        out |= _dpo_token_ids(render, pairs, sequences)
    for pair in pairs:
        prompt, good, bad = pair or ([], None, None)
        if render is None:
            out["prompt"].append(prompt)
            out["chosen"].append([good] if good else [])
            out["rejected"].append([bad] if bad else [])
        else:
            out["prompt"].append(render.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                                 if prompt else "")
            out["chosen"].append(good["content"] if good else "")
            out["rejected"].append(bad["content"] if bad else "")
    return out


def _dpo_token_ids(tokenizer, pairs: list, sequences: list[list[int]]) -> dict[str, list[list[int]]]:
    """`prompt_input_ids`/`chosen_input_ids`/`rejected_input_ids` of each pair: SFT's own ids of prompt + reply
    (`sequences`, chosen and rejected side by side) cut where the reply's content starts. Ours because TRL 0.26's
    tokenize_row re-tokenizes the text columns, turning a literal "<|eot_id|>" in a message into the control token
    SFT never trained; hh_sft_dpo.sft_token_ids_row hands these ids to TRL instead."""
    out = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    replies = content_token_ids(tokenizer, [side["content"] for pair in pairs if pair for side in pair[1:]])
    replies = iter(replies)
    for i, pair in enumerate(pairs):
        if pair is None:
            for ids in out.values():
                ids.append([])
            continue
        chosen, rejected = sequences[2 * i], sequences[2 * i + 1]
        good, bad = next(replies) + [tokenizer.eos_token_id], next(replies) + [tokenizer.eos_token_id]
        prompt = chosen[: len(chosen) - len(good)]
        if chosen[len(prompt):] != good or rejected[: len(prompt)] != prompt or rejected[len(prompt):] != bad:
            raise ValueError("the chat template must end each reply with its content and the eos token")
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(good)
        out["rejected_input_ids"].append(bad)
    return out


def content_token_ids(tokenizer, contents: list[str]) -> list[list[int]]:
    """Token ids of each message content (stripped), special-token safe: a literal "<|eot_id|>" stays text."""
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: ~2x faster than the Python wrapper here
    backend.encode_special_tokens = True  # what `split_special_tokens=True` does
    try:
        return [e.ids for e in backend.encode_batch_fast([c.strip() for c in contents], add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = False


def tokenize_conversations(tokenizer, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each conversation as the tokenizer's chat template renders it, special-token safe.

    The template is rendered once per sequence of roles with placeholder contents; its pieces are
    tokenized once (special tokens recognised) and the message contents in one batched call with
    `split_special_tokens=True`, so a literal "<|eot_id|>" typed in a message stays text instead of
    becoming the real token (which `apply_chat_template(tokenize=True)` would do). Same ids as the
    template otherwise: pieces meet contents at special tokens or at the "\\n\\n" after a header.
    """
    content_ids = iter(content_token_ids(tokenizer, [m["content"] for conv in conversations for m in conv]))
    result = []
    for conv in conversations:
        ids: list[int] = []
        if not conv:  # a dropped row: nothing to render
            result.append(ids)
            continue
        pieces = _template_skeleton(tokenizer, tuple(m["role"] for m in conv))
        for piece in pieces:
            ids.extend(next(content_ids) if piece is None else piece)
        result.append(ids)
    return result


_PLACEHOLDER = "@@SFT_CONTENT_{}@@"
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(template, roles): pieces}


def _template_skeleton(tokenizer, roles: tuple[str, ...]) -> tuple:
    """The chat template for this sequence of roles as token-id pieces, `None` where a content goes."""
    cache = _SKELETONS.setdefault(tokenizer, {})
    key = (tokenizer.chat_template, roles)
    if key not in cache:
        messages = [{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)]
        parts = re.split(r"@@SFT_CONTENT_\d+@@", tokenizer.apply_chat_template(messages, tokenize=False))
        if len(parts) != len(roles) + 1:
            raise ValueError("the chat template must render each message's content exactly once")
        pieces = []
        for i, part in enumerate(parts):
            if part:
                pieces.append(tuple(tokenizer(part, add_special_tokens=False)["input_ids"]))
            if i < len(roles):
                pieces.append(None)
        cache[key] = tuple(pieces)
    return cache[key]


class CompletionOnlyCollator:
    """Pads a batch and trains on every assistant turn: its content tokens and the end-of-turn token.

    TRL 1.x removed `DataCollatorForCompletionOnlyLM`; this replaces it, fixed (the old one trained only
    the last turn). A turn starts after each `response_template` and ends at the next `end_of_turn` token
    (inclusive); everything else (BOS, system and user turns, headers, padding) is -100. Padding is found
    from lengths, never by comparing ids with the pad id, so the stop token stays trained even when
    pad == end_of_turn. Examples that already carry `labels` (made once, at preprocessing, by
    `labels_for`) are only padded.
    """

    def __init__(self, tokenizer, response_template: str = LLAMA3_ASSISTANT_HEADER,
                 end_of_turn: str = LLAMA3_END_OF_TURN, pad_to_multiple_of: int | None = None):
        self.response_ids = np.array(tokenizer(response_template, add_special_tokens=False)["input_ids"])
        end_ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        if len(end_ids) != 1:
            raise ValueError(f"end_of_turn {end_of_turn!r} must be a single token, got {len(end_ids)}")
        self.end_id = end_ids[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        labels = [e["labels"] for e in examples] if "labels" in examples[0] else self.labels_for(ids)
        sizes = [len(r) for r in ids]
        width = max(sizes)  # from the Python lengths: no tensor read back
        lengths = torch.tensor(sizes)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return {
            "input_ids": _pad(ids, width, self.pad_id),
            "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
            "labels": _pad(labels, width, IGNORE_INDEX),
        }

    def labels_for(self, input_ids: list[list[int]]) -> list[list[int]]:
        """Labels for unpadded sequences, computed on them all at once (flattened, no padding)."""
        if not input_ids:
            return []
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        flat = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int64, count=int(lengths.sum()))
        trained = assistant_token_mask(flat, lengths, self.response_ids, self.end_id)
        labels = np.where(trained, flat, IGNORE_INDEX)
        return [row.tolist() for row in np.split(labels, np.cumsum(lengths)[:-1])]


class VarlenCollator(CompletionOnlyCollator):
    """The same conversations and labels as CompletionOnlyCollator, with no padding at all: the batch's
    conversations concatenated into one row, `position_ids` restarting at each, and their boundaries as
    cumulative lengths (`cu_seq_lens_q/k`, int32) with the longest (`max_length_q/k`, an int: no device read),
    what variable-length attention kernels take (varlen_attention). Each conversation's first token (its BOS)
    is never trained, so no label reaches across a boundary."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        labels = [e["labels"] for e in examples] if "labels" in examples[0] else self.labels_for(ids)
        sizes = [len(r) for r in ids]
        bounds = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32)
        flat_labels = torch.tensor([list(itertools.chain.from_iterable(labels))], dtype=torch.long)
        flat_labels[0, bounds[:-1].long()] = IGNORE_INDEX  # (already so for our labels: a BOS is never trained)
        return {
            "input_ids": torch.tensor([list(itertools.chain.from_iterable(ids))], dtype=torch.long),
            "labels": flat_labels,
            "position_ids": torch.cat([torch.arange(n) for n in sizes])[None],
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": max(sizes), "max_length_k": max(sizes),
        }


def assistant_token_mask(flat: np.ndarray, lengths: np.ndarray, response_ids: np.ndarray, end_id: int) -> np.ndarray:
    """True on the tokens to train in concatenated sequences: a token is trained when the last turn event
    before it is the end of an assistant header (not an end-of-turn token, not a sequence start)."""
    n, k = len(flat), len(response_ids)
    position = np.arange(n + 1)
    seq_starts = np.cumsum(lengths) - lengths
    starts = np.zeros(n + 1, dtype=bool)  # first token after an assistant header
    if n >= k:
        header = np.ones(n - k + 1, dtype=bool)
        for j, token in enumerate(response_ids):
            header &= flat[j: n - k + 1 + j] == token
        sequence = np.repeat(np.arange(len(lengths)), lengths)
        header &= sequence[: n - k + 1] == sequence[k - 1:]  # a header never spans two sequences
        starts[k:] = header
    stops = np.zeros(n + 1, dtype=bool)  # first token after an end-of-turn, and every sequence start
    stops[1:] = flat == end_id
    stops[seq_starts] = True
    last_start = np.maximum.accumulate(np.where(starts, position, -1))
    last_stop = np.maximum.accumulate(np.where(stops, position, -1))
    return (last_start > last_stop)[:n]


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------------------
# python data_process_sft.py --config config_dpo.yaml --inspect [-n 3]
# ----------------------------------------------------------------------------------------------------------------
def render_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The text the model sees, trained tokens in green (terminal) or [[double brackets]] (piped)."""
    pieces = []
    for trained, group in itertools.groupby(zip(input_ids, labels), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in group])
        pieces.append((f"\x1b[1;32m{text}\x1b[0m" if color else f"[[{text}]]") if trained else text)
    return "".join(pieces)


def inspect(config_path: str, n: int) -> int:
    """Print n conversations as the model will see them, then the data report (same checks as training)."""
    try:
        cfg = load_config(config_path)
        check_before_loading(cfg)
        tokenizer = prepare_tokenizer(load_tokenizer(cfg.policy_name))
        raw = load_rows(cfg.dataset.dataset_name, cfg.dataset.subset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = cfg.sft_training
    data, report = build_sft_dataset(raw, tokenizer, max_length=t.max_length, num_proc=t.dataset_num_proc,
                                     return_report=True)
    color = sys.stdout.isatty()
    legend = "green" if color else "[[ ]]"
    for i, row in enumerate(data.select(range(min(n, len(data))))):
        print(f"\n=== conversation {i + 1}: {len(row['input_ids'])} tokens, {row['num_trained']} trained "
              f"(in {legend}) ===")
        print(render_trained(tokenizer, row["input_ids"], row["labels"], color))
    share = report.assistant_tokens / report.tokens if report.tokens else 0.0
    print(f"\n=== data report: {cfg.dataset.dataset_name} [{cfg.dataset.subset}], max_length {t.max_length} ===")
    print(f"rows read {report.rows_read}, kept {report.rows_kept}")
    for reason, count in sorted(report.dropped.items()):
        print(f"  dropped {reason}: {count}")
    print(f"token length percentiles: {report.length_percentiles} (after truncation)")
    print(f"rows over max_length (cut): {report.truncated} ({report.truncated / max(report.rows_kept, 1):.1%})")
    print(f"assistant-token share: {share:.1%} ({report.assistant_tokens} of {report.tokens} tokens trained)")
    print(f"assistant turns per conversation: {report.assistant_turns_mean}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Inspect the SFT data as the model will see it.")
    parser.add_argument("--config", default="config_dpo.yaml")
    parser.add_argument("--inspect", action="store_true", help="print conversations with trained tokens marked")
    parser.add_argument("-n", type=int, default=3, help="conversations to print")
    args = parser.parse_args()
    if not args.inspect:
        parser.error("nothing to do: pass --inspect")
    sys.exit(inspect(args.config, args.n))
