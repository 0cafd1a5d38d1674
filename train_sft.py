"""Supervised fine-tuning on Anthropic HH: the reference model for the DPO stage.

    python train_sft.py --config config_dpo.yaml            # the real run (reads the `sft_training` section)
    python train_sft.py --config config_dpo.yaml --dry-run  # ~10 steps on a small slice, then artifact checks
    python train_sft.py --demo                              # offline: tiny local Llama + the shipped sample

Stages of `main()`: config -> tokenizer -> data -> model -> trainer -> train -> save -> push.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import get_args, get_type_hints

import yaml

logger = logging.getLogger("train_sft")

PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
DPO_SECTIONS = ("ref_name", "dpo_training", "risk_test", "beta_update", "margin_log")  # read by the DPO stage only


# ----------------------------------------------------------------------------------------------------------------
# Config: typed sections of config_dpo.yaml. Unknown keys, wrong types and out-of-range values are errors.
# ----------------------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """Bad input found before anything heavy is loaded; reported as one line, exit code 2."""


def _check(min=None, max=None, above=None, below=None, choices=None):  # noqa: A002 (names read like the rule)
    return {"min": min, "max": max, "above": above, "below": below, "choices": choices}


@dataclass
class DatasetConfig:
    """The `dataset` section, shared with the DPO stage."""

    dataset_name: str = "Anthropic/hh-rlhf"  # Hub id, or a local .jsonl/.jsonl.gz/.json/.parquet file or folder
    subset: str = "train[:100%]"  # split expression
    val_ratio: float = field(default=0.1, metadata=_check(above=0, below=1))
    seed: int = 42  # seed of the train/eval split
    max_len: int = field(default=512, metadata=_check(min=1))  # DPO's max length (SFT uses sft_training.max_length)


@dataclass
class SFTTrainingConfig:
    """The `sft_training` section. Every key maps onto TRL's `SFTConfig` (see `build_sft_config`)."""

    learning_rate: float = field(default=5e-6, metadata=_check(above=0))
    batch_size: int = field(default=16, metadata=_check(min=1))  # per device
    eval_batch_size: int = field(default=16, metadata=_check(min=1))
    epochs: float = field(default=1.0, metadata=_check(above=0))
    gradient_accumulation: int = field(default=1, metadata=_check(min=1))
    global_batch_size: int | None = field(default=None, metadata=_check(min=1))  # sets gradient_accumulation
    max_length: int = field(default=512, metadata=_check(min=8))
    warmup_steps: int = field(default=120, metadata=_check(min=0))
    lr_scheduler_type: str = field(default="cosine", metadata=_check(choices=SCHEDULERS))
    weight_decay: float = field(default=0.0, metadata=_check(min=0))
    max_grad_norm: float = field(default=1.0, metadata=_check(above=0))
    gradient_checkpointing: bool = False
    packing: bool = False  # BFD-pack conversations into full rows (padding-free); default: length-grouped batches
    attn_implementation: str | None = field(default=None, metadata=_check(choices=ATTENTION))  # None: sdpa
    use_liger_kernel: bool = False  # Liger's Triton kernels (GPU, needs liger-kernel)
    torch_compile: bool = False
    log_steps: int = field(default=10, metadata=_check(min=1))
    eval_steps: int | None = field(default=None, metadata=_check(min=1))  # None: same as save_steps
    save_steps: int = field(default=500, metadata=_check(min=1))
    save_total_limit: int | None = field(default=2, metadata=_check(min=1))
    save_only_model: bool = False  # False: checkpoints hold optimizer/scheduler/RNG, so a resume is exact
    save_dir: str = "sft_model"
    seed: int = 42
    dataset_num_proc: int | None = field(default=None, metadata=_check(min=1))
    wandb_project: str | None = "hh-llama32-1b-sft"  # null: no W&B
    run_name: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = "W-61/hh-llama32-1b-sft"


@dataclass
class Config:
    """The parts of config_dpo.yaml this script reads."""

    policy_name: str
    precision: str
    dataset: DatasetConfig
    sft_training: SFTTrainingConfig


def load_config(path: str) -> Config:
    """Read and validate the YAML file; raise ConfigError naming the key on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping of sections")
    known = ("policy_name", "precision", "dataset", "sft_training", *DPO_SECTIONS)
    _reject_unknown(raw, known, "top level")
    for key in ("policy_name", "dataset", "sft_training"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key '{key}'")
    sft = raw["sft_training"]
    if isinstance(sft, dict) and sft.get("global_batch_size") is not None and "gradient_accumulation" in sft:
        raise ConfigError("sft_training: set global_batch_size or gradient_accumulation, not both")
    precision = str(raw.get("precision", "fp32")).lower()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {raw['precision']!r}")
    return Config(
        policy_name=_coerce("policy_name", raw["policy_name"], str),
        precision=precision,
        dataset=_section(DatasetConfig, raw["dataset"], "dataset"),
        sft_training=_section(SFTTrainingConfig, raw["sft_training"], "sft_training"),
    )


def _reject_unknown(values: dict, known, where: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint}")


def _section(cls, values, name: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: must be a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, list(fields), f"'{name}'")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = f"{name}.{key}"
        value = _coerce(where, value, hints[key])
        _check_range(where, value, fields[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(where: str, value, hint):
    """Check `value` against a type hint; numbers written as strings ("5e-7", read so by YAML 1.1) are accepted."""
    optional = type(None) in get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    kind = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str) and value.strip():
            return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _check_range(where: str, value, rule) -> None:
    if value is None or not rule:
        return
    if rule["choices"] is not None and value not in rule["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(rule['choices'])}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value}")
    bounds = (("min", "at least", lambda v, b: v >= b), ("max", "at most", lambda v, b: v <= b),
              ("above", "greater than", lambda v, b: v > b), ("below", "less than", lambda v, b: v < b))
    for key, words, ok in bounds:
        if rule[key] is not None and not ok(value, rule[key]):
            raise ConfigError(f"{where}: must be {words} {rule[key]}, got {value}")


def apply_global_batch(cfg: Config) -> Config:
    """With `global_batch_size`, derive gradient_accumulation from it and the number of processes, so a recipe
    keeps its hyperparameters when moved from 1 GPU to 8."""
    t = cfg.sft_training
    if t.global_batch_size is None:
        return cfg
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = t.batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(f"sft_training.global_batch_size: {t.global_batch_size} is not a multiple of batch_size "
                          f"{t.batch_size} x {world} process(es)")
    return dataclasses.replace(cfg, sft_training=dataclasses.replace(
        t, gradient_accumulation=t.global_batch_size // per_step))


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
    name = cfg.dataset.dataset_name
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".gz", ".json", ".parquet"))
    if looks_local and not os.path.exists(name):
        raise ConfigError(f"dataset.dataset_name: no such file or folder: {name}")


def _require(module: str, message: str) -> None:
    import importlib.util

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


def load_pretrained(kind: str, name: str, split: str | None = None):
    """Load the tokenizer or the raw dataset; any failure becomes a one-line ConfigError."""
    try:
        if kind == "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(name)
        import data_process_sft as dp

        return dp.load_raw_dataset(name, split)
    except Exception as e:  # noqa: BLE001 (hub, file and format errors alike: one line, exit 2)
        hint = (" If it is a gated model (Llama), accept its licence on the Hub and run `huggingface-cli login` "
                "or set HF_TOKEN." if kind == "tokenizer" else "")
        first_line = (redact(str(e)).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise ConfigError(f"cannot load the {kind} {name}: {first_line}.{hint}") from None


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL_FILES = ("model.safetensors", "config.json", "generation_config.json", "metrics.json", "trainer_state.json")


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
    init = dict(project=t.wandb_project, name=t.run_name, config=dataclasses.asdict(cfg), id=run_id,
                resume="allow" if run_id else None)
    try:
        run = wandb.init(**init, settings=wandb.Settings(init_timeout=90))
    except Exception as e:  # noqa: BLE001 (network, auth or server trouble: keep training, log offline)
        print(f"W&B unreachable ({type(e).__name__}), logging offline; {sync_hint}")
        os.environ["WANDB_MODE"] = "offline"
        run = wandb.init(**init, mode="offline")
    with open(id_file, "w", encoding="utf-8") as f:
        f.write(run.id)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------
def prepare_tokenizer(tokenizer):
    """Give a base Llama-3 tokenizer what SFT needs: the Llama-3 chat template and a pad token that is not eot.

    The template is TRL's `llama3.jinja` (TRL recognises it and maps it to its training variant). The pad
    token is `<|finetune_right_pad_id|>` where the vocabulary has it (Llama-3.1+), else the first reserved
    special token (Llama-3.0): never `<|eot_id|>`, which must stay a trained stop token.
    """
    from trl.chat_template_utils import llama3_chat_template

    if not tokenizer.chat_template:
        tokenizer.chat_template = llama3_chat_template
    if tokenizer.pad_token is None or tokenizer.pad_token == "<|eot_id|>":
        vocab = tokenizer.get_vocab()
        reserved = sorted((t for t in vocab if re.fullmatch(r"<\|reserved_special_token_\d+\|>", t)),
                          key=lambda t: int(re.search(r"\d+", t).group()))
        candidates = ["<|finetune_right_pad_id|>", *reserved]
        pad = next((t for t in candidates if t in vocab), None)
        if pad is None:
            raise ConfigError("the tokenizer has no <|finetune_right_pad_id|> or reserved token to pad with")
        tokenizer.pad_token = pad
    missing = [t for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise ConfigError(f"the tokenizer lacks the Llama-3 chat tokens {', '.join(missing)}")
    return tokenizer


def load_model(name: str, attn_implementation: str | None = None):
    """Load the policy with fp32 master weights; bf16/fp16 run as autocast in the trainer.

    Pure-bf16 weights would make AdamW drop every update smaller than ~0.4% of a weight: at an SFT
    learning rate of 5e-6 that is most of them. Saved weights are cast to `precision` (see save_final_model).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation=attn_implementation)
    model.config.use_cache = False  # no KV cache while training; turned back on in the saved config
    return model


def build_random_llama(out_dir: str, tokenizer, **shape) -> str:
    """Save a random-weight Llama with `tokenizer` as a base-model folder (tests, demo, benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
    dims.update(shape)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **dims)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
def build_sft_config(cfg: Config, *, max_steps: int = -1):
    """Map the `sft_training` section onto TRL's SFTConfig (one place, every key)."""
    import torch
    from trl import SFTConfig

    t = cfg.sft_training
    eval_steps = t.eval_steps or t.save_steps
    return SFTConfig(
        output_dir=t.save_dir,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        num_train_epochs=t.epochs,
        max_steps=max_steps,
        gradient_accumulation_steps=t.gradient_accumulation,
        max_length=t.max_length,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        packing=t.packing,  # TRL: padding-free BFD batches (position_ids, no attention_mask)
        remove_unused_columns=False,  # keep `length` for our sampler; our columns are exactly what is needed
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, labelled, truncated (and packed) by us
        use_liger_kernel=t.use_liger_kernel,
        torch_compile=t.torch_compile,
        logging_steps=t.log_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps" if max_steps < 0 else "no",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=t.save_only_model,
        seed=t.seed,
        data_seed=t.seed,
        dataset_num_proc=t.dataset_num_proc,
        report_to=["wandb"] if t.wandb_project else [],
        run_name=t.run_name,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        push_to_hub=False,  # pushed once, after the final save (see push_final_model)
        hub_model_id=t.hub_model_id,
        eos_token="<|eot_id|>",
    )


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; raised before the optimizer step, so no checkpoint holds the damage."""


def make_trainer_class():
    """SFTTrainer plus what a long unattended run needs and TRL lacks:

    - `eval_accuracy`: next-token accuracy over ALL assistant tokens of the eval set. TRL logs
      `eval_mean_token_accuracy`, a mean of per-batch accuracies (short batches weigh as much as long ones).
    - length-grouped training batches (`LengthGroupedSampler`) whenever the dataset has a `length` column.
    - SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and stop; `stopped_by`
      names the signal. A second signal ends the process at once. (transformers' JIT checkpoint handles
      SIGTERM only, and saves in the middle of a step.)
    - a NaN/inf loss stops the run with `NonFiniteLoss` naming the step.
    """
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from data_process_sft import read_columns

    class SaveAndStopOnSignal(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if self.trainer.stopped_by:
                control.should_save = control.should_training_stop = True

    class Trainer(SFTTrainer):
        _eval_hits = 0.0
        _eval_tokens = 0
        stopped_by: str | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(SaveAndStopOnSignal(self))

        def train(self, *args, **kwargs):
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                return super().train(*args, **kwargs)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _on_signal(self, signum, frame):
            self.stopped_by = signal.Signals(signum).name
            signal.signal(signum, signal.SIG_DFL)
            logger.warning("%s received: saving a checkpoint after this step, then stopping", self.stopped_by)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(f"the training loss became {loss.item()} at step {self.state.global_step + 1}")
            return loss

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if "length" not in getattr(dataset, "column_names", ()):
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(read_columns(dataset, "length")["length"].tolist(),
                                        self.args.per_device_train_batch_size,
                                        seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self.model.training:
                labels = inputs["labels"]
                n = self.accelerator.gather_for_metrics((labels[:, 1:] != -100).sum()).sum().item()
                self._eval_hits += self._metrics["eval"]["mean_token_accuracy"][-1] * n
                self._eval_tokens += n
            return result

        def log(self, logs, start_time=None):
            if "eval_loss" in logs and self._eval_tokens:
                logs["eval_accuracy"] = self._eval_hits / self._eval_tokens
                self._eval_hits, self._eval_tokens = 0.0, 0
            super().log(logs, start_time)

    return Trainer


class LengthGroupedSampler:
    """Batches of whole conversations of similar length, in random order (the default, non-packing path).

    Random megabatches of 50 batches are sorted by length and cut into batches; the full batches of each
    megabatch are then shuffled (a short tail batch goes last, so batch boundaries never shift). Ours rather
    than transformers' `group_by_length`, which caps a megabatch at a quarter of the data (93% padding
    efficiency on 1.5k HH conversations, 97% here) and leaves each megabatch's batches in descending length
    order. The order depends only on seed and epoch, so a resumed run sees the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int, megabatch: int = 50):
        self.lengths, self.batch_size, self.megabatch = list(lengths), batch_size, megabatch
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.megabatch
        for begin in range(0, len(order), size):
            group = sorted(order[begin: begin + size], key=self.lengths.__getitem__, reverse=True)
            batches = [group[i: i + self.batch_size] for i in range(0, len(group), self.batch_size)]
            tail = batches.pop() if len(batches[-1]) < self.batch_size else []
            for b in torch.randperm(len(batches), generator=generator).tolist():
                yield from batches[b]
            yield from tail


# ----------------------------------------------------------------------------------------------------------------
# Save and push
# ----------------------------------------------------------------------------------------------------------------
def save_final_model(trainer, tokenizer, save_dir: str, precision: str) -> None:
    """Save weights in the run's precision, the tokenizer with its template and pad token, and a generation
    config that stops at <|eot_id|> (the base model stops only at <|end_of_text|>).

    Atomic per file: written to a temporary folder, then each file renamed into save_dir, so a crash while
    saving leaves the previous files whole, never a half-written model.safetensors."""
    import torch

    model = trainer.model
    model.config.use_cache = True
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = [i for i in dict.fromkeys([eot, tokenizer.eos_token_id]) if i is not None]
    model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):  # sharded: as gathered
        model.to(dtype)
    staging = os.path.join(save_dir, ".final-model-tmp")
    main_process = trainer.is_world_process_zero()
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)  # every process takes part (sharded weights are gathered); the main one writes
    if main_process:
        for name in sorted(os.listdir(staging), key=lambda n: n == "model.safetensors"):  # weights last
            os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
        shutil.rmtree(staging)
    trainer.save_state()  # trainer_state.json: every logged number


def push_final_model(save_dir: str, hub_model_id: str) -> None:
    """Upload the final model folder as saved (with our model card), unattended, from the main process only."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(hub_model_id, exist_ok=True)
    api.upload_folder(repo_id=hub_model_id, folder_path=save_dir, commit_message="SFT reference model for DPO",
                      ignore_patterns=["checkpoint-*", ".final-model-tmp/*", "wandb_run_id", "training_args.bin"])


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config_dpo.yaml", help="YAML file with an sft_training section")
    parser.add_argument("--dry-run", action="store_true", help="~10 steps on a small slice, no W&B/push, checks")
    parser.add_argument("--demo", action="store_true", help="offline demo: tiny local Llama + shipped sample")
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh: delete save_dir's checkpoints instead of resuming, train over a saved model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()

    # --- config and pre-flight: every failure here is one line and exit 2, before any model is loaded ------
    try:
        if args.demo:
            args.config = demo_config_path()
        cfg = load_config(args.config)
        if args.demo:
            build_demo_base_model(cfg.policy_name)
        if args.dry_run:
            cfg = dry_run_config(cfg)
        cfg = apply_global_batch(cfg)
        check_before_loading(cfg)
        t = cfg.sft_training

        import torch
        from accelerate import PartialState

        # several processes: the main one prepares save_dir and the data cache first (gloo on CPU, as use_cpu)
        state = PartialState(cpu=not torch.cuda.is_available())
        if not state.is_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        with state.main_process_first():
            if state.is_main_process:
                resume_from = prepare_save_dir(t.save_dir, overwrite=args.overwrite or args.dry_run or args.demo)
                check_disk_space(cfg)
            else:
                resume_from = last_complete_checkpoint(t.save_dir)

            # --- tokenizer ----------------------------------------------------------------------------------
            import data_process_sft as dp

            tokenizer = prepare_tokenizer(load_pretrained("tokenizer", cfg.policy_name))

            # --- data ---------------------------------------------------------------------------------------
            raw = load_pretrained("dataset", cfg.dataset.dataset_name, cfg.dataset.subset)
            if "chosen" not in raw.column_names:
                raise ConfigError(f"dataset {cfg.dataset.dataset_name} has no 'chosen' column")
            if args.dry_run:
                raw = raw.select(range(min(len(raw), dry_run_rows(cfg))))
            collator = dp.CompletionOnlyCollator(tokenizer)
            data, report = dp.build_sft_dataset(raw, tokenizer, max_length=t.max_length,
                                                num_proc=t.dataset_num_proc, collator=collator, return_report=True)
            if len(data) < 2:
                raise ConfigError(f"fewer than 2 usable rows in {cfg.dataset.dataset_name} ({report.summary()})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = data.train_test_split(test_size=cfg.dataset.val_ratio, seed=cfg.dataset.seed)
    train_data, eval_data = (batches_ready(split[s], t.packing, t.max_length) for s in ("train", "test"))

    # --- model ----------------------------------------------------------------------------------------------
    model = load_model(cfg.policy_name, t.attn_implementation)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id

    # --- trainer --------------------------------------------------------------------------------------------
    sft_config = build_sft_config(cfg, max_steps=10 if args.dry_run else -1)
    start_wandb(cfg, resume_from)
    trainer = make_trainer_class()(
        model=model, args=sft_config, data_collator=None if t.packing else collator, processing_class=tokenizer,
        train_dataset=train_data, eval_dataset=eval_data,
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        print_start_summary(cfg, trainer, report, split, len(train_data))
    if resume_from and main_process:
        print(f"Resuming from {resume_from} (step {checkpoint_step(resume_from)}); --overwrite starts fresh")

    # --- train ----------------------------------------------------------------------------------------------
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLoss as e:
        last = last_complete_checkpoint(t.save_dir)
        print(f"error: {e}; stopped. Last good checkpoint: {last or 'none'}. Lower learning_rate or check the "
              "data, then run the same command (it resumes from that checkpoint) or add --overwrite.",
              file=sys.stderr)
        return 1
    if trainer.stopped_by:
        print(f"Stopped by {trainer.stopped_by} at step {trainer.state.global_step}; checkpoint saved in "
              f"{last_complete_checkpoint(t.save_dir)}. Resume with the same command: "
              f"python {' '.join(sys.argv)}", file=sys.stderr)
        return 128 + signal.Signals[trainer.stopped_by].value
    final_eval = trainer.evaluate() if args.dry_run or not _just_evaluated(trainer) else {}

    # --- save -----------------------------------------------------------------------------------------------
    import sft_report

    save_final_model(trainer, tokenizer, t.save_dir, cfg.precision)
    metrics = sft_report.write_metrics(cfg, trainer, report, split, train_result, final_eval, time.time() - start)
    if not main_process:
        return 0
    held_out = split["test"].select(range(min(4, len(split["test"]))))["messages"]
    sft_report.write_report(cfg, trainer, tokenizer, held_out, metrics)
    print(f"Saved the SFT model to {os.path.abspath(t.save_dir)}")
    print(f"  train loss {metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']:.4f}, "
          f"eval accuracy {metrics['eval_accuracy']:.4f}")

    # --- push -----------------------------------------------------------------------------------------------
    if t.push_to_hub:
        try:
            push_final_model(t.save_dir, t.hub_model_id)
        except Exception as e:  # noqa: BLE001 (any failure: the local model is saved, say how to push later)
            reason = (redact(str(e)).strip().splitlines() or [""])[0]
            print(f"error: push to {t.hub_model_id} failed ({type(e).__name__}: {reason}). "
                  f"The model is saved in {os.path.abspath(t.save_dir)}; push it later with: "
                  f"huggingface-cli upload {t.hub_model_id} {t.save_dir} .", file=sys.stderr)
            return 1
        print(f"Pushed to https://huggingface.co/{t.hub_model_id}")

    if args.dry_run:
        return dry_run_checks(t.save_dir)
    if args.demo:
        demo_reply(t.save_dir)
    return 0


def batches_ready(data, packing: bool, max_length: int):
    """Columns the trainer reads: `input_ids`, `labels` and `length` (length-grouped sampling), or with
    packing, rows of up to max_length tokens made by TRL's best-fit-decreasing packer (`seq_lengths` marks
    where each conversation starts, so none attends to another)."""
    from trl.data_utils import pack_dataset

    if not packing:
        return data.select_columns(["input_ids", "labels", "length"])
    return pack_dataset(data.select_columns(["input_ids", "labels"]), max_length, "bfd")


def _just_evaluated(trainer) -> bool:
    history = trainer.state.log_history
    last_eval = max((h["step"] for h in history if "eval_loss" in h), default=-1)
    return last_eval == trainer.state.global_step


def print_start_summary(cfg: Config, trainer, report, split, n_train_rows: int) -> None:
    t = cfg.sft_training
    world = trainer.args.world_size
    global_batch = t.batch_size * t.gradient_accumulation * world
    steps = trainer.args.max_steps if trainer.args.max_steps > 0 else \
        math.ceil(math.ceil(n_train_rows / global_batch) * t.epochs)
    rows = f" packed into {n_train_rows} rows of <= {t.max_length} tokens" if t.packing else ""
    print(f"SFT of {cfg.policy_name} ({cfg.precision}) on {cfg.dataset.dataset_name} [{cfg.dataset.subset}]\n"
          f"  data: {report.summary()}\n"
          f"  train {len(split['train'])} / eval {len(split['test'])} conversations{rows}, "
          f"max_length {t.max_length}, {'packing' if t.packing else 'length-grouped batches'}\n"
          f"  global batch {global_batch}{' rows' if t.packing else ''} = batch_size {t.batch_size} x "
          f"gradient_accumulation {t.gradient_accumulation} x {world} process(es); ~{steps} optimizer steps\n"
          f"  W&B: {t.wandb_project or 'off'}; checkpoints and final model: {t.save_dir}")


# ----------------------------------------------------------------------------------------------------------------
# --dry-run and --demo
# ----------------------------------------------------------------------------------------------------------------
def dry_run_config(cfg: Config) -> Config:
    """Same pipeline, 10 steps, no W&B, no push, saved to a folder of its own."""
    t = dataclasses.replace(cfg.sft_training, wandb_project=None, push_to_hub=False, warmup_steps=0,
                            save_dir=cfg.sft_training.save_dir.rstrip("/") + "_dry_run", eval_steps=10)
    return dataclasses.replace(cfg, sft_training=t)


def dry_run_rows(cfg: Config) -> int:
    t = cfg.sft_training
    train_rows = 10 * t.batch_size * t.gradient_accumulation
    return math.ceil(train_rows / (1 - cfg.dataset.val_ratio)) + 2 * t.eval_batch_size


def dry_run_checks(save_dir: str) -> int:
    """The plan's artifact and reload checks, as a short report; non-zero exit if any fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checks = {f: os.path.isfile(os.path.join(save_dir, f)) for f in
              ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json")}
    try:
        AutoModelForCausalLM.from_pretrained(save_dir)
        tokenizer = AutoTokenizer.from_pretrained(save_dir)
        checks["model and tokenizer reload"] = True
        checks["chat template and pad token saved"] = bool(tokenizer.chat_template) and tokenizer.pad_token is not None
    except (OSError, ValueError) as e:
        checks[f"model and tokenizer reload ({e})"] = False
    with open(os.path.join(save_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    checks["finite train and eval loss"] = all(math.isfinite(metrics[k]) for k in ("train_loss", "eval_loss"))
    print("Dry-run checks:")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


def demo_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_demo.yaml")


def build_demo_base_model(model_dir: str) -> None:
    """A base-Llama-3-like folder built offline: a small BPE tokenizer trained on the shipped sample (with the
    Llama-3 special tokens, no chat template, no pad token) and a random-weight tiny Llama."""
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    import data_process_sft as dp

    rows = dp.load_raw_dataset(os.path.join(os.path.dirname(demo_config_path()), "data", "hh_sample.jsonl"), "train")
    tokenizer = train_llama3_style_tokenizer((r for r in rows["chosen"] if isinstance(r, str)), vocab_size=2000)
    build_random_llama(model_dir, tokenizer, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    print(f"Built a tiny random-weight base Llama at {model_dir}")


def train_llama3_style_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with Llama-3's special tokens and BOS added like Llama-3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def demo_reply(save_dir: str) -> None:
    """Reload the saved model and print its greedy reply to one question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir)
    question = [{"role": "user", "content": "How do I keep my tomato plants healthy?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"Reloaded {save_dir}.\nUser: {question[0]['content']}\nAssistant: {reply.strip()}")


if __name__ == "__main__":
    sys.exit(main())
