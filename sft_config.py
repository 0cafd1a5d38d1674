"""The typed schema of config_dpo.yaml (the parts the SFT stage reads) and its loading.

    load_config(path, overrides=["sft_training.learning_rate=1e-5"]) -> Config

Validation is pydantic's (`extra="forbid"`, bounds, choices, lax number parsing so that `5e-7`, a string under
YAML 1.1, is a number). Every problem becomes one `ConfigError` line naming the key path, with the closest known
key suggested for a typo. This module imports no torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import difflib
import os
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict, ValidationError
from pydantic_core import PydanticCustomError

# transformers' optimizer names (TrainingArguments.optim; tests/test_config.py keeps this list equal to theirs)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


class ConfigError(ValueError):
    """Bad input found before anything heavy is loaded; reported as one line, exit code 2."""


def _integral_float(value):
    """YAML reads `1e3` as a float: accept it for an integer key when it is whole."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


Int = Annotated[int, BeforeValidator(_integral_float), Strict()]
Float = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict(), Field(min_length=1, pattern=r"\S")]
# A path key (save_dir; policy_name and dataset_name when local): `~` is the home folder, as in a shell, not a
# folder named `~` in the working directory. A Hub id never starts with `~`.
def _home_folder(path: str) -> str:
    """`~` and `~user` as a shell expands them; an unknown `~user` is refused (expanduser would leave it as is, and
    the run would write into a folder named `~user` in the working directory)."""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = expanded.split("/", 1)[0]
        raise PydanticCustomError("home_folder", f"{user} names no user of this machine (~/ is your home folder)")
    return expanded


PathStr = Annotated[Str, AfterValidator(_home_folder)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# The linear layers of a Llama decoder layer that LoRA can adapt (attention, then MLP).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(Section):
    """`sft_training.lora`: LoRA adapters (peft, through TRL's peft_config) instead of full fine-tuning.
    The final save merges them into an ordinary model folder; the adapter is kept in save_dir/adapter."""

    r: Annotated[Int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[Float, Field(gt=0)] = 32.0
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.05
    target_modules: Annotated[list[Literal[LLAMA_PROJECTIONS]], Field(min_length=1)] = list(LLAMA_PROJECTIONS)


class DatasetConfig(Section):
    """The `dataset` section, shared with the DPO stage."""

    dataset_name: PathStr = "Anthropic/hh-rlhf"  # Hub id, or a local .jsonl/.jsonl.gz/.json/.parquet file or folder
    subset: Str = "train[:100%]"  # split expression
    val_ratio: Annotated[Float, Field(gt=0, lt=1)] = 0.1
    seed: Int = 42  # seed of the train/eval split
    max_len: Annotated[Int, Field(ge=1)] = 512  # DPO's max length (SFT uses sft_training.max_length)


class DatasetSource(Section):
    """One entry of `sft_training.datasets`: a dataset SFT trains on (TRL's `datasets:` list, alignment-handbook's
    `dataset_mixture`, axolotl's `datasets:`)."""

    dataset_name: PathStr  # Hub id, or a local .jsonl/.jsonl.gz/.json/.parquet file or folder
    subset: Str = "train[:100%]"  # split expression
    fraction: Annotated[Float, Field(gt=0, le=1)] = 1.0  # of this source's rows, drawn with the run's seed


class SFTTrainingConfig(Section):
    """The `sft_training` section. Every key maps onto TRL's `SFTConfig` (see sft_trainer.build_sft_config)."""

    learning_rate: Annotated[Float, Field(gt=0)] = 5e-6
    batch_size: Annotated[Int, Field(ge=1)] = 16  # per device
    eval_batch_size: Annotated[Int, Field(ge=1)] = 16
    epochs: Annotated[Float, Field(gt=0, le=1000)] = 1.0
    max_steps: Annotated[Int, Field(ge=1)] | None = None  # optimizer steps; overrides epochs
    optim: Literal[OPTIMIZERS] = "adamw_torch_fused"  # transformers' optimizer name
    gradient_accumulation: Annotated[Int, Field(ge=1)] = 1
    global_batch_size: Annotated[Int, Field(ge=1)] | None = None  # sets gradient_accumulation
    max_length: Annotated[Int, Field(ge=8, le=131072)] = 512
    warmup_steps: Annotated[Int, Field(ge=0)] = 120
    lr_scheduler_type: Literal[SCHEDULERS] = "cosine"
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[Float, Field(gt=0)] = 1.0
    gradient_checkpointing: Bool = False
    packing: Bool = False  # BFD-pack conversations into full rows (padding-free); default: length-grouped batches
    padding_free: Bool = False  # the same batches as the default, concatenated into one row: varlen attention
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = None
    use_liger_kernel: Bool = False  # Liger's Triton kernels (GPU, needs liger-kernel)
    torch_compile: Bool = False
    log_steps: Annotated[Int, Field(ge=1)] = 10
    eval_steps: Annotated[Int, Field(ge=1)] | None = None  # None: same as save_steps
    save_steps: Annotated[Int, Field(ge=1)] = 500
    save_total_limit: Annotated[Int, Field(ge=1)] | None = 2
    save_only_model: Bool = False  # False: checkpoints hold optimizer/scheduler/RNG, so a resume is exact
    keep_checkpoints: Bool = False  # after a finished run: keep checkpoint-N (resume state) in save_dir
    load_best: Bool = False  # the final folder: the checkpoint with the lowest eval loss, not the last step
    early_stopping_patience: Annotated[Int, Field(ge=1)] | None = None  # stop after N evals without improvement
    sample_prompts: Annotated[Int, Field(ge=0, le=64)] = 4  # replies to K held-out prompts at each eval; 0: off
    neftune_noise_alpha: Annotated[Float, Field(gt=0)] | None = None  # NEFTune: noise on input embeddings
    activation_offloading: Bool = False  # TRL's: activations to CPU memory in the backward pass (CUDA only)
    ddp_find_unused_parameters: Bool = False  # DDP: look for parameters without gradient each step (none here)
    lora: LoraSettings | None = None  # null: full fine-tuning
    # null: train on dataset.dataset_name; else these sources, mixed (dataset.* stays the DPO stage's data and what
    # the readiness report scores)
    datasets: Annotated[list[DatasetSource], Field(min_length=1)] | None = None
    readiness_pairs: Annotated[Int, Field(ge=0)] = 512  # held-out DPO pairs scored at the end; 0: off
    save_dir: PathStr = "sft_model"
    seed: Int = 42
    dataset_num_proc: Annotated[Int, Field(ge=1)] | None = None
    wandb_project: Str | None = "hh-llama32-1b-sft"  # null: no W&B
    run_name: Str | None = None
    push_to_hub: Bool = False
    hub_model_id: Str | None = "W-61/hh-llama32-1b-sft"


class Config(Section):
    """The parts of config_dpo.yaml this stage reads; the DPO sections are accepted and left alone."""

    policy_name: PathStr
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    dataset: DatasetConfig
    sft_training: SFTTrainingConfig
    ref_name: Any = None
    dpo_training: Any = None
    risk_test: Any = None
    beta_update: Any = None
    margin_log: Any = None
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def overrides(self) -> tuple[str, ...]:
        """The command-line `section.key=value` overrides applied on top of the file (recorded in metrics.json)."""
        return self._overrides

    def replace(self, **sft_changes) -> Config:
        """A copy with some `sft_training` keys changed (validated like the file)."""
        training = SFTTrainingConfig.model_validate({**self.sft_training.model_dump(), **sft_changes})
        new = self.model_copy(update={"sft_training": training})
        new._overrides = self._overrides
        return new

    def to_dict(self) -> dict:
        """The SFT part of the config as plain values (metrics.json, W&B, model card)."""
        return self.model_dump(include={"policy_name", "precision", "dataset", "sft_training"})


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a second `sft_training:` block would win silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader, local keys win
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate the YAML file; raise ConfigError naming the key on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping of sections")
    for override in overrides:
        _apply_override(raw, override)
    for key in raw:
        if key not in Config.model_fields:
            raise ConfigError(_unknown(key, list(Config.model_fields), "top level"))
    for key in ("policy_name", "dataset", "sft_training"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key '{key}'")
    for section in ("dataset", "sft_training"):
        raw[section] = {} if raw[section] is None else raw[section]
    sft = raw["sft_training"]
    if isinstance(sft, dict) and sft.get("global_batch_size") is not None and "gradient_accumulation" in sft:
        raise ConfigError("sft_training: set global_batch_size or gradient_accumulation, not both")
    if isinstance(raw.get("precision"), str):
        raw["precision"] = raw["precision"].lower()
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e.errors()[0])) from None
    cfg._overrides = tuple(overrides)
    return cfg


def _apply_override(raw: dict, override: str) -> None:
    """`section.key=value` (value parsed as YAML, as in the file) into the raw mapping."""
    path, sep, value = override.partition("=")
    if not sep or not path:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    *sections, key = path.split(".")
    node, model = raw, Config
    for depth, name in enumerate(sections):
        if model is not None:  # a section of ours: its keys are known (the DPO sections are free-form)
            fields = model.model_fields
            if name not in fields:
                raise ConfigError(_unknown(name, list(fields), f"'{sections[depth - 1]}'" if depth else "top level"))
            annotation = fields[name].annotation
            model = _section_model(annotation)
            if model is None and annotation is not Any:
                raise ConfigError(f"override {override!r}: {'.'.join(sections[:depth + 1])} is not a section")
        if node.get(name) is None:  # absent, or null in the file (`lora: null`): the override fills it
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {name} is not a section")
    try:
        node[key] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value is not valid YAML") from None


_BOUNDS = {"greater_than": ("greater than", "gt"), "greater_than_equal": ("at least", "ge"),
           "less_than": ("less than", "lt"), "less_than_equal": ("at most", "le")}
_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a string",
          "value_error": "a number"}  # value_error: _no_bool refused a boolean for a number


def _one_line(error: dict) -> str:
    """One pydantic error as `key.path: what is wrong`, in the words the README uses."""
    loc = [str(part) for part in error["loc"]]
    where, kind, value = ".".join(loc), error["type"], error.get("input")
    if kind == "extra_forbidden":
        *section, key = loc
        where = ".".join(section) if any(part.isdigit() for part in section) else section[-1]  # a list's entry
        return _unknown(key, list(_model_at(section).model_fields), f"'{where}'")
    if kind == "missing":
        *section, key = loc
        return f"missing required key '{key}' in '{'.'.join(section) or 'top level'}'"
    if kind == "model_type":
        return f"{where}: must be a mapping of keys, got {type(value).__name__}"
    if value is None:
        return f"{where}: must not be null"
    if kind == "literal_error":
        return f"{where}: must be one of {error['ctx']['expected'].replace(chr(39), '')}, got {value!r}"
    if kind in _BOUNDS:
        words, ctx_key = _BOUNDS[kind]
        return f"{where}: must be {words} {error['ctx'][ctx_key]}, got {value}"
    if kind == "finite_number":
        return f"{where}: must be finite, got {value}"
    if kind in ("too_short", "too_long"):
        words = "at least" if kind == "too_short" else "at most"
        limit = error.get("ctx", {}).get("min_length" if kind == "too_short" else "max_length")
        return f"{where}: must have {words} {limit} item(s), got {value!r}"
    expected = next((name for prefix, name in _KINDS.items() if kind.startswith(prefix)), None)
    if expected is None:  # any other kind pydantic can raise: its own words, on one line
        return f"{where}: {' '.join(str(error.get('msg', kind)).split())}, got {value!r}"
    return f"{where}: expected {expected}, got {value!r}"


def _model_at(section: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for name in section:
        if name.isdigit():  # an entry of a list of sections (sft_training.datasets.0)
            continue
        model = _section_model(model.model_fields[name].annotation) or model.model_fields[name].annotation
    return model


def _section_model(annotation) -> type[BaseModel] | None:
    """The section class of a field (`DatasetConfig`, or `LoraSettings` out of `LoraSettings | None`); None for a
    plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for a in typing.get_args(annotation) if (model := _section_model(a)) is not None), None)


# The names users bring from other tools for our keys (suggested by meaning, where spelling would point elsewhere:
# `lr` is closest to `lora`), with the tools whose configs use each name.
KNOWN_AS = {
    "lr": ("sft_training.learning_rate", "torchtune"),
    "num_train_epochs": ("sft_training.epochs", "TRL/transformers"),
    "num_epochs": ("sft_training.epochs", "axolotl"),
    "per_device_train_batch_size": ("sft_training.batch_size", "TRL/transformers"),
    "micro_batch_size": ("sft_training.batch_size", "axolotl"),
    "per_device_eval_batch_size": ("sft_training.eval_batch_size", "TRL/transformers"),
    "gradient_accumulation_steps": ("sft_training.gradient_accumulation", "TRL/transformers, axolotl and torchtune"),
    "output_dir": ("sft_training.save_dir", "TRL/transformers, axolotl and torchtune"),
    "max_seq_length": ("sft_training.max_length", "older TRL (now max_length)"),
    "sequence_len": ("sft_training.max_length", "axolotl"),
    "max_seq_len": ("sft_training.max_length", "torchtune"),
    "logging_steps": ("sft_training.log_steps", "TRL/transformers and axolotl"),
    "lr_scheduler": ("sft_training.lr_scheduler_type", "axolotl"),
    "optimizer": ("sft_training.optim", "axolotl and torchtune"),
    "model_name_or_path": ("policy_name", "TRL/transformers"),
    "base_model": ("policy_name", "axolotl"),
    "bf16": ("precision", "TRL/transformers and axolotl"),
}


def key_for(name: str) -> str | None:
    """The dotted config key a bare name means: one of ours (`epochs` -> `sft_training.epochs`) or a name from
    another tool (KNOWN_AS); None when it is neither."""
    name = name.replace("-", "_")
    if name in Config.model_fields:
        return name
    sections = [f"{section}.{name}" for section, field in Config.model_fields.items()
                if name in getattr(_section_model(field.annotation), "model_fields", ())]
    return sections[0] if sections else KNOWN_AS.get(name, (None,))[0]


def flag_as_key(args: list[str], flags: set[str]) -> str | None:
    """How a config key given as a flag (`--learning_rate 1e-5`, as TRL scripts take it) is set here; None when no
    argument is one."""
    for i, token in enumerate(args):
        flag, _, inline = token.partition("=")
        if token.startswith("--") and flag not in flags and (key := key_for(flag[2:])):
            value = inline or (args[i + 1] if i + 1 < len(args) else "VALUE")
            return f"{flag} is not an option here: config keys are set as section.key=value, e.g. {key}={value}"
    return None


def _unknown(key: str, known: list[str], where: str) -> str:
    if str(key) in KNOWN_AS:
        ours, tools = KNOWN_AS[key]
        return f"unknown key '{key}' in {where} (did you mean '{ours}'? '{key}' is its name in {tools})"
    close = difflib.get_close_matches(str(key), known, n=1)
    if not close and where == "top level":  # `epochs=1` on the command line: the key of a section
        close = [f"{name}.{key}" for name, field in Config.model_fields.items()
                 if key in getattr(_section_model(field.annotation), "model_fields", ())]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}' in {where}{hint}"


def apply_global_batch(cfg: Config, world_size: int) -> Config:
    """With `global_batch_size`, derive gradient_accumulation from it and the number of processes, so a recipe
    keeps its hyperparameters when moved from 1 GPU to 8."""
    t = cfg.sft_training
    if t.global_batch_size is None:
        return cfg
    per_step = t.batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"sft_training.global_batch_size: {t.global_batch_size} is not a multiple of batch_size "
                          f"{t.batch_size} x {world_size} process(es)")
    return cfg.replace(gradient_accumulation=t.global_batch_size // per_step)
