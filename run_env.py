"""Pre-flight and the run's surroundings: everything that must fail in seconds, before a model is loaded.

    check_stack()            refuse a transformers/trl outside the supported range (e.g. the DPO repo's env)
    check_before_loading()   cross-key and environment checks of a valid config
    loading(kind, name)      any load failure -> one ConfigError line (with the offline route named)
    prepare_save_dir()       resume, refuse or start fresh; checkpoints cut short are removed
    check_disk_space(), start_wandb(), hub_token(), redact()

Imports nothing heavy at module level: train_sft imports this before torch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
from urllib.parse import urlparse

from sft_config import Config, ConfigError

# Major versions this stage runs on (tested: transformers 5.24.0, trl 1.16.0). It uses transformers 5 names
# (`dtype=`, `activation_checkpointing`, `train_sampling_strategy`) and TRL 1.x's SFTTrainer internals.
SUPPORTED = {"transformers": (5, 6), "trl": (1, 2)}
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL_FILES = ("model.safetensors", "config.json", "generation_config.json", "metrics.json", "trainer_state.json")


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
    check_hub(cfg.policy_name, cfg.dataset.dataset_name)


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


def check_hub(*names: str) -> None:
    """Names that are not local need the Hub: one short TCP connect to it instead of the Hub client's minutes
    of retries (skipped with HF_HUB_OFFLINE=1, where the libraries fail fast themselves)."""
    remote = [name for name in names if not os.path.exists(os.path.expanduser(name))]
    if not remote or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3.0).close()
    except OSError:
        raise ConfigError(f"cannot reach the Hugging Face Hub ({endpoint.geturl()}) to load {', '.join(remote)}. "
                          f"{OFFLINE_HINT}") from None


@contextlib.contextmanager
def loading(kind: str, name: str):
    """Any failure to load `name` (Hub, file or format) becomes one ConfigError line."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (hub, file and format errors alike: one line, exit 2)
        first_line = (redact(str(e)).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise ConfigError(f"cannot load the {kind} {name}: {first_line}. {OFFLINE_HINT}") from None


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(path)).group(1))


def _is_complete(checkpoint: str) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(save_dir: str) -> str | None:
    if not os.path.isdir(save_dir):
        return None
    found = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if CHECKPOINT.match(d)]
    complete = [c for c in found if _is_complete(c)]
    return max(complete, key=checkpoint_step) if complete else None


def prepare_save_dir(save_dir: str, overwrite: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh). Never trains silently over a finished model;
    removes checkpoints a killed run left half-written, so they are never mistaken for complete ones."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, ".write-test")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"sft_training.save_dir: {save_dir} is not writable ({e.strerror})") from None
    checkpoints = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if CHECKPOINT.match(d)]
    if overwrite:
        for path in checkpoints:
            shutil.rmtree(path)
        for name in FINAL_FILES:
            if os.path.exists(os.path.join(save_dir, name)):
                os.remove(os.path.join(save_dir, name))
        return None
    if os.path.exists(os.path.join(save_dir, "model.safetensors")):
        raise ConfigError(f"{save_dir} already holds a finished model; pass --overwrite to train over it, or set "
                          "another sft_training.save_dir")
    for path in checkpoints:
        if not _is_complete(path):
            print(f"Removing incomplete checkpoint {path} (the run was killed while writing it)")
            shutil.rmtree(path)
    return last_complete_checkpoint(save_dir)


def check_disk_space(cfg: Config) -> None:
    """Enough free disk for one checkpoint and the final model, estimated from the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(cfg.policy_name)
    except Exception:  # noqa: BLE001 (reported when the tokenizer or model load fails, with a clearer message)
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    # fp32 weights (+ AdamW's two fp32 moments unless save_only_model), and the final weights in `precision`
    per_param = (4 if cfg.sft_training.save_only_model else 12) + (2 if cfg.precision in ("bf16", "fp16") else 4)
    need = params * per_param
    free = shutil.disk_usage(cfg.sft_training.save_dir).free
    if free < need:
        raise ConfigError(f"sft_training.save_dir: {free / 2**30:.1f} GiB free, a checkpoint and the final model "
                          f"of {params / 1e9:.2f}B parameters need ~{need / 2**30:.1f} GiB")


def wandb_has_key() -> bool:
    """A W&B API key in the environment or ~/.netrc (read without contacting W&B)."""
    import netrc
    from urllib.parse import urlparse

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
    if os.environ.get("WANDB_MODE") != "offline" and not wandb_has_key():
        print(f"W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline; {sync_hint}")
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
