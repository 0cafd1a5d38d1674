"""Supervised fine-tuning on Anthropic HH: the reference model for the DPO stage.

    python train_sft.py --config config_dpo.yaml            # the real run (reads the `sft_training` section)
    python train_sft.py --config config_dpo.yaml sft_training.learning_rate=1e-5 sft_training.epochs=2
    python train_sft.py --config config_dpo.yaml --dry-run  # ~10 steps on a small slice, then artifact checks
    python train_sft.py --demo                              # offline: tiny local Llama + the shipped sample
    python train_sft.py --config config_dpo.yaml --chat     # talk to the saved model (stdin; /reset, empty line)

`main()` is the recipe: config -> prepare (save_dir, tokenizer, data) -> trainer -> train -> finish (save,
readiness, report, push). The modules below it: docs/code-map.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import run_env
import save_dir_contract as contract
from sft_config import Config, ConfigError, apply_global_batch, flag_as_key, load_config

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_demo.yaml")


@dataclass(frozen=True)
class Mode:
    """What differs between the ways train_sft.py runs, in one place."""

    name: str
    config: str | None = None  # the config it always reads (--demo: config_demo.yaml), else --config
    fresh: bool = False  # its output is disposable: --overwrite implied
    max_steps: int = -1  # > 0: that many steps on a slice of the data, no checkpoints, W&B or push (--dry-run)
    trains: bool = True  # False: score the finished model in save_dir (--readiness)
    builds_base: bool = False  # builds its tiny base model before the pre-flight (--demo)
    then: str | None = None  # the sft_demo function run on save_dir after the save: checks, or a reply


MODES = {"train": Mode("train"),
         "dry-run": Mode("dry-run", fresh=True, max_steps=10, then="dry_run_checks"),
         "demo": Mode("demo", config=DEMO_CONFIG, fresh=True, builds_base=True, then="demo_reply"),
         "readiness": Mode("readiness", trains=False)}


@dataclass(frozen=True)
class Run:
    """This invocation: the validated config with its mode resolved into it once."""

    cfg: Config
    mode: Mode
    overwrite: bool


@dataclass
class Prepared:
    """What the trainer needs, made before the model is loaded (every failure so far is one line, exit 2)."""

    tokenizer: Any
    report: Any  # data_process_sft.DataReport
    split: Any  # DatasetDict with "train" and "test" (conversations, tokenized)
    resume_from: str | None
    fingerprint: dict  # save_dir_contract.run_fingerprint: checked on resume, written into each checkpoint
    raw: Any  # dataset.dataset_name's rows (the readiness report scores its held-out preference pairs)
    finished: dict | None = None  # --readiness: the finished run's metrics.json
    sources: list = ()  # data_process_sft.Source of each dataset trained on
    held_out: list = ()  # the rows of `raw` never trained (readiness scores their pairs)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_log_levels(logging.INFO)
    if args.chat is not None:
        from sft_chat import command

        return command(args.chat or None, args.config, args.overrides, args.temperature, args.max_new_tokens)
    start = time.time()
    try:
        run = resolve_run(args)
        if run.mode.builds_base:
            from sft_demo import build_demo_base_model

            build_demo_base_model(run.cfg)
        run_env.check_before_loading(run.cfg)
        prepared = prepare(run)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: several processes' lines do not interleave
        return 2
    if not run.mode.trains:
        return readiness_only(run, prepared)
    trainer = build_trainer(run, prepared)
    stopped = train(run, trainer, prepared)
    if stopped is not None:  # NaN/inf, a signal, or a full disk
        return stopped
    return finish(run, trainer, prepared, start)


def set_log_levels(ours: int) -> None:
    """Libraries say warnings only (accelerate's INFO lines read like failures); our loggers say `ours`."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("train_sft", "data_process_sft"):
        logging.getLogger(name).setLevel(ours)


def parse_args(argv):
    usage = __doc__.split("\n\n`main()`")[0]  # the commands, not the module map (that is for developers)
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config_dpo.yaml",
                        help="YAML file with an sft_training section (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config keys, e.g. sft_training.learning_rate=1e-5 (validated like the file)")
    parser.add_argument("--dry-run", action="store_true", help="~10 steps on a small slice, no W&B/push, checks")
    parser.add_argument("--demo", action="store_true",
                        help="offline demo: tiny local Llama + shipped sample (replaces the previous demo output)")
    parser.add_argument("--readiness", action="store_true",
                        help="no training: score held-out preference pairs with the finished model in save_dir")
    parser.add_argument("--chat", nargs="?", const="", metavar="DIR",
                        help="no training: talk to the finished model in save_dir (or DIR), one line of stdin a turn")
    parser.add_argument("--temperature", type=float, default=0.0, help="--chat: 0 is greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="--chat: reply length limit (256)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh: delete save_dir's checkpoints instead of resuming, train over a saved model")
    flags = {option for action in parser._actions for option in action.option_strings}
    if hint := flag_as_key(sys.argv[1:] if argv is None else argv, flags):  # `--learning_rate 1e-5`, as TRL takes it
        sys.stderr.write(f"error: {hint}\n")
        sys.exit(2)
    parsed = parser.parse_intermixed_args(argv)  # overrides may follow --dry-run or --readiness
    modes = [flag for flag, on in (("--demo", parsed.demo), ("--dry-run", parsed.dry_run),
                                   ("--readiness", parsed.readiness), ("--chat", parsed.chat is not None)) if on]
    if len(modes) > 1:  # each would be half-ignored (--demo --readiness retrained and replaced the demo's model)
        sys.stderr.write(f"error: {' and '.join(modes)} are separate modes: pass one (the demo's model is scored "
                         "with: --config config_demo.yaml --readiness)\n")
        sys.exit(2)
    return parsed


# --- config: the file, the overrides, the mode, pre-flight (no torch imported yet) ------------------------------
def resolve_run(args) -> Run:
    run_env.check_stack()
    mode = MODES["demo" if args.demo else "dry-run" if args.dry_run else "readiness" if args.readiness else "train"]
    cfg = load_config(mode.config or args.config, args.overrides)
    if mode.max_steps > 0:
        from sft_demo import dry_run_config

        cfg = dry_run_config(cfg)
    cfg = apply_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if not mode.trains and not cfg.sft_training.readiness_pairs:
        raise ConfigError("--readiness with sft_training.readiness_pairs: 0 would score nothing; set it, e.g. "
                          "sft_training.readiness_pairs=512")
    return Run(cfg=cfg, mode=mode, overwrite=args.overwrite or mode.fresh)


# --- prepare: save_dir, tokenizer, data; the main process first, the others read its cache ----------------------
def prepare(run: Run) -> Prepared:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import data_process_sft as dp
    from model_io import check_vocabulary, model_vocab_size, prepare_tokenizer
    from sft_demo import dry_run_rows

    cfg, t = run.cfg, run.cfg.sft_training
    state = PartialState(cpu=not torch.cuda.is_available())  # several processes: gloo on CPU, as use_cpu
    if not state.is_main_process:
        set_log_levels(logging.WARNING)
    error = None
    with state.main_process_first():
        try:
            finished = resume_from = None
            if not run.mode.trains:
                finished = contract.finished_run(t.save_dir, cfg)
            elif state.is_main_process:
                resume_from = contract.prepare_save_dir(t.save_dir, overwrite=run.overwrite, epochs=t.epochs,
                                                       max_steps=t.max_steps)
                run_env.check_disk_space(cfg)
            else:
                resume_from = contract.last_complete_checkpoint(t.save_dir)
            tokenizer = prepare_tokenizer(dp.load_tokenizer(cfg.policy_name))
            collator = dp.CompletionOnlyCollator(tokenizer)  # the labels (each batch's collator: assemble_trainer)
            data, report, sources = dp.build_sft_mixture(
                cfg, tokenizer, collator, slice_rows=dry_run_rows(cfg) if run.mode.max_steps > 0 else None)
            raw, which = dp.dpo_rows(cfg, sources)
            dp.check_split_sizes(cfg, len(data), report)
            note = check_vocabulary(f"policy_name {cfg.policy_name}", tokenizer, model_vocab_size(cfg.policy_name),
                                    dp.max_token_id(data), holds="the data's token ids")
            if note and state.is_main_process:
                print(note)
            fingerprint = contract.run_fingerprint(cfg, report, dp.token_digest(data), state.num_processes)
            contract.check_same_run(resume_from, fingerprint)
        except ConfigError as e:  # kept until every process is past the barrier, then raised by all (below)
            error = str(e)
    first_error = next(filter(None, gather_object([error])), None)
    if first_error:  # the main process's refusal, said by every process (no rank left waiting in a collective)
        raise ConfigError(first_error)
    split = data.train_test_split(test_size=cfg.dataset.val_ratio, seed=cfg.dataset.seed)
    return Prepared(tokenizer, report, split, resume_from, fingerprint, raw, finished, sources,
                    dp.held_out_rows(split["test"], len(raw), which))


# --- trainer ----------------------------------------------------------------------------------------------------
def build_trainer(run: Run, prepared: Prepared):
    from model_io import held_out_prompts, load_model
    from sft_report import start_summary
    from sft_trainer import assemble_trainer, attention_implementation, prefer_fast_attention

    cfg, t = run.cfg, run.cfg.sft_training
    kernel_note = prefer_fast_attention()
    attention, attention_note = attention_implementation(t)
    model = load_model(cfg.policy_name, attention, cfg.precision, lora=t.lora is not None)
    model.config.pad_token_id = model.generation_config.pad_token_id = prepared.tokenizer.pad_token_id
    run_env.start_wandb(cfg, prepared.resume_from)
    eval_head = prepared.split["test"].select(range(min(64, len(prepared.split["test"]))))["messages"]
    trainer = assemble_trainer(cfg, model, prepared.tokenizer, prepared.split, prepared.fingerprint,
                               max_steps=run.mode.max_steps,
                               sample_prompts=held_out_prompts(eval_head, t.sample_prompts))
    if trainer.is_world_process_zero():
        print(start_summary(cfg, trainer, prepared.report, prepared.split, len(trainer.train_dataset),
                            prepared.sources))
        if kernel_note:
            print(f"  GPU: {kernel_note}")
        if attention_note:
            print(f"  attention: {attention_note}")
        if prepared.resume_from:
            step = contract.checkpoint_step(prepared.resume_from)
            print(f"Resuming from {prepared.resume_from} (step {step}); --overwrite starts fresh" if not t.max_steps
                  or step < t.max_steps else f"Finishing from {prepared.resume_from}: it is at sft_training.max_steps "
                  f"{t.max_steps}, so no step is trained")
        if aside := contract.set_aside(t.save_dir):
            print(f"  set aside in save_dir (damaged, never resumed or rotated; delete when done): {', '.join(aside)}")
    return trainer


# --- train ------------------------------------------------------------------------------------------------------
def train(run: Run, trainer, prepared: Prepared) -> int | None:
    """Train (resuming if a checkpoint is there); an exit code when the run stopped early, else None."""
    from sft_trainer import NonFiniteLoss

    save_dir = run.cfg.sft_training.save_dir
    try:
        trainer.train(resume_from_checkpoint=prepared.resume_from)
    except NonFiniteLoss as e:
        last = contract.last_complete_checkpoint(save_dir)
        print(f"error: {e}; stopped. Last good checkpoint: {last or 'none'}. Lower learning_rate or check the "
              "data, then run the same command (it resumes from that checkpoint) or add --overwrite.",
              file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # a checkpoint write that filled the disk: one line, not a traceback
        if not (message := run_env.disk_full(e, save_dir)):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    if trainer.stopped_by:  # agreed by every process; said once
        if trainer.is_world_process_zero():
            print(f"Stopped by {trainer.stopped_by} at step {trainer.state.global_step}; checkpoint saved in "
                  f"{contract.last_complete_checkpoint(save_dir)}. Resume with the same command: "
                  f"{run_env.rerun_command()}", file=sys.stderr)
        return 128 + signal.Signals[trainer.stopped_by].value
    return None


# --- finish: final eval, save, report, push ---------------------------------------------------------------------
def finish(run: Run, trainer, prepared: Prepared, start: float) -> int:
    import sft_report
    from model_io import push_final_model, save_final_model

    cfg, t = run.cfg, run.cfg.sft_training
    fresh = run.mode.max_steps > 0 or t.load_best or not sft_report.evaluated_at_last_step(trainer)
    final_eval = trainer.evaluate() if fresh else {}
    try:
        save_final_model(trainer, prepared.tokenizer, t.save_dir, cfg.precision)
    except (OSError, RuntimeError) as e:  # the final save filled the disk: one line; a rerun finishes it
        if not (message := run_env.disk_full(e, t.save_dir)):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the weights are published last: the folder is a run cut in its final save
        print(f"error: the final save was interrupted (no half-written model is left as the handoff); the same "
              f"command finishes the run from its last checkpoint: {run_env.rerun_command()}", file=sys.stderr)
        return 130
    if not trainer.is_world_process_zero():
        return 0
    metrics = sft_report.collect_metrics(cfg, trainer, prepared.report, prepared.split, final_eval,
                                         time.time() - start, prepared.sources)
    metrics["readiness"] = readiness(run, prepared, step=trainer.state.global_step)
    held_out = prepared.split["test"].select(range(min(32, len(prepared.split["test"]))))["messages"]
    sft_report.write_report(cfg, trainer, prepared.tokenizer, held_out, metrics)
    # Last: metrics.json marks the run finished. Killed before it, the rerun resumes the final checkpoint and
    # writes the end of the run again (readiness, samples, curves, card).
    sft_report.save_metrics(t.save_dir, metrics)
    print(f"Saved the SFT model to {os.path.abspath(t.save_dir)}")
    print(f"  train loss {metrics['train_loss']:.4f} (mean over all {metrics['global_step']} steps of the run), "
          f"eval loss {metrics['eval_loss']:.4f}, "
          f"eval accuracy {metrics['eval_accuracy']:.4f}", *sft_report.best_lines(metrics), sep="\n")
    print(contract.tidy_finished(t.save_dir, t.keep_checkpoints, "max_steps" if t.max_steps else "epochs"))
    if t.push_to_hub and not push_final_model(t.save_dir, t.hub_model_id):
        return 1
    return _after_save(run)


# --- reference readiness: how the SFT model scores the DPO stage's held-out pairs ---------------------------------
def readiness(run: Run, prepared: Prepared, step: int) -> dict | None:
    from sft_report import readiness_report

    return readiness_report(run.cfg, prepared.raw, prepared.held_out, prepared.tokenizer, step)


def readiness_only(run: Run, prepared: Prepared) -> int:
    """`--readiness`: score the finished model in save_dir; update metrics.json, the model card and the plot. The
    run's report is never replaced by an empty one: no pair scored is one `error:` line, exit 2, nothing rewritten."""
    import sft_report

    save_dir, metrics = run.cfg.sft_training.save_dir, prepared.finished
    run_env.start_wandb(run.cfg, resume_from=save_dir)
    report = readiness(run, prepared, step=metrics.get("global_step", 0))
    if report is None and "rejected" in prepared.raw.column_names:  # it failed: said in one warning line
        return 1
    if not (report or {}).get("pairs"):
        print(f"error: no preference pair of the held-out split could be scored (dataset "
              f"{run.cfg.dataset.dataset_name}: rows without a chosen/rejected pair, or every pair over max_length); "
              f"the report in {save_dir} is unchanged", file=sys.stderr)
        return 2
    metrics["readiness"] = report
    sft_report.write_parts(save_dir, sft_report.card_parts(run.cfg, metrics))
    sft_report.save_metrics(save_dir, metrics)
    print(f"Updated in {save_dir}: metrics.json (its readiness section), the model card README.md and "
          "readiness_margins.png")
    return 0


def _after_save(run: Run) -> int:
    """The mode's last step on the saved folder (the dry run's checks, the demo's reply); its exit code."""
    if not run.mode.then:
        return 0
    import sft_demo

    return getattr(sft_demo, run.mode.then)(run.cfg.sft_training.save_dir) or 0


if __name__ == "__main__":
    sys.exit(main())
