"""Hand the SFT model to dynamic-dpo-v1 (SeanYHan888/dynamic-dpo-v1) so that its DPO loss scores what SFT trained.

Run from this checkout, in the DPO repo's environment (its uv.lock: transformers 4.57.3, trl 0.26.2):

    python dpo_handoff.py check --dpo-repo PATH --model SFT_DIR [--data FILE] [-n ROWS]
    python dpo_handoff.py install --dpo-repo PATH
    python dpo_handoff.py uninstall --dpo-repo PATH [--discard-changes]

Why: upstream's `RiskBetaDPOTrainer.compute_loss` runs the policy and the reference on `chosen_input_ids` /
`rejected_input_ids`, which in TRL 0.26 hold the reply alone (the prompt is in `prompt_input_ids`), then masks the
first `len(prompt)` positions of that reply: most pairs score no token. `check` measures that pair by pair;
`install` makes the repo's training loss take its log-probs from TRL's own `concatenated_forward` on the
chat-format rows SFT trained on (hh_sft_dpo.py, copied there). Install and uninstall are one recorded transaction
in that repo (handoff_record.py): uninstall puts back exactly what was there.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handoff_record import RECORD, RecordError, Scope, apply, locked, original_bytes, read_record, remove_leftovers

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"
TOLERANCE = 1e-3  # summed fp32 log-probs differ by ~1e-4 between batchings; the reply-only bug is off by hundreds
MARK = "# hh-sft handoff"
# The two files install adds to the DPO repo (names of their own; neither imports anything else of ours): the chat
# core and the functions the edited training.py and risk_dpo_trainer.py call.
COPIED = ("hh_sft_chat.py", "hh_sft_dpo.py")
UPSTREAM = ("training.py", "risk_dpo_trainer.py", "train_sft.py", "data_process_sft.py", "config_dpo.yaml")
# What installs since the record (bf9780c) up to 15309dc also wrote: copies of 7 of our modules (data_process_sft.py
# over upstream's) and a pointer over its train_sft.py. Install and uninstall put those files back from the record.
EARLIER = ("data_process_sft.py", "data_formats.py", "sft_config.py", "run_env.py", "model_io.py",
           "save_dir_contract.py", "train_sft.py")
# Every file a handoff with a record touched: a record naming any other path, or marking one of upstream's files
# "added", was not written by this tool and is refused before anything is read from it.
SCOPE = Scope(known=frozenset([*UPSTREAM[:4], *COPIED, *EARLIER]),
              addable=frozenset(set(COPIED + EARLIER) - set(UPSTREAM)))
# What the handoff before the record (90b27bd..f9b130a) added: its copies and NAME.hh-sft-backup files
OLDER_ADDED = ("dpo_handoff.py", "sft_readiness.py", "sft_config.py", "run_env.py", "model_io.py")


class HandoffError(Exception):
    """Bad input or a DPO repo of a shape we do not know: one `error:` line, exit 2."""


# --- install / uninstall: edits to the DPO repo's files ----------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """Lines of a DPO-repo file from `first` to `last` (one line when `last` is None; matched without surrounding
    blanks, exactly once) become `new` (indented like `first`; `{keep}` stands for the matched line)."""

    path: str
    first: str
    new: tuple[str, ...]
    last: str | None = None
    max_lines: int = 1

    @property
    def marker(self) -> str:
        """The line that says this edit is in place."""
        return next(line for line in self.new if MARK in line).strip()


EDITS = (
    Edit("training.py", "from dataset_process_hh import build_HH_dataset",
         (f"from hh_sft_dpo import build_dpo_pairs, dpo_length_args  {MARK} (was: build_HH_dataset)",)),
    Edit("training.py", "hh_ds = build_HH_dataset(raw_ds)",
         (f'hh_ds = build_dpo_pairs(raw_ds, tok, max_length=int(config["dataset"]["max_len"]))  {MARK}',)),
    Edit("training.py", "output_dir=dpo_train_args['save_dir'],",
         ("{keep}", f'**dpo_length_args(int(config["dataset"]["max_len"])),  {MARK}')),
    Edit("risk_dpo_trainer.py", "from trl import DPOTrainer",
         ("{keep}", f"from hh_sft_dpo import sft_token_ids_row, trl_sequence_logps  {MARK}")),
    Edit("risk_dpo_trainer.py", "def __init__(self, *args, dynamic_cfg, **kwargs):",
         (f"tokenize_row = staticmethod(sft_token_ids_row)  {MARK}: SFT's token ids, not TRL's re-tokenized text",
          "{keep}")),
    Edit("risk_dpo_trainer.py", "# policy chosen and response output (needs grads)",
         (f"{MARK}: log-probs of prompt + reply (with its eos) from TRL's concatenated_forward, not of",
          "# the reply alone with its first len(prompt) tokens masked (what this block did before)",
          "policy_chosen_log_prob, policy_rejected_log_prob, ref_chosen_log_prob, ref_rejected_log_prob = (",
          "    trl_sequence_logps(self, model, inputs))"),
         last="ref_rejected_log_prob = compute_log_prob(logits=ref_rejected_out, labels=rejected_labels)",
         max_lines=80),
)
EDITED = tuple(dict.fromkeys(edit.path for edit in EDITS))

class RepoFile:
    """A text file of the DPO repo as lines that keep their own endings (upstream uses CRLF), so that an edit
    changes the lines it means to and no other byte."""

    def __init__(self, name: str, data: bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HandoffError(f"{name} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}): the "
                               "handoff edits only UTF-8 files; nothing was changed") from None
        self.lines = re.findall(r"[^\n]*\n|[^\n]+\Z", text)
        self.newline = "\r\n" if "\r\n" in text else "\n"

    def state(self, edit: Edit) -> str:
        """"installed" (our line is there), "upstream" (the lines it replaces are there, once) or "unknown"."""
        stripped = [line.strip() for line in self.lines]
        if edit.marker in stripped:
            return "installed"
        return "upstream" if len(self._spans(stripped, edit)) == 1 else "unknown"

    def apply(self, edit: Edit) -> None:
        (start, end), = self._spans([line.strip() for line in self.lines], edit)
        first = self.lines[start]
        content = first.rstrip("\r\n")
        indent = content[: len(content) - len(content.lstrip())]
        new = [content if line == "{keep}" else indent + line for line in edit.new]
        between = first[len(content):] or self.newline  # the replaced lines' own endings
        last = self.lines[end - 1][len(self.lines[end - 1].rstrip("\r\n")):]
        self.lines[start:end] = [line + between for line in new[:-1]] + [new[-1] + last]

    def to_bytes(self) -> bytes:
        return "".join(self.lines).encode("utf-8")

    @staticmethod
    def _spans(stripped: list[str], edit: Edit) -> list[tuple[int, int]]:
        spans = []
        for start in (i for i, line in enumerate(stripped) if line == edit.first):
            if edit.last is None:
                spans.append((start, start + 1))
            elif edit.last in stripped[start: start + edit.max_lines]:
                spans.append((start, stripped.index(edit.last, start) + 1))
        return spans


def _require_repo(repo: Path, recorded=()) -> None:
    """Refuse a folder without upstream's files (those a handoff record names are checked against the record)."""
    for name in UPSTREAM:
        if name not in recorded and not (repo / name).is_file():
            raise HandoffError(f"{repo} is not a dynamic-dpo-v1 checkout (no {name})")


def repo_state(repo: Path) -> str:
    """"upstream" or "installed", from the lines of the files EDITS change as they are now; else refused."""
    _require_repo(repo)
    files = {name: RepoFile(name, (repo / name).read_bytes()) for name in EDITED}
    states = {edit: files[edit.path].state(edit) for edit in EDITS}
    _refuse_unknown(repo, states)
    if len(set(states.values())) > 1:
        raise HandoffError(f"{repo} is partly changed by the handoff: run `python dpo_handoff.py install --dpo-repo "
                           f"{repo}` (or uninstall) to finish what was interrupted, then rerun")
    return next(iter(states.values()))


def _refuse_unknown(repo: Path, states: dict[Edit, str]) -> None:
    for edit, state in states.items():
        if state == "unknown":
            what = f"'{edit.first}'" + (f" ... '{edit.last}'" if edit.last else "")
            raise HandoffError(f"{repo / edit.path} is not a shape this handoff knows (expected {what} once; "
                               f"another upstream commit?): nothing was changed")


def _older_install(repo: Path, names: list[str]) -> HandoffError:
    """The refusal for a repo changed by the handoff before the record, with every file it left to remove."""
    left = [name for name in OLDER_ADDED if (repo / name).is_file()]
    left += sorted(p.name for p in repo.glob("*.hh-sft-backup"))
    remove = f" && rm {' '.join(left)}" if left else ""
    return HandoffError(
        f"{', '.join(names)} in {repo} carry lines marked '{MARK}' but there is no handoff record ({RECORD}): an "
        f"older dpo_handoff.py changed them. Put the repo back first (in {repo}: git checkout -- training.py "
        f"risk_dpo_trainer.py train_sft.py data_process_sft.py{remove}), then rerun; nothing was changed")


def install_targets(repo: Path, source: Path) -> dict[str, bytes | None]:
    """Every file install writes, with its bytes: EDITS applied to the repo's original files (as the record keeps
    them after an earlier install) and the COPIED files from `source`; files an earlier install wrote that this one
    no longer needs go back to what they were (None)."""
    record = read_record(repo, SCOPE)
    _require_repo(repo, record.entries)
    if source.resolve() == repo.resolve():
        raise HandoffError(f"run install from the hh-sft checkout (python /path/to/hh-sft/dpo_handoff.py install "
                           f"--dpo-repo {repo}), not from a copy inside the DPO repo; nothing was changed")
    missing = [name for name in COPIED if not (source / name).is_file()]
    if missing:
        raise HandoffError(f"{source} lacks {', '.join(missing)}: run install from a whole hh-sft checkout; "
                           "nothing was changed")
    targets: dict[str, bytes | None] = {}
    for name in EDITED:
        file = RepoFile(name, original_bytes(repo, name, record))
        states = {edit: file.state(edit) for edit in EDITS if edit.path == name}
        if "installed" in states.values():
            raise _older_install(repo, [name])
        _refuse_unknown(repo, states)
        for edit in states:
            file.apply(edit)
        targets[name] = file.to_bytes()
    targets |= {name: (source / name).read_bytes() for name in COPIED}
    return targets | {name: None for name in record.entries if name not in targets}


INSTALL_WORDS = {"added": "added", "updated": "updated", "removed": "removed (no longer needed)",
                 "restored": "restored (no longer needed)"}


def install(repo: Path, source: Path = HERE, discard_changes: bool = False) -> int:
    with locked(repo):
        outcome = apply(repo, install_targets(repo, source), SCOPE, discard_changes=discard_changes)
    if not outcome.changed and not outcome.resumed:
        print(f"already installed in {repo}: nothing changed")
        return 0
    print(f"Installed the hh-sft DPO handoff in {repo} (record of every file: {repo / RECORD}):")
    if outcome.resumed:
        print("  (an interrupted install or uninstall was found in the record: this install finished it)")
    for name, action in outcome.actions.items():
        if action == "changed":
            print(f"  {name}: edited (lines marked '{MARK}')")
        elif action != "unchanged":
            print(f"  {name}: {INSTALL_WORDS[action]}")
    print(f"  undo: python dpo_handoff.py uninstall --dpo-repo {repo}")
    return 0


def uninstall(repo: Path, discard_changes: bool = False) -> int:
    with locked(repo):
        record = read_record(repo, SCOPE)
        if record.empty:
            _require_repo(repo)
            marked = [name for name in EDITED if MARK.encode() in (repo / name).read_bytes()]
            if marked:
                raise _older_install(repo, marked)
            left = remove_leftovers(repo)
            print(f"nothing installed in {repo} (no handoff record {RECORD}): nothing touched"
                  + (f" but a temporary file a killed install left ({', '.join(left)})" if left else ""))
            return 0
        outcome = apply(repo, dict.fromkeys(record.entries), SCOPE, discard_changes=discard_changes)
    print(f"Uninstalled the hh-sft DPO handoff from {repo}:")
    if outcome.resumed:
        print("  (an interrupted install or uninstall was found in the record: undone)")
    for name, action in outcome.actions.items():
        words = {"removed": "removed (the handoff had added it)", "restored": "restored as it was before",
                 "unchanged": "already as it was before"}
        print(f"  {name}: {words[action]}")
    print(f"  {RECORD}: removed")
    return 0


# --- check: does the repo's training loss score what SFT trained? ------------------------------------------------
LOGP_KEYS = ("policy_chosen_log_prob", "policy_rejected_log_prob", "ref_chosen_log_prob", "ref_rejected_log_prob")


def check(repo: Path, model_dir: Path, data: str, rows: int, batch_size: int, report_path: Path | None) -> int:
    """Build the repo's trainer as its training.py does (its trainer class, its data builder and DPOConfig length
    keys as installed or not, policy and reference from the SFT folder, fp32), run its training loss on the first
    `rows` rows of `data`, and compare the log-probs it passes to its DPO loss with the SFT computation."""
    state, max_len = repo_state(repo), _dpo_max_len(repo)
    _require_model_folder(model_dir)
    if report_path and report_path.is_dir():
        raise HandoffError(f"--report {report_path} is a folder: name the JSON file to write, e.g. "
                           f"{report_path / 'check.json'}")
    if report_path and not os.access(report_path.parent, os.W_OK):
        raise HandoffError(f"--report {report_path}: its folder does not exist or is not writable")
    _quiet_libraries()
    raw = _read_rows(data, rows)
    if missing := [c for c in ("chosen", "rejected") if c not in raw.column_names]:
        raise HandoffError(f"--data {data}: its rows have no {' or '.join(repr(c) for c in missing)} field "
                           f"(columns: {', '.join(raw.column_names)}); check scores preference pairs: rows with "
                           "'chosen' and 'rejected'")
    _require_dpo_stack()
    tokenizer = _load_tokenizer(model_dir)
    sys.path.append(str(repo))  # the repo's data and trainer modules; ours come first on the path
    pairs = _pairs(state, raw, tokenizer, max_len)
    _check_vocabulary(model_dir, tokenizer, pairs)
    if not pairs["compared"]:  # (a loss over no batch has nothing to compare)
        raise HandoffError(f"none of the first {rows} rows of {data} gives a pair that both the repo's data builder "
                           "and SFT's keep: read more rows with -n")
    print(f"Scoring {len(pairs['compared'])} pairs with the repo's training loss and with SFT's computation (policy "
          f"and reference, fp32, on the CPU unless a GPU is visible): seconds on a GPU, minutes on a CPU with a "
          f"128k vocabulary", flush=True)
    got, scored, want, expected = _measure(repo, model_dir, tokenizer, pairs, state, max_len, batch_size)
    result = {"repo": str(repo), "state": state, "model": str(model_dir), "data": data, "max_len": max_len,
              "rows_read": len(raw), "rows": np.array(pairs["compared"], dtype=int), "expected_tokens": expected,
              "scored_tokens": scored, "expected_logps": want, "loss_logps": got,
              "dropped_by_repo_builder": len(raw) - len(pairs["built"]),
              "dropped_by_sft_builder": len(pairs["built"]) - len(pairs["compared"])}
    if report_path:
        report_path.write_text(json.dumps(result, indent=1, default=np.ndarray.tolist), encoding="utf-8")
    return _verdict(result, np.abs(got - want), repo)


def _dpo_max_len(repo: Path) -> int:
    import yaml

    try:
        config = yaml.safe_load((repo / "config_dpo.yaml").read_text(encoding="utf-8"))
        return int(config["dataset"]["max_len"])
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HandoffError(f"{repo / 'config_dpo.yaml'} cannot be read: {str(e).splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError):
        raise HandoffError(f"{repo / 'config_dpo.yaml'} has no integer dataset.max_len: its training.py reads it "
                           "(e.g. `max_len: 512` under `dataset:`)") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _require_model_folder(model_dir: Path) -> None:
    """The folder train_sft.py saves, checked before anything loads (a load fails 20 s later, as a traceback): a
    Llama causal LM's config.json, its weights, its tokenizer and the chat template it was trained with."""
    saved = "expected the folder train_sft.py saved"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise HandoffError(f"--model {model_dir}: no readable config.json ({saved})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or "LlamaForCausalLM" not in architectures:
        raise HandoffError(f"--model {model_dir}: config.json describes {architectures or 'no architecture'}, not "
                           f"LlamaForCausalLM ({saved} from a Llama-3 base)")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise HandoffError(f"--model {model_dir}: no weights ({' or '.join(WEIGHT_FILES[:2])}; {saved}, not a "
                           "checkpoint-N or an unfinished run)")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise HandoffError(f"--model {model_dir}: no tokenizer files (tokenizer.json; {saved}, which holds its "
                           "tokenizer)")
    if not (model_dir / "chat_template.jinja").is_file() and "chat_template" not in _json_or_empty(
            model_dir / "tokenizer_config.json"):
        raise HandoffError(f"--model {model_dir}: no chat template (chat_template.jinja; {saved}: the DPO rows are "
                           "rendered with the template SFT trained on)")


def _json_or_empty(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_rows(data: str, rows: int):
    from data_process_sft import load_rows
    from sft_config import ConfigError

    try:
        return load_rows(data, f"train[:{rows}]")
    except ConfigError as e:
        raise HandoffError(str(e)) from None


def _load_tokenizer(model_dir: Path):
    """The tokenizer as the repo's training.py loads it (eos as pad when none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    except (OSError, ValueError) as e:
        raise HandoffError(f"--model {model_dir}: its tokenizer does not load ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_vocabulary(model_dir: Path, tokenizer, pairs: dict) -> None:
    """train_sft.py's rule (model_io.check_vocabulary) on the compared pairs' token ids."""
    from model_io import check_vocabulary
    from sft_config import ConfigError

    vocabulary = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    rows = [pairs["reference"][i] for i in pairs["compared"]]
    texts = [m["content"] for row in rows for m in row["prompt"] + row["chosen"] + row["rejected"]]
    max_id = max(max(ids, default=0) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    try:
        note = check_vocabulary(f"--model {model_dir}", tokenizer, vocabulary, max_id, holds="the compared pairs")
    except ConfigError as e:
        raise HandoffError(str(e)) from None
    if note:
        print(note)


def _pairs(state: str, raw, tokenizer, max_len: int) -> dict:
    """The pairs both sides can score: `built` (row -> the DPO row the repo's training.py builds), `reference` (row
    -> SFT's pair, no length limit) and `compared` (rows in both)."""
    from hh_sft_chat import build_dpo_dataset

    built = _repo_rows(state, raw, tokenizer, max_len)
    reference = {row["row"]: row for row in build_dpo_dataset(raw)}
    return {"built": built, "reference": reference, "compared": [i for i in built if i in reference]}


def _measure(repo: Path, model_dir: Path, tokenizer, pairs: dict, state: str, max_len: int, batch_size: int):
    """The repo's training loss on the compared pairs (log-probs and scored tokens per pair, see _loss_logps) and
    SFT's computation of the same (sft_readiness: log-probs and reply tokens per pair)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, ProgressCallback
    from trl import DPOConfig

    import sft_readiness as sr

    module = importlib.import_module("risk_dpo_trainer")
    compared = pairs["compared"]
    with tempfile.TemporaryDirectory() as tmp:
        from hh_sft_dpo import dpo_length_args  # (check only: install and uninstall never import torch)

        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch_size, report_to=[], bf16=False, fp16=False,
                         remove_unused_columns=False, **(dpo_length_args(max_len) if state == "installed" else {}))
        policy, ref_model = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
        trainer = module.RiskBetaDPOTrainer(
            model=policy.eval(), ref_model=ref_model.eval(), args=args, processing_class=None,
            train_dataset=Dataset.from_list([pairs["built"][i] for i in compared]),
            dynamic_cfg=module.RiskBetaDPOConfig(log_margins=False))
        for printer in (PrinterCallback, ProgressCallback):  # its per-step dpo/* logs: the table is the output
            trainer.remove_callback(printer)
        got, scored = _loss_logps(trainer, module, batch_size)
        replies = sr.reply_sequences(tokenizer, [pairs["reference"][i] for i in compared], max_length=sys.maxsize)
        want = sr.reply_logps(trainer.model, replies, tokenizer.pad_token_id, batch_size=batch_size)
    _, sequences, starts = replies
    expected = np.array([len(s) - start for s, start in zip(sequences, starts)]).reshape(-1, 2)
    return got, scored, np.stack([want["chosen_sum"], want["rejected_sum"]] * 2, axis=1), expected


def _quiet_libraries() -> None:
    """The table is the output: no progress bars, no datasets hashing warnings (they print the whole tokenizer)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def _require_dpo_stack() -> None:
    from importlib.metadata import version

    trl_version = version("trl")
    if int(trl_version.split(".")[0]) >= 1:
        raise HandoffError(f"check runs in the DPO repo's environment (its uv.lock pins trl 0.26.2); this python "
                           f"has trl {trl_version}: run it with that environment's python")


def _repo_rows(state: str, raw, tokenizer, max_len: int) -> dict[int, dict]:
    """HH row index -> the DPO row the repo's training.py builds from it (rows it drops are absent)."""
    if state == "installed":
        from hh_sft_dpo import build_dpo_pairs

        return {row.pop("row"): row for row in build_dpo_pairs(raw, tokenizer, max_len)}
    build = importlib.import_module("dataset_process_hh").build_HH_dataset
    rows = {}
    for i in range(len(raw)):  # one row at a time: upstream's builder keeps no row index
        try:
            built = build(raw.select([i]))
        except ValueError:  # upstream raises on a row without an Assistant tag (a whole run would stop there)
            continue
        if len(built):
            rows[i] = built[0]
    return rows


def _loss_logps(trainer, module, batch_size: int):
    """Per pair, in dataset order: the four log-prob sums the repo's training loss passes to its DPO loss
    (LOGP_KEYS), and how many reply tokens each of them scores, found by running the same loss again with both
    models' logits set to zero: every scored token then adds exactly -log(vocabulary size)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = getattr(module, "dpo_loss_tensor", None)
    if original is None:
        raise HandoffError("risk_dpo_trainer.py calls no dpo_loss_tensor: not a shape this check knows")
    signature, captured = inspect.signature(original), []

    def capture(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        captured.append(torch.stack([bound[k].detach().double().cpu() for k in LOGP_KEYS], dim=1))
        return original(*args, **kwargs)

    def run() -> np.ndarray:
        captured.clear()
        loader = DataLoader(trainer.train_dataset, batch_size=batch_size, collate_fn=trainer.data_collator)
        with torch.no_grad():
            for batch in loader:
                trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        return torch.cat(captured).numpy()

    vocabulary = trainer.model.get_output_embeddings().weight.shape[0]

    def zero_logits(input_ids, logits_to_keep=0, **_kwargs):
        """The logits of a model that gives every token the same score, as a transformers causal LM returns them
        (the last `logits_to_keep` positions when set): one zero seen through a view, no model run, no GBs."""
        length = logits_to_keep or input_ids.shape[1]
        return CausalLMOutputWithPast(logits=torch.zeros(()).expand(input_ids.shape[0], length, vocabulary))

    module.dpo_loss_tensor = capture
    try:
        logps = run()
        for model in (trainer.model, trainer.ref_model):
            model.forward = zero_logits
        try:
            uniform = run()
        finally:
            for model in (trainer.model, trainer.ref_model):
                del model.forward
    finally:
        module.dpo_loss_tensor = original
    return logps, np.rint(-uniform / math.log(vocabulary)).astype(int)


def _verdict(result: dict, diff, repo: Path) -> int:
    """Print the table; exit 0 only when every pair's four log-probs match the SFT computation within TOLERANCE.
    A pair is unscored where the policy's or the reference's sums miss any reply token."""
    expected, scored, rows = result["expected_tokens"], result["scored_tokens"], result["rows"]
    pairs = len(rows)
    missing = rows[(scored < np.concatenate([expected, expected], axis=1)).any(axis=1)]
    bad = rows[(diff > TOLERANCE).any(axis=1)]
    worst = float(diff.max())
    print(f"DPO handoff check: {repo} ({result['state']}), SFT model {result['model']}")
    limit = f" (pairs over max_len {result['max_len']} among them)" if result["state"] == "installed" else ""
    print(f"  rows read {result['rows_read']} from {result['data']}; pairs compared {pairs}; not compared: "
          f"{result['dropped_by_repo_builder']} dropped by the repo's data builder{limit}, "
          f"{result['dropped_by_sft_builder']} by SFT's")
    print(f"  {'':36}{'chosen':>18}{'rejected':>18}")
    for label, columns in (("reply tokens scored (policy)", (0, 1)), ("reply tokens scored (reference)", (2, 3))):
        cells = [f"{scored[:, c].sum():,} of {expected[:, side].sum():,}" for side, c in enumerate(columns)]
        print(f"  {label:36}{cells[0]:>18}{cells[1]:>18}")
    print(f"  {'pairs missing reply tokens':36}{len(missing):>18} of {pairs}")
    print(f"  {'max |log-prob - SFT log-prob|':36}{worst:>18.3g}   (tolerance {TOLERANCE:g}, "
          f"pairs over it {len(bad)})")
    if not len(bad) and not len(missing):
        print(f"ok: the training loss scores every reply token of {pairs} pairs with its prompt, as SFT trained "
              f"(max difference {worst:.2g})")
        return 0
    fix = (f"fix: python dpo_handoff.py install --dpo-repo {repo}" if result["state"] == "upstream" else
           "the installed loss still differs: report it with this output")
    print(f"check failed: the training loss scores {scored.sum():,} of {2 * expected.sum():,} reply tokens "
          f"(policy and reference); {len(missing)} of {pairs} pairs miss reply tokens (rows {_rows(missing)} of "
          f"--data, 0-based); {len(bad)} pairs differ from the SFT log-probs by up to {worst:.4g} (rows {_rows(bad)}); "
          f"{fix}", file=sys.stderr)
    return 1


def _rows(rows) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:12])
    return (shown + f", ... ({len(rows)} in all)") if len(rows) > 12 else shown or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="does the repo's DPO training loss score what SFT trained?")
    install_cmd = commands.add_parser("install", help="make the repo's training loss and rows match SFT")
    uninstall_cmd = commands.add_parser("uninstall", help="put back the repo's files as they were")
    for command in (check_cmd, install_cmd, uninstall_cmd):
        command.add_argument("--dpo-repo", type=Path, required=True, help="the dynamic-dpo-v1 checkout")
    for command in (install_cmd, uninstall_cmd):
        command.add_argument("--discard-changes", action="store_true",
                             help="overwrite files the handoff wrote that were edited since (their edits are lost)")
    check_cmd.add_argument("--model", type=Path, required=True, help="the folder train_sft.py saved")
    check_cmd.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else "Anthropic/hh-rlhf",
                           help="preference rows, HH text (chosen/rejected) or TRL's conversational preference "
                                "pairs (chosen/rejected message lists, an optional shared prompt): a "
                                ".jsonl(.gz)/.json/.parquet file or a Hub id (default: %(default)s)")
    check_cmd.add_argument("-n", "--rows", type=int, default=64, help="rows to read (default: %(default)s)")
    check_cmd.add_argument("--batch-size", type=int, default=4,
                           help="pairs per forward; the numbers do not depend on it (default: %(default)s)")
    check_cmd.add_argument("--report", type=Path, help="also write the per-pair numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            return install(args.dpo_repo.resolve(), discard_changes=args.discard_changes)
        if args.command == "uninstall":
            return uninstall(args.dpo_repo.resolve(), discard_changes=args.discard_changes)
        if min(args.rows, args.batch_size) < 1:
            raise HandoffError("-n/--rows and --batch-size must be at least 1")
        return check(args.dpo_repo.resolve(), args.model, args.data, args.rows, args.batch_size, args.report)
    except (HandoffError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
