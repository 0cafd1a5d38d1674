"""The dataset formats SFT reads, told apart by their columns, and each row as chat messages.

    hh                 `chosen` (and `rejected`) as Anthropic HH text: "\\n\\nHuman: ...\\n\\nAssistant: ..."
    messages           `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] (TRL conversational)
    preference         `chosen`/`rejected` as message lists, with or without a shared `prompt` message list (TRL's
                       conversational preference format); SFT trains `prompt` + `chosen`
    prompt_completion  `prompt` + `completion` message lists (TRL's conversational prompt-completion format)

Every format ends as the same thing: a list of {role, content} messages, checked the same way, so the template,
labels (every assistant turn and its <|eot_id|>; a system turn is never trained), truncation, length report and
drop counts are the HH path's. A bad row is dropped with a reason named after the rule it breaks. This module
imports neither torch nor datasets: the format of a local file is known in well under a second.
"""

from __future__ import annotations

import gzip
import json
import os

ROLES = ("system", "user", "assistant")
EXAMPLES = {
    "hh": '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "..."}',
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], '
                  '"rejected": [...]}',
    "prompt_completion": '{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", '
                         '"content": "Hello!"}]}',
}
NAMES = {"hh": "HH text", "messages": "messages (TRL conversational)",
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
                       if f.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")))
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
    if fmt == "messages" or row.get("prompt") is None:
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
