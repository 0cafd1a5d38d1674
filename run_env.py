"""Pre-flight and the run's surroundings: everything that must fail in seconds, before a model is loaded.

    check_stack()            refuse a transformers/trl outside the supported range (e.g. the DPO repo's env)
    check_before_loading()   cross-key and environment checks of a valid config (local paths, Hub reachability)
    loading(kind, name)      any load failure -> one ConfigError line (with the offline route named)
    check_disk_space(), disk_full(), start_wandb(), hub_token(), redact(), reachable(), sharding_requested()
    size(), rerun_command()  bytes and the command line, as the messages print them
The save_dir contract (what is ours, complete, damaged, finished; what may be deleted) is save_dir_contract.py.

Imports nothing heavy at module level: train_sft imports this before torch.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import socket
import sys
from urllib.parse import urlparse

import hh_sft_chat as chat
from save_dir_contract import run_file, size
from sft_config import Config, ConfigError

DEMO_BASE = "./demo_run/base_model"  # config_demo.yaml's policy_name, built by `python train_sft.py --demo`

# Major versions this stage runs on (tested: transformers 5.24.0, trl 1.16.0). It uses transformers 5 names
# (`dtype=`, `activation_checkpointing`) and TRL 1.x's SFTTrainer internals.
SUPPORTED = {"transformers": (5, 6), "trl": (1, 2)}


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
                              "run `hf auth login`), so the push would fail after training")
    if train.lora is not None:
        _require("peft", "sft_training.lora needs the peft package (pip install -r requirements.txt)")
        if sharding_requested():
            raise ConfigError("sft_training.lora runs single-process or with DDP (accelerate_configs/ddp.yaml), not "
                              "FSDP/DeepSpeed here: LoRA's trainable state is small enough to copy to every GPU")
    if train.load_best and train.eval_steps and train.save_steps % train.eval_steps:
        raise ConfigError(f"sft_training.load_best needs a checkpoint at evaluations: save_steps ({train.save_steps}) "
                          f"must be a multiple of eval_steps ({train.eval_steps})")
    if train.padding_free and train.packing:
        raise ConfigError("sft_training.padding_free: packing already trains without padding (rows of max_length); "
                          "set one of the two")
    if train.padding_free and train.attn_implementation in ("sdpa", "eager"):
        raise ConfigError(f"sft_training.padding_free runs its own varlen attention (or flash_attention_2/3): "
                          f"leave attn_implementation null instead of {train.attn_implementation}")
    if package := optimizer_package(train.optim):
        _require(package[0], f"sft_training.optim: {train.optim} needs the {package[1]} package (pip install "
                             f"{package[1]}), or use adamw_torch_fused")
    if train.use_liger_kernel:
        _require("liger_kernel", "sft_training.use_liger_kernel: true needs liger-kernel (pip install liger-kernel)")
        _require_gpu("sft_training.use_liger_kernel: true needs a CUDA GPU (Liger's kernels are Triton)")
    if train.attn_implementation in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if train.attn_implementation == "flash_attention_2" else "flash_attn_interface"
        _require(package, f"sft_training.attn_implementation: {train.attn_implementation} needs the {package} "
                          "package (or use sdpa)")
        _require_gpu(f"sft_training.attn_implementation: {train.attn_implementation} needs a CUDA GPU")
    check_local("dataset.dataset_name", cfg.dataset.dataset_name)
    check_data_format(cfg.dataset.dataset_name)
    for i, source in enumerate(train.datasets or ()):
        check_local(f"sft_training.datasets.{i}.dataset_name", source.dataset_name)
        check_data_format(source.dataset_name)
    check_local("policy_name", cfg.policy_name)
    check_apart(train.save_dir, cfg.policy_name)
    check_hub(cfg.policy_name, cfg.dataset.dataset_name, *(source.dataset_name for source in train.datasets or ()))


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
    if name.startswith((".", "/", "~")) or chat.data_file_kind(name):
        return True
    return name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0]))


def check_local(key: str, name: str) -> None:
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        demo = os.path.normpath(name) == os.path.normpath(DEMO_BASE)  # only the demo's own base, when missing
        hint = " (the demo's base model: run `python train_sft.py --demo` first)" if demo else ""
        raise ConfigError(f"{key}: no such file or folder: {name}{hint}")


def optimizer_package(name: str) -> tuple[str, str] | None:
    """(module, pip name) an optimizer of transformers' needs beyond torch; None for torch's own."""
    if "bnb" in name or name.startswith(("paged_", "lion_", "ademamix")) or name == "adamw_8bit":
        return "bitsandbytes", "bitsandbytes"
    prefixes = {"galore": ("galore_torch", "galore-torch"), "apollo": ("apollo_torch", "apollo-torch"),
                "schedule_free": ("schedulefree", "schedulefree"), "lomo": ("lomo_optim", "lomo-optim"),
                "adalomo": ("lomo_optim", "lomo-optim"), "grokadamw": ("grokadamw", "grokadamw"),
                "adamw_torch_4bit": ("torchao", "torchao"), "adamw_torch_8bit": ("torchao", "torchao"),
                "adamw_anyprecision": ("torchdistx", "torchdistx"), "adamw_torch_xla": ("torch_xla", "torch_xla"),
                "adamw_torch_npu": ("torch_npu", "torch-npu"), "stable_adamw": ("optimi", "torch-optimi")}
    return next((package for prefix, package in prefixes.items() if name.startswith(prefix)), None)


def check_data_format(name: str) -> None:
    """A local dataset in none of the formats SFT reads is refused from its first row, in well under a second
    (the full load comes after torch and the tokenizer)."""
    if os.path.exists(name):
        try:
            chat.peek(name)
        except chat.FormatError as e:
            raise ConfigError(f"dataset {name}: {e}") from None


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


OFFLINE_HINT = ("If it is a gated model (Llama), accept its licence on the Hub and run `hf auth login` "
                "or set HF_TOKEN. Offline: point policy_name/dataset_name at local copies and set HF_HUB_OFFLINE=1.")


OFFLINE_SET_HINT = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache: point policy_name/"
                    "dataset_name at a local folder or file, or download it on a machine with network "
                    "(hf download NAME) and copy the cache here.")


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


def rerun_command() -> str:
    """The command that launched this run, quoted so that it pastes into a shell (paths with spaces). Under
    torchrun or `accelerate launch` that is the launcher's command line (a worker's parent, read from /proc):
    pasting the worker's own `python train_sft.py` would start one process where the run had several."""
    command = "python " + shlex.join(sys.argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                return shlex.join([part.decode() for part in f.read().split(b"\0") if part])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same launch command as this run's (each of its processes ran: {command})"
    return command


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
    id_file = run_file(t.save_dir, "wandb_run_id")
    run_id = open(id_file, encoding="utf-8").read().strip() if resume_from and os.path.exists(id_file) else None
    init = dict(project=t.wandb_project, name=t.run_name, config=cfg.to_dict(), id=run_id,
                resume="allow" if run_id else None)
    try:
        run = wandb.init(**init, settings=wandb.Settings(init_timeout=90))
    except Exception as e:  # noqa: BLE001 (network, auth or server trouble: keep training, log offline)
        print(f"W&B unreachable ({type(e).__name__}), logging offline; {sync_hint}")
        os.environ["WANDB_MODE"] = "offline"
        with contextlib.suppress(Exception):  # the failed attempt can still hold the run id in this process's
            wandb.teardown()  # W&B service: the offline retry was refused with "run ID ... is in use"
        run = wandb.init(**init, mode="offline")
    with open(id_file, "w", encoding="utf-8") as f:
        f.write(run.id)
