"""The chat core: the data formats SFT reads, Anthropic HH text as chat messages, the Llama-3 chat template as
token ids (special-token safe), the labels SFT trains (every assistant turn and its <|eot_id|>), and the DPO rows
as SFT tokenized them.

It imports nothing else of this project and no torch (numpy only; datasets and a tokenizer are passed in), so it
is one of the two files `dpo_handoff.py install` adds to the DPO repo (with hh_sft_dpo.py), and a dataset's
format is told in well under a second. The formats:

    hh                 `chosen` (and `rejected`) as Anthropic HH text: "\\n\\nHuman: ...\\n\\nAssistant: ..."
    messages           `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] (TRL conversational)
    preference         `chosen`/`rejected` as message lists, with or without a shared `prompt` message list (TRL's
                       conversational preference format); SFT trains `prompt` + `chosen`
    prompt_completion  `prompt` + `completion` message lists (TRL's conversational prompt-completion format)

Every format ends as the same thing: a list of {role, content} messages, checked the same way, so the template,
labels (a system turn is never trained), truncation, length report and drop counts are the HH path's. A bad row is
dropped with a reason named after the rule it breaks.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("data_process_sft")  # the data report logs where a run sets its data logger's level

IGNORE_INDEX = -100
SOURCE_HASH = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:16]  # part of the datasets cache key
LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_END_OF_TURN = "<|eot_id|>"
# The local data files SFT reads, by suffix, and the `datasets` builder of each.
DATA_FILES = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".json.gz": "json", ".parquet": "parquet"}


def data_file_kind(path: str) -> str | None:
    """The `datasets` builder of a data file ("json", "parquet"), or None for a file of another kind."""
    return next((kind for suffix, kind in DATA_FILES.items() if path.endswith(suffix)), None)


# --- formats ------------------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")
EXAMPLES = {
    "hh": '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "..."}',
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], '
                  '"rejected": [...]}',
    "prompt_completion": '{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", '
                         '"content": "Hello!"}]}',
}
NAMES = {"mixture": "a mixture (each source's format is said on its own)", "hh": "HH text",
         "messages": "messages (TRL conversational)",
         "preference": "conversational preference (TRL)", "prompt_completion": "prompt-completion (TRL conversational)"}


class FormatError(ValueError):
    """Columns that are no format we read, or of two formats at once: one line naming what is there."""


def detect(columns, sample: dict | None = None) -> str:
    """The format of a dataset with these `columns`; `sample` (one row) tells HH text from message lists."""
    columns = set(columns)
    keys = [key for key in ("messages", "chosen", "completion") if key in columns]
    if len(keys) > 1:
        raise FormatError(f"its rows mix two formats (columns {', '.join(sorted(columns))}: "
                          f"{' and '.join(repr(k) for k in keys)}); use one format per dataset. {accepted()}")
    if keys == ["messages"]:
        return "messages"
    if keys == ["completion"] and "prompt" in columns:
        return "prompt_completion"
    if keys == ["chosen"]:
        value = (sample or {}).get("chosen")
        return "preference" if isinstance(value, list) else "hh"
    raise FormatError(f"its columns ({', '.join(sorted(columns)) or 'none'}) are none of the formats SFT reads. "
                      f"{accepted()}")


def accepted() -> str:
    return "Accepted, one row each: " + "; ".join(f"{NAMES[k]}: {v}" for k, v in EXAMPLES.items())


def peek(path: str) -> str | None:
    """The format of a local .jsonl/.jsonl.gz/.json/.parquet file (or the first such file of a folder), from its
    first row, without loading it; None when it cannot be told here (the full load says why)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
                       if data_file_kind(f))
        if not files:
            return None
        path = files[0]
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_group(0).slice(0, 1).to_pylist()
            row = table[0] if table else {}
        elif path.endswith((".jsonl", ".jsonl.gz")):
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                row = json.loads(next((line for line in f if line.strip()), "{}"))
        else:
            return None  # a .json file may be one large array: the full load reads it
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return None
    if not isinstance(row, dict):
        return None
    return detect(row, row)


def conversation(fmt: str, row: dict) -> tuple[list[dict[str, str]], str]:
    """The messages to train on from one row of a conversational format, and why the row is dropped ("" when
    kept). Contents are stripped and empty turns dropped (as HH's parser does); a trailing user turn, with nothing
    to learn from, is dropped too. An explicit prompt that the reply side repeats from its start is taken once
    (as TRL's implicit-prompt extraction reads such rows), never trained twice (prompt_repeated counts them)."""
    if fmt == "messages":
        parts = [row.get("messages")]
    elif fmt == "preference":
        parts = ([row["prompt"]] if row.get("prompt") is not None else []) + [row.get("chosen")]
    else:
        parts = [row.get("prompt"), row.get("completion")]
    checked = []
    for part in parts:
        messages, reason = _messages(part)
        if reason:
            return [], reason
        checked.append(messages)
    if len(checked) == 2 and _repeats(*checked):
        checked = checked[1:]
    messages = [m for part in checked for m in part]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages, "" if messages else "no_assistant_turn"


def prompt_repeated(fmt: str, row: dict) -> bool:
    """Whether the row's reply side starts with its whole explicit prompt (conversation() takes it once)."""
    if row.get("prompt") is None:  # (a messages row has no reply column to repeat it: detect allows no mix)
        return False
    prompt, _ = _messages(row.get("prompt"))
    reply, _ = _messages(row.get("chosen" if fmt == "preference" else "completion"))
    return _repeats(prompt, reply)


def _repeats(prompt: list[dict], reply: list[dict]) -> bool:
    return bool(prompt) and reply[: len(prompt)] == prompt


def _messages(part) -> tuple[list[dict[str, str]], str]:
    """The checked, non-empty messages of one message list, and why it is refused ("" when it is not)."""
    if not isinstance(part, list):
        return [], "messages_not_a_list"
    messages = []
    for message in part:
        checked, reason = _message(message)
        if reason:
            return [], reason
        if checked["content"]:
            messages.append(checked)
    return messages, ""


def preference_pair(row: dict) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """The chosen and rejected conversations of a conversational preference row (each with the shared `prompt`
    when the row has one), and why the row is dropped ("" when kept)."""
    good, reason = conversation("preference", row)
    bad, bad_reason = conversation("preference", {**row, "chosen": row.get("rejected")})
    return good, bad, reason or bad_reason


def _message(message) -> tuple[dict[str, str], str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        return {}, "message_without_role_or_content"
    if message["role"] not in ROLES:
        return {}, "unknown_role"
    if not isinstance(message["content"], str):
        return {}, "content_not_a_string"
    return {"role": message["role"], "content": message["content"].strip()}, ""


# --- Anthropic HH text ----------------------------------------------------------------------------------------
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


# --- rows -> conversations, and the report of what was kept ---------------------------------------------------
@dataclass
class DataReport:
    """What happened to the rows: read, kept, dropped by reason; token counts when tokenized."""

    format: str = "hh"  # detect
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
        line = (f"format {NAMES[self.format]}; rows read {self.rows_read}, kept {self.rows_kept}, "
                f"dropped: {drops}")
        if self.tokens:
            line += (f"; tokens {self.tokens}, trained (assistant) tokens {self.assistant_tokens} "
                     f"({self.assistant_tokens / self.tokens:.0%}), rows cut to max_length {self.truncated}")
        if self.prompt_repeated:
            line += (f"; {self.prompt_repeated} rows repeat their prompt at the start of the reply side: the prompt "
                     "is taken once")
        return line


def merge_reports(reports: list[DataReport], lengths) -> DataReport:
    """One report for several sources built on their own (lengths: the token lengths of every kept row)."""
    merged = DataReport(format=reports[0].format if len({r.format for r in reports}) == 1 else "mixture")
    for report in reports:
        merged.rows_read += report.rows_read
        merged.rows_kept += report.rows_kept
        merged.dropped = dict(Counter(merged.dropped) + Counter(report.dropped))
        merged.tokens += report.tokens
        merged.assistant_tokens += report.assistant_tokens
        merged.truncated += report.truncated
        merged.prompt_repeated += report.prompt_repeated
    if len(lengths):
        merged.length_percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    kept = sum(r.rows_kept for r in reports)
    merged.assistant_turns_mean = round(sum(r.assistant_turns_mean * r.rows_kept for r in reports) / kept, 2) \
        if kept else 0.0
    return merged


def dataset_format(ds) -> str:
    return detect(ds.column_names, ds[0] if len(ds) else None)


def keep_and_report(mapped, *, tokenized: bool, return_report: bool, what: str, fmt: str):
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


def batch_conversations(batch) -> list[tuple[list[dict[str, str]], str]]:
    """(messages, drop reason) of each row of a batch, in the batch's format (HH text: parse_hh_to_messages)."""
    fmt = _batchdataset_format(batch)
    if fmt == "hh":
        return [hh_to_sft_messages(chosen) for chosen in batch["chosen"]]
    return [conversation(fmt, dict(zip(batch, values))) for values in zip(*batch.values())]


def prompts_repeated(batch) -> list[bool]:
    """Per row: an explicit prompt that the reply side repeats (taken once; counted in the report)."""
    fmt = _batchdataset_format(batch)
    if fmt in ("hh", "messages"):
        return [False] * len(next(iter(batch.values())))
    return [prompt_repeated(fmt, dict(zip(batch, values))) for values in zip(*batch.values())]


def _batchdataset_format(batch) -> str:
    sample = next((value for value in batch.get("chosen", ()) if value is not None), None)
    return detect(batch.keys(), {"chosen": sample})


# --- the chat template as token ids, and the labels ------------------------------------------------------------
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


def assistant_labels(input_ids: list[list[int]], response_ids: np.ndarray, end_id: int) -> list[list[int]]:
    """Labels for unpadded sequences (IGNORE_INDEX outside assistant turns), computed on them all at once."""
    if not input_ids:
        return []
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    flat = np.fromiter((t for row in input_ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    labels = np.where(assistant_token_mask(flat, lengths, response_ids, end_id), flat, IGNORE_INDEX)
    return [row.tolist() for row in np.split(labels, np.cumsum(lengths)[:-1])]


# --- DPO rows as SFT tokenized them ---------------------------------------------------------------------------
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
    return keep_and_report(mapped, tokenized=False, return_report=return_report, what="DPO", fmt=dataset_format(ds))


def _preference_sides(chosen, rejected, prompt) -> tuple[list, list, str]:
    """The chosen and rejected conversations of one preference row (HH text or TRL's conversational preference
    format), and why the row is dropped ("" when kept)."""
    if isinstance(chosen, list) or isinstance(rejected, list):
        return preference_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})
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
