"""The trainer: TRL's SFTTrainer plus what a long unattended run needs (SFTRunTrainer), the config that drives it
(build_sft_config, one place for every key), and its assembly (assemble_trainer, the one place a trainer is built).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from data_process_sft import CompletionOnlyCollator, read_columns
from hh_sft_chat import IGNORE_INDEX, LLAMA3_END_OF_TURN
from save_dir_contract import FINGERPRINT_FILE, checkpoint_dir, run_file, usual_file_modes, write_whole
from sft_config import Config

logger = logging.getLogger("train_sft")


def build_peft_config(lora):
    """The `sft_training.lora` section as peft's LoraConfig for TRL's `peft_config` (None: full fine-tuning)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def assemble_trainer(cfg: Config, model, tokenizer, split, fingerprint: dict, *, max_steps: int = -1,
                     collator=None, sample_prompts: list = (), eval_during_training: bool = True,
                     checkpoints: bool = True,
                     length_grouped: bool = True, callbacks: list = ()) -> SFTRunTrainer:
    """The trainer of a run, assembled in one place (train_sft.py, the tests and the benchmark call this): TRL's
    SFTConfig from the config, the batching it names (length-grouped, packed or padding-free; `collator` replaces
    the default one), the train/eval datasets of `split`, the run's callbacks and LoRA.

    What a test or a benchmark needs differently is a parameter: `max_steps` > 0 (a --dry-run: no checkpoints), no
    evaluation during training (trainer.evaluate() still has the eval split), no checkpoints, `length_grouped=False`
    (transformers' random sampler: the benchmark's baseline), extra `callbacks`."""
    t = cfg.sft_training
    if t.packing:  # TRL's padding-free collator for packed rows (it refuses any other)
        collator = None
    elif collator is None:
        collator = flattening_collator() if t.padding_free else CompletionOnlyCollator(tokenizer)
    args = build_sft_config(cfg, max_steps=max_steps)
    if not eval_during_training:
        args.eval_strategy = "no"
    if not checkpoints:
        args.save_strategy, args.load_best_model_at_end = "no", False
    train_data = batches_ready(split["train"], t.packing, t.max_length)
    if not length_grouped:
        train_data = train_data.remove_columns("length")
    eval_data = batches_ready(split["test"], t.packing, t.max_length) if "test" in split else None
    return SFTRunTrainer(model=model, args=args, processing_class=tokenizer, data_collator=collator,
                         train_dataset=train_data, eval_dataset=eval_data, peft_config=build_peft_config(t.lora),
                         callbacks=[*run_callbacks(cfg, fingerprint, list(sample_prompts)), *callbacks])


def flattening_collator():
    """padding_free batches: transformers' DataCollatorWithFlattening with the boundaries varlen kernels read. Once
    ours (VarlenCollator); bench/twins.py measured both on the 1,500 shipped rows: the same tensors for every batch,
    ours 0.3 ms a batch faster on a CPU (negligible beside a step), so the library's."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)


def run_callbacks(cfg: Config, fingerprint: dict, sample_prompts: list) -> list:
    """The callbacks a run adds to the Trainer: each checkpoint's fingerprint, early stopping (transformers'
    EarlyStoppingCallback, its counter saved in checkpoints), replies to held-out prompts at each eval."""
    from transformers import EarlyStoppingCallback

    t = cfg.sft_training
    callbacks = [WriteRunFingerprint(fingerprint)]
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    if t.sample_prompts and sample_prompts:
        callbacks.append(SampleReplies(sample_prompts[: t.sample_prompts], t.save_dir))
    return callbacks


def build_sft_config(cfg: Config, *, max_steps: int = -1) -> SFTConfig:
    """Map the `sft_training` section onto TRL's SFTConfig (one place, every key). `max_steps` > 0: a --dry-run of
    that many steps (no checkpoints)."""
    t = cfg.sft_training
    return SFTConfig(
        output_dir=t.save_dir,
        learning_rate=t.learning_rate,
        optim=t.optim,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps > 0 else t.max_steps or -1,  # (a --dry-run's 10 steps first)
        gradient_accumulation_steps=t.gradient_accumulation,
        max_length=t.max_length,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_nan_inf_filter=False,  # SFTRunTrainer stops on a non-finite loss; the filter's check syncs each step
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        packing=t.packing,  # TRL: padding-free BFD batches (position_ids, no attention_mask)
        remove_unused_columns=False,  # keep `length` for our sampler; our columns are exactly what is needed
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, labelled, truncated (and packed) by us
        use_liger_kernel=t.use_liger_kernel,
        torch_compile=t.torch_compile,
        neftune_noise_alpha=t.neftune_noise_alpha,  # transformers' hook, removed when train() returns
        activation_offloading=t.activation_offloading and torch.cuda.is_available(),  # TRL's; CUDA streams
        # transformers' default (True unless checkpointing) makes DDP walk the graph each step and warn on every
        # rank: full fine-tuning and LoRA of these models give every trainable parameter a gradient
        ddp_find_unused_parameters=t.ddp_find_unused_parameters,
        load_best_model_at_end=t.load_best and max_steps < 0,  # (a --dry-run saves no checkpoint)
        metric_for_best_model="eval_loss" if t.load_best or t.early_stopping_patience else None,
        greater_is_better=False,
        logging_steps=t.log_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=t.eval_steps or t.save_steps,
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
        push_to_hub=False,  # pushed once, after the final save (see model_io.push_final_model)
        hub_model_id=t.hub_model_id,
        eos_token=LLAMA3_END_OF_TURN,
    )


def prefer_fast_attention() -> str | None:
    """On CUDA, turn SDPA's cuDNN backend off (flash / memory-efficient kernels instead); a note, or None.

    Measured once on an H200 (2026-11, torch 2.11, bf16, Llama-3.2-1B shape; not re-measured on the pinned
    torch): SDPA picked cuDNN for a masked batch and paid its per-shape set-up again for each new padded length,
    which length-grouped batches bring almost every step (228 of 343 ms of CPU per step); with it off the default
    path went from 11.4k to 18.5k real tokens/s.
    """
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.enable_cudnn_sdp(False)
    return "SDPA cuDNN backend off (its per-shape set-up on varying padded lengths)"


def attention_implementation(t) -> tuple[str | None, str | None]:
    """The `attn_implementation` the model loads with, and with padding_free a line saying which kernel attends
    over its concatenated row (varlen_attention's unless flash_attention_2/3 is set, which read the same
    boundaries)."""
    if not t.padding_free:
        return t.attn_implementation, None
    if t.attn_implementation:
        return t.attn_implementation, f"padding_free: one row per step, attention through {t.attn_implementation}"
    import varlen_attention

    return varlen_attention.register(), varlen_attention.kernel_note()


def batches_ready(data, packing: bool, max_length: int):
    """Columns the trainer reads: `input_ids`, `labels` and `length` (length-grouped sampling), or with
    packing, rows of up to max_length tokens made by TRL's best-fit-decreasing packer (`seq_lengths` marks
    where each conversation starts, so none attends to another)."""
    from trl.data_utils import pack_dataset

    if not packing:
        return data.select_columns(["input_ids", "labels", "length"])
    return pack_dataset(data.select_columns(["input_ids", "labels"]), max_length, "bfd")


def whole_run_train_loss(history: list[dict]) -> float:
    """Mean training loss over every logged step of the run (a resumed run's history holds the steps before the
    resume too), each log entry weighted by the steps it covers."""
    total, steps, previous = 0.0, 0, 0
    for entry in history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else float("nan")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; raised before the optimizer step, so no checkpoint holds the damage."""


class SaveAndStopOnSignal(TrainerCallback):
    """After a SIGTERM/SIGINT: save a checkpoint at the end of a step, then stop.

    With several processes the stop is agreed: at each step end every process all-reduces (max) the signal it
    received, and acts on the previous step's result, so all stop at the same step and write one checkpoint
    together, whichever process the signal reached. (Each deciding alone left the others in the next step's
    collective: a hang or an abort.) Acting one step late lets the host read a result the device finished long
    ago instead of waiting for the current step's kernels."""

    def __init__(self, trainer: SFTRunTrainer):
        self.trainer = trainer
        self._pending = None  # the previous step's reduced signal: (host tensor, CUDA event or None)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed(args) if args.world_size > 1 else self.trainer.received
        if signum:
            self.trainer.stopped_by = signal.Signals(signum).name
            control.should_save = control.should_training_stop = True

    def _agreed(self, args) -> int:
        import torch.distributed as dist

        previous = self._pending
        flag = torch.tensor([self.trainer.received], dtype=torch.int32, device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True).wait()  # on CUDA the stream waits, not the host
        if flag.is_cuda:
            event = torch.cuda.Event()
            host = flag.to("cpu", non_blocking=True)
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (flag, None)
        if previous is None:
            return 0
        host, event = previous
        if event is not None:
            event.synchronize()  # recorded a step ago: normally long done
        return int(host[0])


class LogEverySavedStep(TrainerCallback):
    """Log the training loss at every step that saves a checkpoint or ends the run. The log history then covers
    every optimizer step, so metrics.json's train loss is the mean over the whole run, after a resume too (a
    checkpoint keeps no loss of the steps between its last log entry and itself). Runs after the callbacks
    that decide saving and stopping."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True


class SampleReplies(TrainerCallback):
    """At each evaluation, the model's greedy replies to a few fixed held-out prompts (stopping at <|eot_id|>):
    appended to save_dir/samples_during_training.jsonl and logged to W&B as a table, so a researcher sees the
    model learn to answer and to stop while it trains. Main process only; skipped when the weights are sharded
    (FSDP/DeepSpeed: generation would need every process); a failure is one warning, once, never the run's end.
    Each step's replies once: not again for an evaluation a resume replays, nor for the evaluation after training
    (with load_best that model is an earlier step's; its replies are in samples.jsonl)."""

    MAX_NEW_TOKENS = 48

    def __init__(self, prompts: list[tuple[list[dict], str]], save_dir: str):
        self.prompts, self.path, self.failed = prompts, run_file(save_dir, "samples_during_training.jsonl"), False
        self.done: set[int] = set()
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        with contextlib.suppress(OSError):
            with open(self.path, encoding="utf-8") as f:
                self.done = {json.loads(line).get("step") for line in f if line.strip()}

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        sharded = getattr(model, "_is_fsdp_managed_module", False) or args.deepspeed or args.fsdp
        if self.failed or not state.is_world_process_zero or sharded or model is None:
            return
        if not self.training or state.global_step in self.done:
            return
        import time

        from model_io import model_reply

        training = model.training
        try:
            model.eval()
            rows = []
            for prompt, reference in self.prompts:  # samples.jsonl's schema, plus the step and the time taken
                start = time.perf_counter()
                reply, stopped = model_reply(model, processing_class, prompt, self.MAX_NEW_TOKENS)
                rows.append({"step": state.global_step, "prompt": prompt, "reply": reply, "stopped_at_eot": stopped,
                             "reference": reference, "generate_s": round(time.perf_counter() - start, 3)})
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            self.done.add(state.global_step)
            wandb = sys.modules.get("wandb")
            if wandb is not None and wandb.run is not None:
                columns = ["step", "prompt", "reply", "stopped_at_eot"]  # the prompt's last turn as text
                wandb.run.log({"eval/samples": wandb.Table(columns=columns, data=[
                    [r["step"], r["prompt"][-1]["content"], r["reply"], r["stopped_at_eot"]] for r in rows])})
        except Exception as e:  # noqa: BLE001 (samples are a view of training, never a reason to stop it)
            self.failed = True
            logger.warning("samples during training failed (%s: %s); training goes on without them",
                           type(e).__name__, e)
        finally:
            model.train(training)


class WriteRunFingerprint(TrainerCallback):
    """Each checkpoint records the settings that define the run (save_dir_contract.run_fingerprint), so a resume under
    other ones is refused instead of silently mixing two runs; its files get the umask's modes (usual_file_modes)."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = checkpoint_dir(args.output_dir, state.global_step)
            write_whole(os.path.join(checkpoint, FINGERPRINT_FILE), self.fingerprint)
            usual_file_modes(checkpoint)


class SFTRunTrainer(SFTTrainer):
    """SFTTrainer plus what a long unattended run needs and TRL lacks:

    - `eval_accuracy`: next-token accuracy over ALL assistant tokens of the eval set. TRL logs
      `eval_mean_token_accuracy`, a mean of per-batch accuracies (short batches weigh as much as long ones).
    - length-grouped training batches (`ConversationLengthSampler`) whenever the dataset has a `length` column.
    - SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and stop; `stopped_by`
      names the signal; with several processes every one stops at the same step (SaveAndStopOnSignal). A
      second signal ends the process at once. (transformers' JIT checkpoint handles
      SIGTERM only, and saves in the middle of a step.)
    - a NaN/inf loss stops the run with `NonFiniteLoss` naming the step.
    - a resumed run uses the configured learning rate from the resumed step on (a checkpoint's scheduler state
      would bring back the old one), so "lower learning_rate and run the same command" works after a NaN.
    - the training loss (`_training_loss`) is TRL's, at fewer host syncs and without the attention mask for our
      right-padded batches.
    """

    stopped_by: str | None = None  # the signal the run stopped for (agreed by every process)
    received: int = 0  # the signal this process received (0: none)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_hits, self._eval_tokens = 0.0, 0
        self._step_metrics: list[torch.Tensor] = []
        # The plain NLL loss (no custom loss, label smoothing, MoE aux loss or Ulysses sequence parallelism) goes
        # through _training_loss; anything else through TRL's compute_loss unchanged.
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        self.fast_training_loss = (self.compute_loss_func is None and self.label_smoother is None
                                   and self.args.loss_type == "nll" and not self.aux_loss_enabled
                                   and not (parallelism is not None and parallelism.sp_enabled))
        # Our collator pads on the right (and packing sends no mask): for those batches the mask changes no real
        # token's logits (causal attention never looks right), and without it SDPA can take its causal kernel.
        self.right_padded = isinstance(self.data_collator, CompletionOnlyCollator)
        self.add_callback(SaveAndStopOnSignal(self))
        self.add_callback(LogEverySavedStep())  # last: sees the save/stop decisions of those before it

    def train(self, *args, **kwargs):
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return super().train(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)
        agreed = " (with every process)" if self.args.world_size > 1 else ""
        logger.warning("%s received: saving a checkpoint after this step%s, then stopping",
                       signal.Signals(signum).name, agreed)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"the training loss became {loss.item()} at step {self.state.global_step + 1}")
        return loss

    def _run_epoch(self, *args, **kwargs):
        """No step past max_steps: resumed from a checkpoint already at max_steps mid-epoch, the Trainer would take
        one more batch before it checks (the epoch loop only checks after a step)."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The resumed schedule is this run's: the configured learning rate (a checkpoint's scheduler state would
        bring the old one back) and the current schedule's value at the resumed step (a finished run continued for
        more epochs would otherwise take its first step at the old schedule's end, often 0)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler, new = self.lr_scheduler, self.args.learning_rate
        if checkpoint is None or not hasattr(scheduler, "lr_lambdas"):
            return
        old = scheduler.base_lrs[0]
        scheduler.base_lrs = [new] * len(scheduler.base_lrs)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = new, new * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if old != new:
            logger.warning("Resuming with learning_rate %g (the checkpoint was trained with %g) from step %d",
                           new, old, scheduler.last_epoch)

    def _issue_warnings_after_load(self, load_result):
        """A checkpoint of a model with tied embeddings stores them once: the missing `lm_head.weight` transformers
        warns about on every resume is expected (the weights are tied again), so only other keys are reported."""
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if tied and set(load_result.missing_keys) <= tied and not load_result.unexpected_keys:
            self.model.tie_weights()
            return
        super()._issue_warnings_after_load(load_result)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if "length" not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ConversationLengthSampler(read_columns(dataset, "length")["length"].tolist(),
                                         self.args.per_device_train_batch_size, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training and self.fast_training_loss and not return_outputs:
            return self._training_loss(model, inputs, num_items_in_batch)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.model.training:
            labels = inputs["labels"]
            n = self.accelerator.gather_for_metrics((labels[:, 1:] != IGNORE_INDEX).sum()).sum().item()
            self._eval_hits += self._metrics["eval"]["mean_token_accuracy"][-1] * n
            self._eval_tokens += n
        return result

    def _training_loss(self, model, inputs, num_items_in_batch):
        """TRL's SFT training loss (SFTTrainer.compute_loss: its fused LM head, summed log-probs of the trained
        tokens over their count) and its per-step metrics (entropy, token accuracy, tokens seen). Ours because TRL
        reads each metric with .item() every step: three host syncs that stall a GPU step; here they stay on the
        device until the next logging step (_log_step_metrics), with the same values."""
        model_inputs = {k: v for k, v in inputs.items() if not (k == "attention_mask" and self.right_padded)}
        outputs = model(**model_inputs, use_cache=False, fused_lm_head=True)
        trained = outputs.label_mask.sum()
        count = trained if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if "attention_mask" in inputs:
            seen = inputs["attention_mask"].sum()
        else:  # padding-free (packing): one row of real tokens, as TRL counts it
            seen = torch.tensor(inputs["position_ids"].size(1), device=trained.device)
        self._step_metrics.append(torch.stack([trained.double(), outputs.entropy.detach().sum().double(),
                                               outputs.is_top1.sum().double(), seen.double()]))
        return loss

    def _log_step_metrics(self) -> None:
        """Move the training steps' metrics into TRL's lists, as TRL would have appended them step by step: one
        gather across processes and one host sync per logging step."""
        if not self._step_metrics:
            return
        steps = len(self._step_metrics)
        gathered = self.accelerator.gather(torch.stack(self._step_metrics))
        per_step = gathered.view(-1, steps, 4).sum(0).tolist()
        self._step_metrics = []
        metrics = self._metrics["train"]
        for trained, entropy, correct, seen in per_step:
            metrics["entropy"].append(entropy / trained if trained > 0 else 0.0)
            metrics["mean_token_accuracy"].append(correct / trained if trained > 0 else 0.0)
            self._total_train_tokens += int(seen) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs, start_time=None):
        if "train_loss" in logs:  # the Trainer's covers the steps since a resume; one number: the whole run's
            logs["train_loss"] = whole_run_train_loss(self.state.log_history)
        if self.model.training:
            self._log_step_metrics()
        if "eval_loss" in logs and self._eval_tokens:
            logs["eval_accuracy"] = self._eval_hits / self._eval_tokens
            self._eval_hits, self._eval_tokens = 0.0, 0
        super().log(logs, start_time)


class ConversationLengthSampler:
    """Batches of whole conversations of similar length, in random order (the default, non-packing path).

    Random megabatches of 50 batches are sorted by length and cut into batches; the full batches of each
    megabatch are then shuffled (a short tail batch goes last, so batch boundaries never shift). Ours rather
    than transformers' train_sampling_strategy samplers: bench/twins.py on the 1,500 shipped rows (Llama-3.2
    tokenizer, batch 16, max_length 512, 2026-12-06) gives padding efficiency 96.9% here, 92.6% for
    `group_by_length` (its megabatches leave each one's batches in descending length order), 38.4% for
    `batch_rebalance` on one process (= a random order: it balances cost across processes and accumulation steps,
    not padding within a batch). The order depends only on seed and epoch, so a resumed run sees the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int, megabatch: int = 50):
        self.lengths, self.batch_size, self.megabatch = list(lengths), batch_size, megabatch
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
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
