"""What a run says: the start summary, and what was trained, at a glance: the files train_sft.py writes into
save_dir at the end of a run.

metrics.json (the numbers W&B shows), samples.jsonl (greedy replies to held-out prompts), training_curves.png
and the model card README.md that the Hub shows when the model is pushed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import textwrap

import hh_sft_chat as chat
from data_process_sft import read_columns
from model_io import held_out_prompts, model_reply
from run_env import sharding_requested
from save_dir_contract import OURS, checkpoint_step, run_file, size, write_whole
from sft_config import Config
from sft_trainer import whole_run_train_loss


def source_lines(sources) -> str:
    """One line per dataset of a mixture (sft_training.datasets): its format, rows kept and dropped and why."""
    if len(sources) < 2:
        return ""
    return "".join(f"    source {i}: {s.dataset_name} [{s.subset}]"
                   f"{f' x {s.fraction:g}' if s.fraction < 1 else ''}: {s.report.summary()}\n"
                   for i, s in enumerate(sources))


def sources_metrics(sources) -> list[dict]:
    """metrics.json's `sources`: each dataset trained on and its rows (read, kept, dropped)."""
    return [{"dataset_name": s.dataset_name, "subset": s.subset, "fraction": s.fraction, "format": s.report.format,
             "rows_read": s.report.rows_read, "rows_kept": s.report.rows_kept, "dropped": s.report.dropped}
            for s in sources]


def start_summary(cfg: Config, trainer, report, split, n_train_rows: int, sources=()) -> str:
    """What this run will do, before the first step: data (each source of a mixture on its own line), batch,
    schedule (what YAML and overrides set, as the trainer took them), parallel and training mode, where it
    writes."""
    t, args = cfg.sft_training, trainer.args
    world = args.world_size
    global_batch = t.batch_size * t.gradient_accumulation * world
    steps = args.max_steps if args.max_steps > 0 else math.ceil(math.ceil(n_train_rows / global_batch) * t.epochs)
    rows = f" packed into {n_train_rows} rows of <= {t.max_length} tokens" if t.packing else ""
    return (f"SFT of {cfg.policy_name} ({cfg.precision}) on {cfg.dataset.dataset_name} [{cfg.dataset.subset}]\n"
            f"  data: {report.summary()}\n{source_lines(sources)}"
            f"  train {len(split['train'])} / eval {len(split['test'])} conversations{rows}, "
            f"max_length {t.max_length}, {'packing' if t.packing else 'length-grouped batches'}\n"
            f"  global batch {global_batch}{' rows' if t.packing else ''} = batch_size {t.batch_size} x "
            f"gradient_accumulation {t.gradient_accumulation} x {world} process(es)\n"
            f"  schedule: learning_rate {args.learning_rate:g} ({t.lr_scheduler_type}, {warmup_words(t, args)}, "
            f"{t.optim}), "
            f"{f'max_steps: {steps}' if t.max_steps else f'epochs {t.epochs:g}, ~{steps}'} optimizer steps of "
            f"{global_batch}{' (max_steps sets the length, not epochs)' if t.max_steps else ''}\n"
            f"  parallel: {parallel_mode(trainer)}\n"
            f"  {training_mode(trainer, t.lora)}\n"
            f"{extras_line(t)}{dpo_reader_line(cfg, report)}"
            f"  W&B: {t.wandb_project or 'off'}; checkpoints and final model: {os.path.abspath(t.save_dir)}")


def warmup_words(t, args) -> str:
    """The warmup the schedule really has: transformers' `constant` ignores warmup_steps (the learning rate is full
    from step 1), `constant_with_warmup` uses them."""
    if t.lr_scheduler_type == "constant" and args.warmup_steps:
        return f"no warmup: constant ignores warmup_steps {args.warmup_steps}, constant_with_warmup uses them"
    return f"warmup {args.warmup_steps} steps"


def dpo_reader_line(cfg: Config, report) -> str:
    """A line when the DPO stage cannot read this run's dataset as it is (not an error: DPO may point elsewhere).
    dynamic-dpo-v1 reads the shared dataset.dataset_name with its own loader: HH text, from a Hub id or a folder
    (a single .jsonl file fails there with FileNotFoundError, seen on upstream a8345ab)."""
    why = ([f"its rows are {chat.NAMES[report.format]}, not HH text"] if report.format != "hh" else []) + (
        ["it is a single file, and that loader takes a Hub id or a folder"]
        if os.path.isfile(cfg.dataset.dataset_name) else [])
    if not why:
        return ""
    return (f"  note: the DPO stage (dynamic-dpo-v1) reads dataset.dataset_name with its own loader and cannot read "
            f"this one as is: {'; '.join(why)}; point its config at HH rows (README: Your own data)\n")


def extras_line(t) -> str:
    """The options beyond the recipe's defaults that are on, one line ("" when none is)."""
    import torch

    extras = []
    if t.load_best:
        extras.append("the final folder is the checkpoint with the lowest eval loss (load_best)")
    if t.early_stopping_patience:
        extras.append(f"early stopping after {t.early_stopping_patience} evals without improvement")
    if t.neftune_noise_alpha:
        extras.append(f"NEFTune noise alpha {t.neftune_noise_alpha:g} (training only)")
    if t.activation_offloading:
        extras.append("activation offloading " + ("on" if torch.cuda.is_available() else
                                                  "requested, NOT in effect (it needs a CUDA GPU)"))
    if t.sample_prompts:
        extras.append(f"replies to {t.sample_prompts} held-out prompts at each eval")
    return f"  extras: {'; '.join(extras)}\n" if extras else ""


def training_mode(trainer, lora) -> str:
    """Full fine-tuning, or LoRA with its trainable parameters and the memory it saves (weights, gradients and
    AdamW state; full fine-tuning keeps ~16 bytes per parameter: fp32 weights, gradients and two moments)."""
    params = list(trainer.model.parameters())
    total = sum(p.numel() for p in params)
    if lora is None:
        return f"training: full fine-tuning of {parameters(total)} parameters"
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lora_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad) + 16 * n_trainable
    return (f"training: LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on "
            f"{','.join(lora.target_modules)}: {parameters(n_trainable)} trainable of {parameters(total)} parameters "
            f"({n_trainable / total:.2%}); weights, gradients and AdamW state ~{size(lora_bytes)} instead "
            f"of ~{size(16 * total)} for full fine-tuning (activations not counted)")


def parameters(n: int) -> str:
    """A parameter count as people say it: 1.236B, 11.3M, 0.4M (not "0.000B")."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def parallel_mode(trainer) -> str:
    """The parallel mode in effect (from the trainer, not the launcher), and a note when the accelerate config
    asked for sharding that is not in effect (accelerate runs FSDP and DeepSpeed only on GPUs)."""
    processes, state = trainer.args.world_size, trainer.accelerator.state
    if trainer.is_fsdp_enabled:
        mode = f"FSDP{state.fsdp_plugin.fsdp_version} (sharded)"
    elif trainer.is_deepspeed_enabled:
        mode = f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage} (sharded)"
    else:
        mode = "DDP" if processes > 1 else "single process"
    asked = [name for name in sharding_requested() if name not in mode]
    note = f"; the accelerate config asks for {asked[0]}, which accelerate runs only on GPUs: NOT sharded" \
        if asked else ""
    return f"{mode}, {processes} process(es){note}"


def log_to_wandb(values: dict, step: int) -> None:
    """Log to the W&B run of this process, if there is one (with `wandb_project: null` wandb need not be
    installed: a GPU run without it once crashed here after training)."""
    wandb = sys.modules.get("wandb")
    if values and wandb is not None and wandb.run is not None:
        wandb.run.log({**values, "train/global_step": step})


def readiness_report(cfg: Config, raw, eval_rows: list[int], tokenizer, step: int) -> dict | None:
    """Score the eval split's preference pairs under the saved model and the base (sft_readiness), print the
    report and log it to W&B. Main process only, after the final save; a failure is one warning line (None)."""
    import sft_readiness as sr

    t = cfg.sft_training
    if not t.readiness_pairs:
        return None
    if "rejected" not in raw.column_names:
        print(f"Reference readiness: skipped: {cfg.dataset.dataset_name} has no preference pairs (no `rejected`); "
              "dataset.dataset_name with HH rows or conversational preference pairs gets it scored "
              "(sft_training.readiness_pairs: 0 silences this line)")
        return None
    try:
        pairs = sr.held_out_pairs(raw, eval_rows, t.readiness_pairs)
        report = sr.score_readiness(t.save_dir, cfg.policy_name, tokenizer, pairs, max_length=t.max_length,
                                    batch_size=t.eval_batch_size)
    except Exception as e:  # noqa: BLE001 (the model is saved: a report never fails the run)
        print(f"warning: reference readiness failed ({type(e).__name__}: {e}); the model is saved", file=sys.stderr)
        return None
    print("\n".join(sr.summary_lines(report, t.max_length)))
    log_to_wandb(sr.wandb_metrics(report), step)
    return report


def collect_metrics(cfg: Config, trainer, report, split, final_eval: dict, runtime: float, sources=()) -> dict:
    """What metrics.json holds: the numbers W&B shows, readable without W&B. The train loss is over every
    optimizer step of the run from its logged history (the Trainer's own covers only the steps since a resume)."""
    history = trainer.state.log_history
    last_eval = {**next((h for h in reversed(history) if "eval_loss" in h), {}), **final_eval}
    t = cfg.sft_training
    epochs_done = trainer.state.epoch or 0.0
    train_counts = read_columns(split["train"], "num_trained", "length")
    metrics = {
        "written_by": OURS,
        "train_loss": whole_run_train_loss(history),
        "eval_loss": last_eval.get("eval_loss", float("nan")),
        "eval_accuracy": last_eval.get("eval_accuracy", float("nan")),
        "global_step": trainer.state.global_step,
        "epochs_trained": round(epochs_done, 4),  # what the weights have (a max_steps run stops mid-epoch)
        "global_batch": t.batch_size * t.gradient_accumulation * trainer.args.world_size,
        "train_conversations": len(split["train"]),
        "eval_conversations": len(split["test"]),
        # whole passes over the train split: exact for finished epochs, proportional within one
        "tokens_trained": round(int(train_counts["num_trained"].sum()) * epochs_done),
        "tokens_seen": round(int(train_counts["length"].sum()) * epochs_done),
        "data": dataclasses.asdict(report),
        "sources": sources_metrics(sources),
        "runtime_s": round(runtime, 1),
        "config": cfg.to_dict(),
        "overrides": list(cfg.overrides),
        "log_history": history,
    }
    if trainer.args.metric_for_best_model:  # load_best / early_stopping_patience: which eval was best
        best = trainer.state.best_model_checkpoint
        metrics["best"] = {"step": checkpoint_step(best) if best else None,
                           "eval_loss": trainer.state.best_metric, "handed_off": t.load_best,
                           "stopped_early": stopped_early(trainer)}
    return metrics


def best_row(metrics: dict) -> str:
    best = metrics.get("best") or {}
    if best.get("step") is None:
        return ""
    which = "the saved model" if best["handed_off"] else "not the saved model (load_best: false)"
    return f"\n| best eval loss (step {best['step']}: {which}) | {best['eval_loss']:.4f} |"


def evaluated_at_last_step(trainer) -> bool:
    """Whether the run's last step was evaluated already (the final report then reuses those numbers)."""
    history = trainer.state.log_history
    return max((h["step"] for h in history if "eval_loss" in h), default=-1) == trainer.state.global_step


def stopped_early(trainer) -> bool:
    """Whether transformers' EarlyStoppingCallback ended the run (its patience ran out)."""
    from transformers import EarlyStoppingCallback

    return any(isinstance(c, EarlyStoppingCallback) and c.early_stopping_patience_counter >= c.early_stopping_patience
               for c in trainer.callback_handler.callbacks)


def best_lines(metrics: dict) -> list[str]:
    """What the end of a run says about its best eval and early stopping (nothing without them)."""
    best = metrics.get("best")
    if not best or best["step"] is None:
        return []
    lines = [f"  best eval loss {best['eval_loss']:.4f} at step {best['step']}"
             + ("; the saved model is that checkpoint's (load_best)" if best["handed_off"] else
                "; the saved model is the last step's (load_best: false)")]
    if best["stopped_early"]:
        lines.append(f"  stopped early at step {metrics['global_step']}: eval loss did not improve for "
                     f"{metrics['config']['sft_training']['early_stopping_patience']} evaluations")
    return lines


def save_metrics(save_dir: str, metrics: dict) -> None:
    """Write metrics.json whole (a temporary file renamed into place): its presence says the run finished."""
    write_whole(run_file(save_dir, "metrics.json"), metrics)


def write_report(cfg: Config, trainer, tokenizer, eval_messages, metrics: dict) -> None:
    """What was trained, at a glance: samples.jsonl, training_curves.png and the model card README.md.

    Main process only, after the final save. A report error never fails a finished run: each part that fails
    is one line on stderr. Samples come from the saved folder reloaded when the trainer's weights are sharded
    (FSDP/ZeRO, any process count), else from the trainer's model."""
    save_dir = cfg.sft_training.save_dir
    parts = {
        "samples.jsonl": lambda path: write_samples(_unsharded_model(trainer, save_dir), tokenizer, eval_messages,
                                                    path),
        "training_curves.png": lambda path: plot_curves(
            metrics["log_history"], path, f"SFT of {cfg.policy_name} on {cfg.dataset.dataset_name} -> {save_dir}"),
        **card_parts(cfg, metrics),
    }
    write_parts(save_dir, parts)


def card_parts(cfg: Config, metrics: dict) -> dict:
    """The model card and the readiness histogram (also rewritten by `train_sft.py --readiness`)."""
    parts = {"README.md": lambda path: _write_text(path, model_card(cfg, metrics))}
    if (metrics.get("readiness") or {}).get("pairs"):
        parts["readiness_margins.png"] = lambda path: plot_margins(metrics["readiness"], cfg.dataset.dataset_name,
                                                                   path)
    return parts


def write_parts(save_dir: str, parts: dict) -> None:
    """Write each report file; a part that fails is one warning line (the model is saved already)."""
    for name, write in parts.items():
        try:
            write(run_file(save_dir, name))
        except Exception as e:  # noqa: BLE001 (the model is saved; a report file is a convenience)
            print(f"warning: could not write {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  "the model is saved", file=sys.stderr)


def _unsharded_model(trainer, save_dir: str):
    from transformers import AutoModelForCausalLM

    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return AutoModelForCausalLM.from_pretrained(save_dir).to(trainer.args.device)
    return trainer.accelerator.unwrap_model(trainer.model)


def _method(lora) -> str:
    if lora is None:
        return "Trained by full fine-tuning: these are all of the model's weights."
    return (f"Trained with LoRA (r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on "
            f"{', '.join(lora.target_modules)}), merged into these weights: an ordinary model, no peft needed. The "
            "adapter itself is in `adapter/`.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_samples(model, tokenizer, eval_messages, path: str, n: int = 4, max_new_tokens: int = 128) -> None:
    """Greedy replies to the first held-out eval prompts that have one (the conversation up to its last user
    turn; conversations that start with the assistant, as HH rows with an empty first turn do, have none)."""
    model.eval()
    with open(path, "w", encoding="utf-8") as f:
        for prompt, reference in held_out_prompts(eval_messages, n):
            reply, stopped = model_reply(model, tokenizer, prompt, max_new_tokens)
            f.write(json.dumps({"prompt": prompt, "reply": reply, "stopped_at_eot": stopped,
                                "reference": reference}, ensure_ascii=False) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: str, title: str) -> None:
    """Train and eval loss (and eval accuracy) against step, under `title` (the model, data and save_dir)."""
    plt = _pyplot()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"], h.get("eval_accuracy")) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps = [step for step, _ in train]
    short = len(steps) >= 3 and steps[-1] - steps[-2] < steps[-2] - steps[-3]  # the run's end logs a short interval
    if train:
        ax.plot(*zip(*train[:-1] if short else train), label="train loss", color="tab:blue", alpha=0.8)
    if short:  # its mean covers fewer steps (often a short final batch): drawn apart, not as the curve's last word
        covered = steps[-1] - steps[-2]
        ax.plot(*zip(*train[-2:]), "--o", markevery=[1], mfc="white", color="tab:blue", alpha=0.8,
                label=f"train loss of the last {covered} step{'s' if covered > 1 else ''} (a shorter interval)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # optimizer steps are whole
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(e[2] is not None for e in evals):
        acc = ax.twinx()
        acc.plot([e[0] for e in evals], [e[2] for e in evals], "s--", color="tab:green", label="eval accuracy")
        acc.set_ylabel("next-token accuracy")
        acc.set_ylim(0, 1)  # a fraction: autoscaled, a 0.009 change looked steep and LoRA runs showed negatives
        more_handles, more_labels = acc.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="center left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_margins(report: dict, source: str, path: str) -> None:
    """Histograms of the SFT model's chosen-rejected log-prob margins on held-out pairs (sft_readiness), summed
    over the reply tokens and per reply token. Each panel spans its 5th-95th percentiles plus a quarter of that
    width on each side, and counts the pairs outside it: one extreme pair must not squeeze the rest into a bar."""
    import numpy as np

    plt = _pyplot()
    panels = [("summed over reply tokens", report["margins"])]
    if report.get("margins_per_token"):
        panels.append(("per reply token", report["margins_per_token"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=120, squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        values = np.asarray(values, dtype=float)
        low, high, below, above = plot_range(values)
        inside = values[(values >= low) & (values <= high)]
        ax.hist(inside, bins=min(40, max(8, len(inside) // 2)), range=(low, high), color="tab:purple", alpha=0.8)
        ax.axvline(0, color="black", lw=1)
        ax.set_xlim(low, high)  # the drawn range is the one the title counts outside of
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))  # pairs are counted, not measured
        ax.set_xlabel(f"log p(chosen) - log p(rejected), {label}")
        ax.set_ylabel("held-out pairs")
        outside = f"; not shown: {below} below {low:.3g}, {above} above {high:.3g}" if below or above else ""
        title = f"{int((values > 0).sum())} of {len(values)} pairs > 0 (chosen preferred){outside}"
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # inside the panel, however long
    fig.suptitle(f"Reference margins of the SFT model on {len(report['margins'])} held-out pairs of {source}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_range(values) -> tuple[float, float, int, int]:
    """(low, high, values below, values above) of a margin histogram: the 5th-95th percentiles widened by a
    quarter of their span on each side, 0 always in view."""
    import numpy as np

    low, high = np.percentile(values, [5, 95])
    pad = (high - low) * 0.25 or 1.0
    low, high = float(min(low - pad, -pad * 0.1)), float(max(high + pad, pad * 0.1))
    return low, high, int((values < low).sum()), int((values > high).sum())


def readiness_section(report: dict | None) -> str:
    """The model card's "Reference readiness" table (empty when it was not computed)."""
    if not report or not report.get("pairs"):
        return ""
    p = report["margin_percentiles"]
    return f"""## Reference readiness (held-out preference pairs, as the DPO stage builds them)
{report["pairs"]} pairs from the eval split; log-probabilities of the final reply (and its `<|eot_id|>`), summed.

| | SFT | base |
|---|---|---|
| chosen log-prob | {report["sft_chosen_logp"]:.3f} | {report["base_chosen_logp"]:.3f} |
| rejected log-prob | {report["sft_rejected_logp"]:.3f} | {report["base_rejected_logp"]:.3f} |
| chosen log-prob per token | {report["sft_chosen_logp_per_token"]:.4f} | {report["base_chosen_logp_per_token"]:.4f} |

- SFT raised the chosen log-prob over the base model on {report["chosen_raised_share"]:.1%} of pairs
- preference accuracy of the SFT model (chosen > rejected): {report["pref_accuracy"]:.1%} by sum,
  {report["pref_accuracy_per_token"]:.1%} per token
- chosen-rejected margin: mean {report["margin_mean"]:.3f}, std {report["margin_std"]:.3f}; p5 {p["p5"]:.3f},
  p25 {p["p25"]:.3f}, p50 {p["p50"]:.3f}, p75 {p["p75"]:.3f}, p95 {p["p95"]:.3f} (`readiness_margins.png`)

"""


TRAINED_ON = {"hh": "the `chosen` conversations (HH text)", "messages": "the `messages` conversations",
              "preference": "the chosen side of the conversational preference pairs",
              "prompt_completion": "the prompt + completion conversations"}


def trained_on(cfg: Config, metrics: dict) -> str:
    """What the card says was trained: the format's conversations of the dataset, or the mixture's sources."""
    sources = metrics.get("sources") or []
    if len(sources) > 1:
        return f"a mixture of {len(sources)} datasets (listed under Data)"
    fmt = TRAINED_ON.get(metrics["data"].get("format", "hh"), "the conversations")
    return f"{fmt} of `{cfg.dataset.dataset_name}` (`{cfg.dataset.subset}`)"


def source_rows(metrics: dict) -> str:
    """The card's line per source of a mixture ("" for one dataset)."""
    sources = metrics.get("sources") or []
    if len(sources) < 2:
        return ""
    lines = []
    for s in sources:
        fraction = f", fraction {s['fraction']:g}" if s["fraction"] < 1 else ""
        lines.append(f"\n  - `{s['dataset_name']}` (`{s['subset']}`{fraction}): {chat.NAMES[s['format']]}, rows read "
                     f"{s['rows_read']}, kept {s['rows_kept']}")
    return "".join(lines)


def model_card(cfg: Config, metrics: dict) -> str:
    """The README.md the Hub shows: base model, data and filtering, hyperparameters, metrics, use in DPO."""
    t, data = cfg.sft_training, metrics["data"]
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(data["dropped"].items())) or "none"
    hyper = "\n".join(f"| `{k}` | `{v}` |" for k, v in t.model_dump().items())
    repo = t.hub_model_id if t.push_to_hub else os.path.abspath(t.save_dir)
    epochs = f" ({metrics['epochs_trained']:g} epochs)" if "epochs_trained" in metrics else ""  # (older reports)
    dataset_tag = f"datasets:\n- {cfg.dataset.dataset_name}\n" if "/" in cfg.dataset.dataset_name and \
        not os.path.exists(cfg.dataset.dataset_name) else ""
    return f"""---
base_model: {cfg.policy_name}
{dataset_tag}library_name: transformers
tags: [sft, trl, dpo-reference]
---

# {repo.split("/")[-1]}

Supervised fine-tune of `{cfg.policy_name}` on {trained_on(cfg, metrics)}, in the Llama-3 chat format, as the
reference model for a DPO stage. The loss is on every assistant turn and its `<|eot_id|>`; prompts, headers and
padding are masked.
{_method(t.lora)}

## Data
- rows read {data["rows_read"]}, kept {data["rows_kept"]}; dropped: {dropped}{source_rows(metrics)}
- {metrics["train_conversations"]} train / {metrics["eval_conversations"]} eval conversations
  (val_ratio {cfg.dataset.val_ratio}, seed {cfg.dataset.seed}); max_length {t.max_length}
  ({_count(data["truncated"], "row")} cut)
- tokens {data["tokens"]}, of which assistant (trained) {data["assistant_tokens"]}

## Results
| metric | value |
|---|---|
| train loss | {metrics["train_loss"]:.4f} |
| eval loss | {metrics["eval_loss"]:.4f} |{best_row(metrics)}
| eval accuracy (next token, assistant tokens) | {metrics["eval_accuracy"]:.4f} |
| optimizer steps | {metrics["global_step"]}{epochs} |
| global batch | {metrics["global_batch"]} |
| tokens trained / seen | {metrics["tokens_trained"]} / {metrics["tokens_seen"]} |
| runtime | {metrics["runtime_s"]} s |

{readiness_section(metrics.get("readiness"))}
## Hyperparameters (precision {cfg.precision})
| key | value |
|---|---|
{hyper}

## Use as the DPO reference
In dynamic-dpo-v1's `config_dpo.yaml`:
```yaml
policy_name: {repo}
ref_name: {repo}
```
Then, once per DPO checkout, from the hh-sft repo (its DPO loss otherwise scores replies without their prompts;
`uninstall` puts every file back):
```bash
python dpo_handoff.py install --dpo-repo path/to/dynamic-dpo-v1
python dpo_handoff.py check --dpo-repo path/to/dynamic-dpo-v1 --model {repo}
```
Generation stops at `<|eot_id|>` (see `generation_config.json`).
"""
