"""Hand the SFT model to dynamic-dpo-v1 (SeanYHan888/dynamic-dpo-v1) so that its DPO loss scores what SFT trained.

Run in the DPO repo's environment (its uv.lock: transformers 4.57.3, trl 0.26.2):

    python dpo_handoff.py check --dpo-repo PATH --model SFT_DIR [--data FILE] [-n ROWS]
    python dpo_handoff.py install --dpo-repo PATH
    python dpo_handoff.py uninstall --dpo-repo PATH

Why: upstream's `RiskBetaDPOTrainer.compute_loss` runs the policy and the reference on `chosen_input_ids` /
`rejected_input_ids`, which in TRL 0.26 hold the reply alone (the prompt is in `prompt_input_ids`), then masks the
first `len(prompt)` positions of that reply: most pairs score no token. `check` measures that pair by pair;
`install` makes the repo's training loss take its log-probs from TRL's own `concatenated_forward` on the
chat-format rows SFT trained on.

What `install` puts in the DPO repo (its training.py and risk_dpo_trainer.py then import these three):
    build_dpo_pairs(raw, tok, max_length)        HH rows -> rows TRL 0.26 tokenizes exactly as SFT did; pairs
                                                 over max_length dropped and counted, so TRL never cuts one
    dpo_length_args(max_length)                  the DPOConfig length keys that go with them
    trl_sequence_logps(trainer, model, inputs)   policy and reference log-probs of prompt + reply, from TRL
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "hh-rlhf" / "harmless-base-test.first1500.jsonl.gz"
TOLERANCE = 1e-3  # summed fp32 log-probs differ by ~1e-4 between batchings; the reply-only bug is off by hundreds
MARK = "# hh-sft handoff"
BACKUP_SUFFIX = ".hh-sft-backup"
# Our modules that training.py needs there (data_process_sft.py replaces the repo's file of that name; its
# train_sft.py, the only importer of the old one, becomes a pointer to ours).
COPIED = ("dpo_handoff.py", "data_process_sft.py", "sft_readiness.py", "sft_config.py", "run_env.py", "model_io.py")


class HandoffError(Exception):
    """Bad input or a DPO repo of a shape we do not know: one `error:` line, exit 2."""


# --- used inside the DPO repo after `install` --------------------------------------------------------------------
def build_dpo_pairs(raw, tokenizer, max_length: int):
    """The DPO rows of `raw` as SFT tokenized them (build_dpo_dataset), pairs over `max_length` tokens dropped;
    prints what was kept and dropped."""
    from data_process_sft import build_dpo_dataset

    pairs, report = build_dpo_dataset(raw, tokenizer, max_length=max_length, return_report=True)
    print(f"DPO data (hh-sft chat format, max_length {max_length}): {report.summary()}")
    return pairs


def dpo_length_args(max_length: int) -> dict:
    """DPOConfig keys for rows from build_dpo_pairs: TRL 0.26's defaults keep the last 512 prompt tokens (cutting
    the BOS and first turns of long prompts); every pair already fits `max_length`, so nothing is cut."""
    return {"max_length": max_length, "max_prompt_length": None, "max_completion_length": None}


def trl_sequence_logps(trainer, model, inputs) -> tuple:
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs of each reply and
    its eos given its prompt, computed as TRL's own DPO loss does (concatenated_forward; the reference pass, or
    the precomputed reference log-probs when `precompute_ref_log_probs` is on)."""
    policy = trainer.concatenated_forward(model, inputs)
    if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(inputs)
    return policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected


# --- install / uninstall: edits to the DPO repo's files ----------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """Lines of a DPO-repo file from `first` to `last` (one line when `last` is None; matched without trailing
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
         (f"from dpo_handoff import build_dpo_pairs, dpo_length_args  {MARK} (was: build_HH_dataset)",)),
    Edit("training.py", "hh_ds = build_HH_dataset(raw_ds)",
         (f'hh_ds = build_dpo_pairs(raw_ds, tok, max_length=int(config["dataset"]["max_len"]))  {MARK}',)),
    Edit("training.py", "output_dir=dpo_train_args['save_dir'],",
         ("{keep}", f'**dpo_length_args(int(config["dataset"]["max_len"])),  {MARK}')),
    Edit("risk_dpo_trainer.py", "from trl import DPOTrainer",
         ("{keep}", f"from dpo_handoff import trl_sequence_logps  {MARK}")),
    Edit("risk_dpo_trainer.py", "# policy chosen and response output (needs grads)",
         (f"{MARK}: log-probs of prompt + reply (with its eos) from TRL's concatenated_forward, not of",
          "# the reply alone with its first len(prompt) tokens masked (what this block did before)",
          "policy_chosen_log_prob, policy_rejected_log_prob, ref_chosen_log_prob, ref_rejected_log_prob = (",
          "    trl_sequence_logps(self, model, inputs))"),
         last="ref_rejected_log_prob = compute_log_prob(logits=ref_rejected_out, labels=rejected_labels)",
         max_lines=80),
)

POINTER = '''"""This repo's SFT stage is hh-sft's train_sft.py (`python train_sft.py --config config_dpo.yaml` in
the hh-sft repo, which reads the same sft_training section). `dpo_handoff.py install` put this pointer here because its
data_process_sft.py (the DPO rows as SFT tokenized them) replaced the one this script imported. The previous
script is train_sft.py{suffix}; `python dpo_handoff.py uninstall --dpo-repo .` puts everything back."""

import sys

print("error: SFT runs from the hh-sft repo: python /path/to/hh-sft/train_sft.py --config config_dpo.yaml "
      "(this repo's previous script: train_sft.py{suffix})", file=sys.stderr)
sys.exit(2)
'''.replace("{suffix}", BACKUP_SUFFIX)


class RepoFile:
    """A text file of the DPO repo, read with its line endings (upstream uses CRLF) and written back with them."""

    def __init__(self, path: Path):
        self.path = path
        raw = path.read_bytes()
        self.crlf = b"\r\n" in raw
        self.lines = raw.decode("utf-8").replace("\r\n", "\n").split("\n")

    def state(self, edit: Edit) -> str:
        """"installed" (our line is there), "upstream" (the lines it replaces are there, once) or "unknown"."""
        stripped = [line.strip() for line in self.lines]
        if edit.marker in stripped:
            return "installed"
        return "upstream" if len(self._spans(stripped, edit)) == 1 else "unknown"

    def apply(self, edit: Edit) -> None:
        (start, end), = self._spans([line.strip() for line in self.lines], edit)
        indent = self.lines[start][: len(self.lines[start]) - len(self.lines[start].lstrip())]
        self.lines[start:end] = [self.lines[start] if line == "{keep}" else indent + line for line in edit.new]

    def to_bytes(self) -> bytes:
        return "\n".join(self.lines).replace("\n", "\r\n" if self.crlf else "\n").encode("utf-8")

    @staticmethod
    def _spans(stripped: list[str], edit: Edit) -> list[tuple[int, int]]:
        spans = []
        for start in (i for i, line in enumerate(stripped) if line == edit.first):
            if edit.last is None:
                spans.append((start, start + 1))
            elif edit.last in stripped[start: start + edit.max_lines]:
                spans.append((start, stripped.index(edit.last, start) + 1))
        return spans


def _require_repo(repo: Path) -> None:
    for name in ("training.py", "risk_dpo_trainer.py", "config_dpo.yaml"):
        if not (repo / name).is_file():
            raise HandoffError(f"{repo} is not a dynamic-dpo-v1 checkout (no {name})")


def read_repo(repo: Path) -> tuple[dict[str, RepoFile], str]:
    """The files EDITS change, and whether the repo is "upstream" or "installed"; anything else is refused."""
    _require_repo(repo)
    files = {name: RepoFile(repo / name) for name in dict.fromkeys(e.path for e in EDITS)}
    states = {e: files[e.path].state(e) for e in EDITS}
    for edit, state in states.items():
        if state == "unknown":
            what = f"'{edit.first}'" + (f" ... '{edit.last}'" if edit.last else "")
            raise HandoffError(f"{repo / edit.path} is not a shape this handoff knows (expected {what} once; "
                               f"another upstream commit?): nothing was changed")
    if len(set(states.values())) > 1:
        raise HandoffError(f"{repo} is partly changed by an earlier install: restore it with "
                           f"`python dpo_handoff.py uninstall --dpo-repo {repo}` (or git checkout), then install")
    return files, next(iter(states.values()))


def _backup(path: Path) -> None:
    """Keep the file as it was before the first install (a later install never overwrites that copy)."""
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if path.is_file() and not backup.exists():
        shutil.copy2(path, backup)


def install(repo: Path) -> int:
    files, state = read_repo(repo)
    changes = []
    if state == "upstream":
        for edit in EDITS:
            files[edit.path].apply(edit)
        for name, file in files.items():
            _backup(file.path)
            file.path.write_bytes(file.to_bytes())
            changes.append(f"{name}: edited (lines marked '{MARK}')")
    wanted = {name: (HERE / name).read_bytes() for name in COPIED} | {"train_sft.py": POINTER.encode()}
    for name, content in wanted.items():
        path = repo / name
        if path.is_file() and path.read_bytes() == content:
            continue
        _backup(path)
        existed = path.is_file()
        path.write_bytes(content)
        changes.append(f"{name}: " + ("pointer to hh-sft's train_sft.py" if name == "train_sft.py" else
                                      "updated" if existed and state == "installed" else
                                      "replaced by hh-sft's" if existed else "added"))
    if not changes:
        print(f"already installed in {repo}: nothing changed")
        return 0
    print(f"Installed the hh-sft DPO handoff in {repo}:")
    print("\n".join(f"  {line}" for line in changes))
    print(f"  previous files kept as NAME{BACKUP_SUFFIX}; undo: python dpo_handoff.py uninstall --dpo-repo {repo}")
    return 0


def uninstall(repo: Path) -> int:
    _require_repo(repo)
    restored = []
    for name in dict.fromkeys([*(e.path for e in EDITS), *COPIED, "train_sft.py"]):
        path = repo / name
        backup = path.with_name(name + BACKUP_SUFFIX)
        if backup.is_file():
            os.replace(backup, path)
            restored.append(f"{name}: restored")
        elif name in COPIED and path.is_file() and path.resolve() != Path(__file__).resolve():  # added by us
            path.unlink()
            restored.append(f"{name}: removed")
    print(f"Uninstalled from {repo}:" if restored else f"nothing to undo in {repo}")
    print("\n".join(f"  {line}" for line in restored))
    return 0


# --- check: does the repo's training loss score what SFT trained? ------------------------------------------------
LOGP_KEYS = ("policy_chosen_log_prob", "policy_rejected_log_prob", "ref_chosen_log_prob", "ref_rejected_log_prob")


def check(repo: Path, model_dir: Path, data: str, rows: int, batch_size: int, report_path: Path | None) -> int:
    """Build the repo's trainer as its training.py does (its trainer class, its data builder and DPOConfig
    length keys as installed or not, policy and reference from the SFT folder, fp32), run its training loss on
    the first `rows` HH rows, and compare the log-probs it passes to its DPO loss with the SFT computation."""
    _, state = read_repo(repo)
    _require_dpo_stack()
    if not (model_dir / "config.json").is_file():
        raise HandoffError(f"--model {model_dir}: no config.json (expected the folder train_sft.py saved)")
    from data_process_sft import build_dpo_dataset, load_hh_rows
    from sft_config import ConfigError

    try:
        raw = load_hh_rows(data, f"train[:{rows}]")
    except ConfigError as e:
        raise HandoffError(str(e)) from None

    import numpy as np
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import DPOConfig

    import sft_readiness as sr

    _quiet_libraries()
    config = yaml.safe_load((repo / "config_dpo.yaml").read_text(encoding="utf-8"))
    max_len = int(config["dataset"]["max_len"])
    sys.path.append(str(repo))  # the repo's trainer modules; ours come first on the path
    module = importlib.import_module("risk_dpo_trainer")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    built = _repo_rows(state, raw, tokenizer, max_len)
    reference = {row["row"]: row for row in build_dpo_dataset(raw)}
    compared = [i for i in built if i in reference]
    if not compared:  # (a loss over no batch has nothing to compare)
        raise HandoffError(f"none of the first {rows} HH rows of {data} gives a pair that both the repo's data "
                           "builder and SFT's keep: read more rows with -n")
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch_size, report_to=[], bf16=False, fp16=False,
                         remove_unused_columns=False, **(dpo_length_args(max_len) if state == "installed" else {}))
        policy, ref_model = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
        trainer = module.RiskBetaDPOTrainer(
            model=policy.eval(), ref_model=ref_model.eval(), args=args, processing_class=None,
            train_dataset=Dataset.from_list([built[i] for i in compared]),
            dynamic_cfg=module.RiskBetaDPOConfig(log_margins=False))
        for printer in (PrinterCallback, ProgressCallback):  # its per-step dpo/* logs: the table is the output
            trainer.remove_callback(printer)
        got, scored = _loss_logps(trainer, module, batch_size)
        replies = sr.reply_sequences(tokenizer, [reference[i] for i in compared], max_length=sys.maxsize)
        want = sr.reply_logps(trainer.model, replies, tokenizer.pad_token_id, batch_size=batch_size)
    _, sequences, starts = replies
    expected_tokens = np.array([len(s) - start for s, start in zip(sequences, starts)]).reshape(-1, 2)
    want = np.stack([want["chosen_sum"], want["rejected_sum"]] * 2, axis=1)
    result = {"repo": str(repo), "state": state, "model": str(model_dir), "data": data, "rows_read": len(raw),
              "rows": np.array(compared, dtype=int), "expected_tokens": expected_tokens, "scored_tokens": scored,
              "expected_logps": want, "loss_logps": got,
              "dropped_by_repo_builder": len(raw) - len(built), "dropped_by_sft_builder": len(built) - len(compared)}
    if report_path:
        import json

        report_path.write_text(json.dumps(result, indent=1, default=np.ndarray.tolist), encoding="utf-8")
    return _verdict(result, np.abs(got - want), repo)


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
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

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

    def zero_logits(_module, _args, output):
        output.logits = torch.zeros_like(output.logits)
        return output

    module.dpo_loss_tensor = capture
    try:
        logps = run()
        hooks = [model.register_forward_hook(zero_logits) for model in (trainer.model, trainer.ref_model)]
        try:
            uniform = run()
        finally:
            for hook in hooks:
                hook.remove()
    finally:
        module.dpo_loss_tensor = original
    vocabulary = trainer.model.get_output_embeddings().weight.shape[0]
    return logps, np.rint(-uniform / math.log(vocabulary)).astype(int)


def _verdict(result: dict, diff, repo: Path) -> int:
    """Print the table; exit 0 only when every pair's four log-probs match the SFT computation within TOLERANCE."""
    expected, scored, rows = result["expected_tokens"], result["scored_tokens"], result["rows"]
    pairs = len(rows)
    nothing, bad = rows[(scored == 0).all(axis=1)], rows[(diff > TOLERANCE).any(axis=1)]
    worst = float(diff.max())
    print(f"DPO handoff check: {repo} ({result['state']}), SFT model {result['model']}")
    print(f"  HH rows read {result['rows_read']} from {result['data']}; pairs compared {pairs} (dropped by the repo's "
          f"data builder {result['dropped_by_repo_builder']}, by SFT's {result['dropped_by_sft_builder']})")
    print(f"  {'':36}{'chosen':>18}{'rejected':>18}")
    for label, columns in (("reply tokens scored (policy)", (0, 1)), ("reply tokens scored (reference)", (2, 3))):
        cells = [f"{scored[:, c].sum():,} of {expected[:, side].sum():,}" for side, c in enumerate(columns)]
        print(f"  {label:36}{cells[0]:>18}{cells[1]:>18}")
    print(f"  {'pairs scoring no reply token':36}{len(nothing):>18} of {pairs}")
    print(f"  {'max |log-prob - SFT log-prob|':36}{worst:>18.3g}   (tolerance {TOLERANCE:g}, "
          f"pairs over it {len(bad)})")
    if not len(bad):
        print(f"ok: the training loss scores every reply token of {pairs} pairs with its prompt, as SFT trained "
              f"(max difference {worst:.2g})")
        return 0
    fix = (f"fix: python dpo_handoff.py install --dpo-repo {repo}" if result["state"] == "upstream" else
           "the installed loss still differs: report it with this output")
    print(f"check failed: the training loss scores {scored.sum():,} of {2 * expected.sum():,} reply tokens "
          f"(policy and reference); {len(nothing)} of {pairs} pairs score none (HH rows {_rows(nothing)}); "
          f"{len(bad)} pairs differ from the SFT log-probs by up to {worst:.4g} (rows {_rows(bad)}); {fix}",
          file=sys.stderr)
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
    check_cmd.add_argument("--model", type=Path, required=True, help="the folder train_sft.py saved")
    check_cmd.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else "Anthropic/hh-rlhf",
                           help="HH rows: a .jsonl(.gz)/.json/.parquet file or a Hub id (default: %(default)s)")
    check_cmd.add_argument("-n", "--rows", type=int, default=64, help="HH rows to read (default: %(default)s)")
    check_cmd.add_argument("--batch-size", type=int, default=4,
                           help="pairs per forward; the numbers do not depend on it (default: %(default)s)")
    check_cmd.add_argument("--report", type=Path, help="also write the per-pair numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            return install(args.dpo_repo.resolve())
        if args.command == "uninstall":
            return uninstall(args.dpo_repo.resolve())
        if min(args.rows, args.batch_size) < 1:
            raise HandoffError("-n/--rows and --batch-size must be at least 1")
        return check(args.dpo_repo.resolve(), args.model, args.data, args.rows, args.batch_size, args.report)
    except HandoffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
