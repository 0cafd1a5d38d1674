"""The save_dir contract: what a run's folder holds, and the only code that deletes or renames anything in it.

- Ours: a folder is ours when it holds our mark `.hh-sft-run` (written when a run first takes the folder), or, from
  runs before the mark, a metrics.json of ours or a checkpoint with our fingerprint. Any other non-empty folder is
  foreign, whatever its files are called (a `.lock` or a `checkpoint-N` of another tool included): a run writes
  there only with --overwrite, and then only our names.
- A `checkpoint-N` that is not a real folder (a file, a symbolic link) is never ours: the run is refused naming it,
  and nothing is deleted through a link.
- A checkpoint (checkpoint-N) is complete when its trainer_state.json and our fingerprint sft_run.json (written
  last) read whole; an incomplete one (a kill while saving) is removed at the next start.
- A complete checkpoint is damaged when a file does not open whole, or a resume would lack what it needs (the
  weights; optimizer.pt and scheduler.pt unless the run saved model only): it is set aside as
  damaged-checkpoint-N (a name the Trainer's rotation never deletes), kept until the user deletes it, and named
  at every start; the run resumes from the newest checkpoint that is whole.
- A resume needs the same run-defining settings (run_fingerprint, the optimizer and scheduler type among them);
  learning rate, warmup, epochs/max_steps, logging and saving may change.
- A run is finished when save_dir holds model.safetensors and metrics.json (written last, after the samples,
  curves and card); publishing new weights removes the earlier metrics.json first, so weights newer than their
  report never pass for a finished run. A finished folder is never trained over without --overwrite, which
  removes our names and starts from step 0; a finished run whose checkpoints were kept continues from the newest when
  the key its length comes from grows (sft_training.max_steps when set, else epochs); a checkpoint past that length
  is refused; weights without metrics.json (a kill in the report) are finished from the last
  checkpoint.
- When a run finishes, its resume state (checkpoint-N, training_args.bin) is removed unless keep_checkpoints, and
  its lock (.lock; the kernel drops it when the process dies) is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass

from sft_config import Config, ConfigError

MARK = ".hh-sft-run"
FINGERPRINT_FILE = "sft_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE = "damaged-"  # damaged-checkpoint-N: a name the Trainer's checkpoint rotation (checkpoint-*) never deletes
STAGING = ".final-model-tmp"  # the final save is written here, then each file renamed into save_dir (publish)


@dataclass(frozen=True)
class RunFile:
    """One name a run writes into save_dir besides checkpoints. --overwrite removes every one (no file of an older
    run is ever left beside new weights); `model` files make the folder DPO loads (the dry run checks them);
    `pushed` ones go to the Hub."""

    name: str
    written_by: str
    model: bool = False
    pushed: bool = True


# save_dir's files, the one list: writers name their file through run_file(), --overwrite, the Hub push and the dry
# run read it here.
SAVE_DIR_FILES = (
    RunFile("model.safetensors", "model_io.save_final_model (published last)", model=True),
    RunFile("model.safetensors.index.json", "model_io.save_final_model (sharded weights)"),
    RunFile("config.json", "model_io.save_final_model", model=True),
    RunFile("generation_config.json", "model_io.save_final_model (stops at <|eot_id|>)", model=True),
    RunFile("tokenizer.json", "model_io.save_final_model", model=True),
    RunFile("tokenizer_config.json", "model_io.save_final_model"),
    RunFile("special_tokens_map.json", "model_io.save_final_model (older tokenizers)"),
    RunFile("chat_template.jinja", "model_io.save_final_model", model=True),
    RunFile("adapter", "model_io.save_final_model (LoRA: the adapter beside the merged weights)"),
    RunFile("training_args.bin", "the Trainer (resume state)", pushed=False),
    RunFile("trainer_state.json", "the Trainer (final save)"),
    RunFile("samples_during_training.jsonl", "sft_trainer.SampleReplies (each evaluation)"),
    RunFile("wandb_run_id", "run_env.start_wandb (a resume continues the W&B run)", pushed=False),
    RunFile("samples.jsonl", "sft_report.write_report"),
    RunFile("training_curves.png", "sft_report.write_report"),
    RunFile("readiness_margins.png", "sft_report.card_parts"),
    RunFile("README.md", "sft_report.card_parts (the model card)"),
    RunFile("metrics.json", "sft_report.save_metrics (written last: the run finished)"),
)
RUN_FILES = tuple(f.name for f in SAVE_DIR_FILES)
MODEL_FILES = tuple(f.name for f in SAVE_DIR_FILES if f.model)
OURS = "hh-sft train_sft.py"  # metrics.json's `written_by`: the report is ours


def run_file(save_dir: str, name: str) -> str:
    """The path of one of save_dir's files; a name missing from SAVE_DIR_FILES is a programming error here, not a
    file --overwrite would leave behind or the push would upload unnoticed."""
    if name not in RUN_FILES:
        raise KeyError(f"{name} is not in save_dir_contract.SAVE_DIR_FILES")
    return os.path.join(save_dir, name)


def hub_ignore_patterns() -> list[str]:
    """What the Hub push leaves out: resume state, bookkeeping, set-aside checkpoints, unpushed run files."""
    return ["checkpoint-*", f"{STAGING}/*", ".lock", MARK, f"{SET_ASIDE}*",
            *(f.name for f in SAVE_DIR_FILES if not f.pushed)]


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
SHARDED = ("pytorch_model_fsdp", "global_step")  # FSDP / DeepSpeed checkpoint layouts: their own files


def size(n_bytes: float) -> str:
    """Bytes in GiB, or in MiB under 1 GiB (a small model's need is not "0.0 GiB")."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def checkpoint_dir(save_dir: str, step: int) -> str:
    """The folder the Trainer saves step `step` in (its PREFIX_CHECKPOINT_DIR naming, which CHECKPOINT matches)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(save_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(path)).group(1))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_complete(checkpoint: str) -> bool:
    """The Trainer writes trainer_state.json last, then our callback the run's fingerprint (sft_run.json): a
    checkpoint without both, readable, was cut short (resumed, it could mix two runs' settings unchecked)."""
    try:
        for name in ("trainer_state.json", FINGERPRINT_FILE):
            read_json(os.path.join(checkpoint, name))
        return True
    except (OSError, ValueError):
        return False


def damage(checkpoint: str) -> str | None:
    """Why a complete checkpoint cannot be resumed (None: it can): a file that does not open whole (read cheaply: a
    .safetensors file's header and size agree, a torch .pt/.bin file (a zip) has its central directory), or a file
    a resume needs that is missing."""
    names = sorted(os.listdir(checkpoint))
    for name in names:
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                with open(path, "rb") as f:
                    header_len = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if os.path.getsize(path) != 8 + header_len + end:
                    return f"{name} does not open whole"
            elif name.endswith((".pt", ".bin", ".pth")):
                zipfile.ZipFile(path).close()
        except (OSError, ValueError, struct.error, zipfile.BadZipFile, KeyError):
            return f"{name} does not open whole"
    if any(name.startswith(SHARDED) for name in names):
        return None
    if not any(name in names for name in WEIGHTS):
        return "it holds no model weights"
    model_only = read_json(os.path.join(checkpoint, FINGERPRINT_FILE)).get("sft_training.save_only_model")
    missing = [name for name in ("optimizer.pt", "scheduler.pt") if name not in names]
    if missing and model_only is False:
        return f"no {' or '.join(missing)}: a resume would restart AdamW and the schedule"
    return None


def last_complete_checkpoint(save_dir: str) -> str | None:
    if not os.path.isdir(save_dir):
        return None
    found = [os.path.join(save_dir, d) for d in os.listdir(save_dir)
             if CHECKPOINT.match(d) and not os.path.islink(os.path.join(save_dir, d))]
    complete = [c for c in found if _is_complete(c)]
    return max(complete, key=checkpoint_step) if complete else None


def is_ours(save_dir: str) -> bool:
    """Our mark (or our staging folder), or (runs before the mark) a metrics.json of ours or a checkpoint with our
    fingerprint. A `.lock` is no mark: other tools lock their folders too."""
    if any(os.path.exists(os.path.join(save_dir, name)) for name in (MARK, STAGING)):
        return True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        report = read_json(os.path.join(save_dir, "metrics.json"))
        if report.get("written_by") == OURS or "tokens_trained" in report:  # (tokens_trained: runs before the field)
            return True
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return any(CHECKPOINT.match(n) and os.path.isfile(os.path.join(save_dir, n, FINGERPRINT_FILE)) for n in names)


def foreign_files(save_dir: str) -> list[str]:
    """The entries of a non-empty save_dir that is not ours ([] when it is missing, empty or ours)."""
    names = sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []
    return [] if not names or is_ours(save_dir) else names


_LOCKS: dict[str, object] = {}  # save_dir -> its open lock file, held until this process exits, however it exits


def lock_save_dir(save_dir: str) -> None:
    """An exclusive lock on save_dir for this run's main process. The kernel drops it when the process dies,
    so a killed run leaves no stale lock; a second run on the same folder is refused naming the first."""
    path = os.path.realpath(os.path.join(save_dir, ".lock"))
    if path in _LOCKS:
        return
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"sft_training.save_dir: {save_dir} is in use by a running train_sft.py ({holder}); "
                          "wait for it, or set another save_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
    handle.flush()
    _LOCKS[path] = handle


def unlock_save_dir(save_dir: str, remove: bool = False) -> None:
    """Release this process's lock on save_dir (a finished run, with `remove` its .lock file too; tests)."""
    path = os.path.realpath(os.path.join(save_dir, ".lock"))
    handle = _LOCKS.pop(path, None)
    if handle is not None:
        if remove:
            os.remove(path)
        handle.close()


def prepare_save_dir(save_dir: str, overwrite: bool, epochs: int | None = None,
                     max_steps: int | None = None) -> str | None:
    """Lock save_dir, mark it ours, and return the checkpoint to resume from (None: start fresh); see the module
    docstring. The run's length (sft_training.max_steps when set, else epochs) decides whether a finished run with
    kept checkpoints continues, and refuses a checkpoint already past it."""
    if not overwrite and (foreign := foreign_files(save_dir)):
        raise ConfigError(f"sft_training.save_dir: {save_dir} holds files that train_sft.py did not write "
                          f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); pass --overwrite to "
                          "write this run's files there (files of other names are left alone), or set another save_dir")
    try:
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, MARK), "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"sft_training.save_dir: {save_dir} is not writable ({e.strerror})") from None
    lock_save_dir(save_dir)
    checkpoints = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if CHECKPOINT.match(d)]
    for path in checkpoints:
        if os.path.islink(path) or not os.path.isdir(path):
            kind = "a symbolic link" if os.path.islink(path) else "not a folder"
            raise ConfigError(f"sft_training.save_dir: {path} is {kind}, so not a checkpoint train_sft.py wrote; "
                              "move it out of save_dir (nothing was deleted), or set another save_dir")
    if overwrite:
        for path in checkpoints + [os.path.join(save_dir, STAGING)]:
            shutil.rmtree(path, ignore_errors=True)
        for name in RUN_FILES:
            _remove(os.path.join(save_dir, name))
        return None
    for path in sorted(checkpoints, key=checkpoint_step):
        if not _is_complete(path):
            print(f"Removing incomplete checkpoint {path} (the run was killed while writing it)")
            shutil.rmtree(path)
        elif (why := damage(path)) is not None:
            aside = _unused(os.path.join(save_dir, SET_ASIDE + os.path.basename(path)))
            print(f"Setting aside damaged checkpoint {path} ({why}) as {aside}")
            os.replace(path, aside)
    resume_from = last_complete_checkpoint(save_dir)
    if os.path.exists(os.path.join(save_dir, "model.safetensors")):
        resume_from = _finished_run(save_dir, resume_from, epochs, max_steps)
    if resume_from is not None:
        _check_not_past(resume_from, epochs, max_steps)
    return resume_from


def checkpoint_progress(checkpoint: str) -> tuple[int, float]:
    """(optimizer steps, epochs) a checkpoint's weights have, from its trainer_state.json."""
    state = read_json(os.path.join(checkpoint, "trainer_state.json"))
    return int(state.get("global_step") or 0), float(state.get("epoch") or 0.0)


def _check_not_past(checkpoint: str, epochs: int | None, max_steps: int | None) -> None:
    """Refuse a checkpoint that already trained more than this run asks for: resumed, it would hand off a model of
    more steps than the config says (the Trainer never goes back)."""
    try:
        steps, done = checkpoint_progress(checkpoint)
    except (OSError, ValueError, TypeError):  # (read whole before: _is_complete)
        return
    if max_steps and steps > max_steps:
        key, target, have = "max_steps", max_steps, f"step {steps}"
    elif not max_steps and epochs is not None and done > epochs + 1e-6:
        key, target, have = "epochs", epochs, f"epoch {done:g} (step {steps})"
    else:
        return
    raise ConfigError(f"{checkpoint} is at {have}, past this run's sft_training.{key} {target:g}: resuming it "
                      f"would hand off a longer-trained model than the config says; set sft_training.{key} to at "
                      f"least {steps if key == 'max_steps' else f'{done:g}'} (the run that wrote it), or start "
                      "fresh with --overwrite or another save_dir")


def _finished_run(save_dir: str, resume_from: str | None, epochs: int | None, max_steps: int | None) -> str:
    """save_dir holds weights: finish a run cut short in its report, continue a finished one with kept
    checkpoints when the run's length grew (max_steps when set, else epochs), or refuse (saying what --overwrite
    would delete)."""
    metrics = os.path.join(save_dir, "metrics.json")
    if not os.path.exists(metrics):
        if resume_from is None:
            raise ConfigError(f"{save_dir} holds a model but no metrics.json and no checkpoint to finish it from; "
                              "pass --overwrite to train over it, or set another sft_training.save_dir")
        print(f"{save_dir} holds the weights of a run whose final save was cut short: finishing it from "
              f"{resume_from}")
        return resume_from
    key = "max_steps" if max_steps else "epochs"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        done = read_json(metrics)
        steps = int(done["global_step"])
        trained = float(done.get("epochs_trained", done["config"]["sft_training"]["epochs"]))
        have, want = (f"{steps} steps", f"{max_steps} steps") if max_steps else \
            (f"{trained:g} epoch(s)", f"{epochs:g} epochs")
        if resume_from is not None and (max_steps > steps if max_steps else epochs is not None and
                                        epochs > trained + 1e-6):
            print(f"{save_dir} holds a finished run of {have} with its resume state kept: continuing from "
                  f"{resume_from} to {want} (its model is replaced when this run finishes)")
            return resume_from
    if resume_from:
        raise ConfigError(f"{save_dir} already holds a finished model and its kept resume state "
                          f"({os.path.basename(resume_from)}): raise sft_training.{key} to continue from it; "
                          "--overwrite deletes both and trains a new model from step 0; or set another "
                          "sft_training.save_dir")
    raise ConfigError(f"{save_dir} already holds a finished model; --overwrite deletes it and trains a new model "
                      "from step 0, or set another sft_training.save_dir")


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def set_aside(save_dir: str) -> list[str]:
    """The damaged checkpoints set aside in save_dir (named in the start summary until deleted)."""
    return sorted(n for n in os.listdir(save_dir) if n.startswith(SET_ASIDE)) if os.path.isdir(save_dir) else []


def _unused(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def staging_dir(save_dir: str, clear: bool) -> str:
    """The folder the final save is written to (emptied first with `clear`), then published into save_dir."""
    staging = os.path.join(save_dir, STAGING)
    if clear:
        shutil.rmtree(staging, ignore_errors=True)
    return staging


def publish(save_dir: str) -> None:
    """Rename each file of the staging folder into save_dir, the weights last (a crash leaves the previous files
    whole, never a half-written model.safetensors), then remove the staging folder. An earlier run's metrics.json
    goes first: until this run's report is written, the folder is a run whose final save was cut short (the rerun
    finishes it, --readiness refuses it), never the new weights beside the old report."""
    staging = staging_dir(save_dir, clear=False)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(save_dir, "metrics.json"))
    for name in sorted(os.listdir(staging), key=lambda n: n == "model.safetensors"):
        if os.path.isdir(os.path.join(save_dir, name)):  # the adapter of a cut earlier save
            shutil.rmtree(os.path.join(save_dir, name))
        os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
    shutil.rmtree(staging)


def usual_file_modes(folder: str) -> None:
    """Give every file in `folder` the mode a plain open() gives under this process's umask: safetensors writes
    its weights with 0600 whatever the umask, so colleagues on a shared cluster folder could not read them."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_whole(path: str, value: dict, sort_keys: bool = False) -> None:
    """Write a JSON file whole (a temporary file renamed into place): a reader never sees half of it. The one JSON
    writer of save_dir (metrics.json, fingerprints, the config edits of the final save)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    os.replace(path + ".tmp", path)


def tidy_finished(save_dir: str, keep_checkpoints: bool, length_key: str) -> str:
    """Leave a finished save_dir as the DPO stage and the Hub need it: the resume state (checkpoint-N folders
    with optimizer and RNG state, ~14 GB at 1B; training_args.bin) goes unless `keep_checkpoints`, and the run
    lock is released. Returns the line that says what was kept or removed, with its size (and, when kept, the key
    to raise: `length_key`, the one the run's length comes from)."""
    resume = sorted((n for n in os.listdir(save_dir) if CHECKPOINT.match(n)), key=checkpoint_step)
    total = sum(os.path.getsize(os.path.join(root, f)) for n in resume
                for root, _, files in os.walk(os.path.join(save_dir, n)) for f in files)
    if keep_checkpoints:
        line = (f"  resume state kept ({', '.join(resume)}, {size(total)}; sft_training.keep_checkpoints: true): "
                f"raise sft_training.{length_key} and run the same command to continue" if resume else
                "  no resume state to keep")
    else:
        for name in resume:
            shutil.rmtree(os.path.join(save_dir, name))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(save_dir, "training_args.bin"))
        line = (f"  resume state removed ({', '.join(resume)}, {size(total)}); to keep it for more epochs or a "
                "resume, set sft_training.keep_checkpoints: true" if resume else "  no resume state left")
    unlock_save_dir(save_dir, remove=True)
    return line


# Settings whose change makes --readiness score another split or another model than the run's.
READINESS_KEYS = ("policy_name", "dataset.dataset_name", "dataset.subset", "dataset.val_ratio", "dataset.seed",
                  "sft_training.max_length")


def finished_run(save_dir: str, cfg: Config) -> dict:
    """For `--readiness`: the metrics.json of the finished run in save_dir, refused in one line when there is none,
    it does not read, or the config would score another held-out split or model than the run's."""
    if not os.path.isfile(os.path.join(save_dir, "model.safetensors")):
        raise ConfigError(f"sft_training.save_dir: {save_dir} holds no finished model to score; train first")
    path = os.path.join(save_dir, "metrics.json")
    try:
        metrics = read_json(path)
        run = metrics["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} does not read as a finished run's report ({type(e).__name__}); --readiness "
                          "updates that report: rerun the training (it finishes the report), or restore the file") \
            from None
    now = cfg.to_dict()

    def value(config: dict, key: str):
        section, _, name = key.rpartition(".")
        return (config.get(section) or {}).get(name) if section else config.get(name)

    changed = [f"{key} {value(run, key)!r} -> {value(now, key)!r}" for key in READINESS_KEYS
               if value(run, key) != value(now, key)]
    if changed:
        raise ConfigError(f"--readiness scores the held-out split of the run in {save_dir}, but this config differs "
                          f"from that run's ({'; '.join(changed)}): it would score other rows (maybe trained ones); "
                          "use the run's config")
    return metrics


def run_fingerprint(cfg: Config, report, data_digest: str, world_size: int) -> dict:
    """The settings that define a run: a checkpoint resumes only under the same ones, among them what its
    optimizer.pt and scheduler.pt hold (optimizer, weight decay, scheduler type: another optimizer's state does not
    load). Learning rate, warmup, epochs/max_steps, logging and saving may change on resume (they are applied from
    the resumed step on). `data_digest` covers the token ids in row order: reordered or edited rows give another
    train/eval split."""
    t = cfg.sft_training
    return {"policy_name": cfg.policy_name, "precision": cfg.precision, **{f"dataset.{k}": v for k, v in
            cfg.dataset.model_dump().items() if k != "max_len"},
            "data (rows kept, tokens)": [report.rows_kept, report.tokens], "data (token ids, sha256)": data_digest,
            **{f"sft_training.{k}": getattr(t, k) for k in ("max_length", "batch_size", "gradient_accumulation",
                                                             "packing", "seed", "save_only_model",
                                                             "neftune_noise_alpha", "early_stopping_patience",
                                                             "optim", "weight_decay", "lr_scheduler_type")},
            "sft_training.lora": t.lora.model_dump() if t.lora else None,
            "sft_training.datasets": [d.model_dump() for d in t.datasets] if t.datasets else None,
            "processes": world_size}


def check_same_run(checkpoint: str | None, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint written under other run-defining settings, naming what changed."""
    path = os.path.join(checkpoint or "", FINGERPRINT_FILE)
    if checkpoint is None or not os.path.isfile(path):
        return
    saved = read_json(path)
    # (a key an older version did not record is not compared: its checkpoints stay resumable)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in fingerprint.items() if k in saved and saved[k] != v]
    if changed:
        raise ConfigError(f"{checkpoint} was written by a run with other settings ({'; '.join(changed)}); "
                          "resume with the same ones, or start fresh with --overwrite or another save_dir")
