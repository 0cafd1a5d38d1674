"""Pre-flight and the run's surroundings: everything that must fail in seconds, before a model is loaded.

    check_stack()            refuse a transformers/trl outside the supported range (e.g. the DPO repo's env)
    check_before_loading()   cross-key and environment checks of a valid config (local paths, Hub reachability)
    loading(kind, name)      any load failure -> one ConfigError line (with the offline route named)
    prepare_save_dir()       lock save_dir; resume, refuse or start fresh; cut-short checkpoints removed,
                             damaged ones set aside
    run_fingerprint(), check_same_run()   resume only under the settings that define the run
    check_disk_space(), disk_full(), start_wandb(), hub_token(), redact(), reachable(), sharding_requested()
    tidy_finished()          after the run: resume state removed (unless kept) and the lock released
    size(), rerun_command()  bytes and the command line, as the messages print them

Imports nothing heavy at module level: train_sft imports this before torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import struct
import sys
import zipfile
from urllib.parse import urlparse

from sft_config import Config, ConfigError

# Major versions this stage runs on (tested: transformers 5.24.0, trl 1.16.0). It uses transformers 5 names
# (`dtype=`, `activation_checkpointing`, `train_sampling_strategy`) and TRL 1.x's SFTTrainer internals.
SUPPORTED = {"transformers": (5, 6), "trl": (1, 2)}
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def check_stack() -> None:
    """One line naming installed and needed versions, before anything is imported from them."""
    wrong = []
    for package, (low, high) in SUPPORTED.items():
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        major = int(version.split(".")[0]) if version[0].isdigit() else -1
        if not low <= major < high:
            wrong.append(f"{package} {version} (needs >={low},<{high})")
    if wrong:
        raise ConfigError(f"unsupported stack: {', '.join(wrong)}. train_sft.py needs its own environment: "
                          "python -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt "
                          "(the DPO repo's environment only loads the saved model)")


def check_before_loading(cfg: Config) -> None:
    """Cross-key and environment checks that must fail in seconds, before any model or data is loaded."""
    train = cfg.sft_training
    if train.push_to_hub:
        if not train.hub_model_id or not re.fullmatch(r"[\w.-]+/[\w.-]+", train.hub_model_id):
            raise ConfigError(f"sft_training.hub_model_id: expected 'owner/name', got {train.hub_model_id!r}")
        if not hub_token():
            raise ConfigError("sft_training.push_to_hub: true, but there is no Hugging Face token (set HF_TOKEN or "
                              "run `huggingface-cli login`), so the push would fail after training")
    if train.lora is not None:
        _require("peft", "sft_training.lora needs the peft package (pip install -r requirements.txt)")
        if sharding_requested():
            raise ConfigError("sft_training.lora runs single-process or with DDP (accelerate_configs/ddp.yaml), not "
                              "FSDP/DeepSpeed here: LoRA's trainable state is small enough to copy to every GPU")
    if train.use_liger_kernel:
        _require("liger_kernel", "sft_training.use_liger_kernel: true needs liger-kernel (pip install liger-kernel)")
        _require_gpu("sft_training.use_liger_kernel: true needs a CUDA GPU (Liger's kernels are Triton)")
    if train.attn_implementation in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if train.attn_implementation == "flash_attention_2" else "flash_attn_interface"
        _require(package, f"sft_training.attn_implementation: {train.attn_implementation} needs the {package} "
                          "package (or use sdpa)")
        _require_gpu(f"sft_training.attn_implementation: {train.attn_implementation} needs a CUDA GPU")
    check_local("dataset.dataset_name", cfg.dataset.dataset_name)
    check_local("policy_name", cfg.policy_name)
    check_apart(train.save_dir, cfg.policy_name)
    check_hub(cfg.policy_name, cfg.dataset.dataset_name)


def sharding_requested() -> list[str]:
    """What the accelerate config asked for ("FSDP", "DeepSpeed"), from the variables `accelerate launch` sets."""
    return [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
            if os.environ.get(var, "false").lower() == "true"]


def check_apart(save_dir: str, policy_name: str) -> None:
    """save_dir must not be the base model's folder, inside it or around it: a run writes config.json and the
    weights there, and --overwrite deletes them (found before anything is removed)."""
    if not os.path.exists(os.path.expanduser(policy_name)):
        return
    out, base = (os.path.realpath(os.path.expanduser(p)) for p in (save_dir, policy_name))
    where = "is" if out == base else "is inside" if out.startswith(base + os.sep) else \
        "holds" if base.startswith(out + os.sep) else None
    if where:
        raise ConfigError(f"sft_training.save_dir: {save_dir} {where} the base model's folder (policy_name: "
                          f"{policy_name}); a run writes its model files there and --overwrite deletes them: "
                          "set another save_dir")


def looks_local(name: str) -> bool:
    """A path rather than a Hub id (`owner/name`): starts like a path, has a data-file suffix, has more than
    one `/`, or its first part is an existing folder."""
    if name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".gz", ".json", ".parquet")):
        return True
    return name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0]))


def check_local(key: str, name: str) -> None:
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        hint = " (the demo's base model: run `python train_sft.py --demo` first)" if "demo_run" in name else ""
        raise ConfigError(f"{key}: no such file or folder: {name}{hint}")


def _require(module: str, message: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(message)


def _require_gpu(message: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(message)


def hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def redact(text: str) -> str:
    """Text with any credential from the environment masked (error messages can echo request headers)."""
    secrets = [os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")]
    for secret in filter(None, [*secrets, hub_token()]):
        text = text.replace(secret, "***")
    return text


OFFLINE_HINT = ("If it is a gated model (Llama), accept its licence on the Hub and run `huggingface-cli login` "
                "or set HF_TOKEN. Offline: point policy_name/dataset_name at local copies and set HF_HUB_OFFLINE=1.")


OFFLINE_SET_HINT = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache: point policy_name/"
                    "dataset_name at a local folder or file, or download it on a machine with network "
                    "(huggingface-cli download NAME) and copy the cache here.")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def check_hub(*names: str) -> None:
    """Names that are not local need the Hub: one short TCP connect to it instead of the Hub client's minutes
    of retries (skipped with HF_HUB_OFFLINE=1, where the libraries fail fast themselves)."""
    remote = [name for name in names if not os.path.exists(os.path.expanduser(name))]
    if not remote or offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):
        raise ConfigError(f"cannot reach the Hugging Face Hub ({endpoint}) to load {', '.join(remote)}. "
                          f"{OFFLINE_HINT}")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """One TCP connect to the URL's host, in seconds: the Hub and W&B clients retry for minutes."""
    endpoint = urlparse(url)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def loading(kind: str, name: str):
    """Any failure to load `name` (Hub, file or format) becomes one ConfigError line."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (hub, file and format errors alike: one line, exit 2)
        first_line = (redact(str(e)).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        hint = "" if os.path.exists(os.path.expanduser(name)) else f" {OFFLINE_SET_HINT if offline() else OFFLINE_HINT}"
        raise ConfigError(f"cannot load the {kind} {name}: {first_line}.{hint}") from None


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(path)).group(1))


def _is_complete(checkpoint: str) -> bool:
    """The Trainer writes trainer_state.json last, then our callback the run's fingerprint (sft_run.json): a
    checkpoint without both, readable, was cut short (resumed, it could mix two runs' settings unchecked)."""
    try:
        for name in ("trainer_state.json", FINGERPRINT_FILE):
            with open(os.path.join(checkpoint, name), encoding="utf-8") as f:
                json.load(f)
        return True
    except (OSError, ValueError):
        return False


def damaged_file(checkpoint: str) -> str | None:
    """The first file of a checkpoint that does not open whole (None: all do), read cheaply: a .safetensors
    file's header and size must agree, a torch .pt/.bin file (a zip) must have its central directory."""
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                with open(path, "rb") as f:
                    header_len = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if os.path.getsize(path) != 8 + header_len + end:
                    return name
            elif name.endswith((".pt", ".bin", ".pth")):
                zipfile.ZipFile(path).close()
        except (OSError, ValueError, struct.error, zipfile.BadZipFile, KeyError):
            return name
    return None


def last_complete_checkpoint(save_dir: str) -> str | None:
    if not os.path.isdir(save_dir):
        return None
    found = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if CHECKPOINT.match(d)]
    complete = [c for c in found if _is_complete(c)]
    return max(complete, key=checkpoint_step) if complete else None


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


# What a run writes into save_dir besides checkpoints; --overwrite removes them all, so no file of an older
# run is ever left beside new weights.
RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "training_args.bin", "trainer_state.json", "metrics.json", "samples.jsonl", "training_curves.png",
             "readiness_margins.png", "README.md", "wandb_run_id", "adapter")


# Files only a run of ours leaves in save_dir: a non-empty folder with none of them belongs to someone else.
OUR_MARKS = (".lock", "metrics.json", "trainer_state.json", "wandb_run_id", ".final-model-tmp")
SET_ASIDE = "damaged-"  # damaged-checkpoint-N: a name the Trainer's checkpoint rotation (checkpoint-*) never deletes


def prepare_save_dir(save_dir: str, overwrite: bool) -> str | None:
    """Lock save_dir and return the checkpoint to resume from (None: start fresh).

    Never trains over a finished model (weights and metrics.json), nor writes into a non-empty folder that no run
    of ours wrote, without --overwrite; a run killed after its weights were in place (metrics.json is written
    last) is finished from its last checkpoint. Checkpoints a killed run left half-written are removed; damaged
    ones are set aside as damaged-checkpoint-N, kept until the user deletes them."""
    if not overwrite and (foreign := foreign_files(save_dir)):
        raise ConfigError(f"sft_training.save_dir: {save_dir} holds files that train_sft.py did not write "
                          f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); pass --overwrite to "
                          "write this run's files there (files of other names are left alone), or set another save_dir")
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, ".write-test")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"sft_training.save_dir: {save_dir} is not writable ({e.strerror})") from None
    lock_save_dir(save_dir)
    checkpoints = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if CHECKPOINT.match(d)]
    if overwrite:
        for path in checkpoints + [os.path.join(save_dir, ".final-model-tmp")]:
            shutil.rmtree(path, ignore_errors=True)
        for name in RUN_FILES:
            path = os.path.join(save_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        return None
    for path in checkpoints:
        if not _is_complete(path):
            print(f"Removing incomplete checkpoint {path} (the run was killed while writing it)")
            shutil.rmtree(path)
        elif (bad := damaged_file(path)) is not None:
            aside = _unused(os.path.join(save_dir, SET_ASIDE + os.path.basename(path)))
            print(f"Setting aside damaged checkpoint {path} ({bad} does not open whole) as {aside}")
            os.replace(path, aside)
    resume_from = last_complete_checkpoint(save_dir)
    if os.path.exists(os.path.join(save_dir, "model.safetensors")):
        if os.path.exists(os.path.join(save_dir, "metrics.json")) or resume_from is None:
            raise ConfigError(f"{save_dir} already holds a finished model; pass --overwrite to train over it, or "
                              "set another sft_training.save_dir")
        print(f"{save_dir} holds the weights of a run whose final save was cut short: finishing it from "
              f"{resume_from}")
    return resume_from


def foreign_files(save_dir: str) -> list[str]:
    """The entries of a non-empty save_dir that no run of ours wrote ([] when it is missing, empty or ours)."""
    names = sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []
    ours = any(n in OUR_MARKS or CHECKPOINT.match(n) or n.startswith(SET_ASIDE) for n in names)
    return [] if ours else names


def set_aside(save_dir: str) -> list[str]:
    """The damaged checkpoints set aside in save_dir (named in the start summary until deleted)."""
    return sorted(n for n in os.listdir(save_dir) if n.startswith(SET_ASIDE)) if os.path.isdir(save_dir) else []


def _unused(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def tidy_finished(save_dir: str, keep_checkpoints: bool) -> str:
    """Leave a finished save_dir as the DPO stage and the Hub need it: the resume state (checkpoint-N folders
    with optimizer and RNG state, ~14 GB at 1B; training_args.bin) goes unless `keep_checkpoints`, and the run
    lock is released. Returns the line that says what was kept or removed, with its size."""
    resume = sorted(n for n in os.listdir(save_dir) if CHECKPOINT.match(n))
    total = sum(os.path.getsize(os.path.join(root, f)) for n in resume
                for root, _, files in os.walk(os.path.join(save_dir, n)) for f in files)
    if keep_checkpoints:
        line = (f"  resume state kept ({', '.join(resume)}, {size(total)}; sft_training.keep_checkpoints: true)"
                if resume else "  no resume state to keep")
    else:
        for name in resume:
            shutil.rmtree(os.path.join(save_dir, name))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(save_dir, "training_args.bin"))
        line = (f"  resume state removed ({', '.join(resume)}, {size(total)}); to keep it for more epochs or a "
                "resume, set sft_training.keep_checkpoints: true" if resume else "  no resume state left")
    unlock_save_dir(save_dir, remove=True)
    return line


def require_finished_model(save_dir: str) -> None:
    """For `--readiness`: save_dir must hold a finished model."""
    if not os.path.isfile(os.path.join(save_dir, "model.safetensors")):
        raise ConfigError(f"sft_training.save_dir: {save_dir} holds no finished model to score; train first")


def run_fingerprint(cfg: Config, report, data_digest: str, world_size: int) -> dict:
    """The settings that define a run: a checkpoint resumes only under the same ones. Learning rate, schedule,
    epochs, logging and saving may change on resume (they are applied from the resumed step on). `data_digest`
    covers the token ids in row order: reordered or edited rows give another train/eval split."""
    t = cfg.sft_training
    return {"policy_name": cfg.policy_name, "precision": cfg.precision, **{f"dataset.{k}": v for k, v in
            cfg.dataset.model_dump().items() if k != "max_len"},
            "data (rows kept, tokens)": [report.rows_kept, report.tokens], "data (token ids, sha256)": data_digest,
            **{f"sft_training.{k}": getattr(t, k) for k in ("max_length", "batch_size", "gradient_accumulation",
                                                             "packing", "seed", "save_only_model")},
            "sft_training.lora": t.lora.model_dump() if t.lora else None,
            "processes": world_size}


FINGERPRINT_FILE = "sft_run.json"


def check_same_run(checkpoint: str | None, fingerprint: dict) -> None:
    """Refuse to resume a checkpoint written under other run-defining settings, naming what changed."""
    path = os.path.join(checkpoint or "", FINGERPRINT_FILE)
    if checkpoint is None or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(f"{checkpoint} was written by a run with other settings ({'; '.join(changed)}); "
                          "resume with the same ones, or start fresh with --overwrite or another save_dir")


def check_disk_space(cfg: Config) -> None:
    """Enough free disk for save_total_limit + 1 checkpoints (a new one is written before the oldest is deleted)
    and the final model, estimated from the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(cfg.policy_name)
    except Exception:  # noqa: BLE001 (reported when the tokenizer or model load fails, with a clearer message)
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    t = cfg.sft_training
    checkpoint = params * (4 if t.save_only_model else 12)  # fp32 weights (+ AdamW's two fp32 moments)
    final = params * (2 if cfg.precision in ("bf16", "fp16") else 4)
    count = (t.save_total_limit or 2) + 1
    need = checkpoint * count + final
    free = shutil.disk_usage(t.save_dir).free
    if free < need:
        raise ConfigError(f"sft_training.save_dir: {size(free)} free, {count} checkpoints and the final model of "
                          f"{params / 1e9:.2f}B parameters need ~{size(need)}; free space or lower save_total_limit")


def size(n_bytes: float) -> str:
    """Bytes in GiB, or in MiB under 1 GiB (a small model's need is not "0.0 GiB")."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def rerun_command() -> str:
    """The command line of this run, quoted so that it can be pasted into a shell (paths with spaces)."""
    return "python " + shlex.join(sys.argv)


def disk_full(error: BaseException, save_dir: str) -> str | None:
    """The one-line message for an error that is the disk filling up (None: it is something else). torch.save
    reports a full disk as a RuntimeError ("iostream error", "unexpected pos"), so the free space decides."""
    no_space = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or \
        shutil.disk_usage(save_dir).free < 64 * 2**20
    if not no_space:
        return None
    return (f"no space left on device in {os.path.abspath(save_dir)}; free some GiB or lower save_total_limit, "
            "then run the same command (it resumes from the last complete checkpoint)")


def wandb_has_key() -> bool:
    """A W&B API key in the environment or ~/.netrc (read without contacting W&B)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(cfg: Config, resume_from: str | None) -> None:
    """Start the W&B run ourselves (the HF integration then reuses it) so that it never prompts or hangs:
    no API key or no network means offline logging, said in one line. A resumed run continues its W&B run."""
    t = cfg.sft_training
    if not t.wandb_project or int(os.environ.get("RANK", "0")) != 0:
        return
    import wandb

    sync_hint = "sync it later with: wandb sync wandb/offline-run-*"
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if os.environ.get("WANDB_MODE") != "offline" and not wandb_has_key():
        print(f"W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline; {sync_hint}")
        os.environ["WANDB_MODE"] = "offline"
    elif os.environ.get("WANDB_MODE") != "offline" and not reachable(server):
        print(f"W&B: {server} unreachable, logging offline; {sync_hint}")
        os.environ["WANDB_MODE"] = "offline"
    id_file = os.path.join(t.save_dir, "wandb_run_id")
    run_id = open(id_file, encoding="utf-8").read().strip() if resume_from and os.path.exists(id_file) else None
    init = dict(project=t.wandb_project, name=t.run_name, config=cfg.to_dict(), id=run_id,
                resume="allow" if run_id else None)
    try:
        run = wandb.init(**init, settings=wandb.Settings(init_timeout=90))
    except Exception as e:  # noqa: BLE001 (network, auth or server trouble: keep training, log offline)
        print(f"W&B unreachable ({type(e).__name__}), logging offline; {sync_hint}")
        os.environ["WANDB_MODE"] = "offline"
        run = wandb.init(**init, mode="offline")
    with open(id_file, "w", encoding="utf-8") as f:
        f.write(run.id)
