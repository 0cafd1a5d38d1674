"""What dynamic-dpo-v1 imports after `python dpo_handoff.py install` (copied there with data_process_sft.py and the
modules it imports): the DPO rows as SFT tokenized them, and its training loss's log-probs from TRL's own code.

    build_dpo_pairs(raw, tok, max_length)        HH rows -> rows TRL 0.26 tokenizes exactly as SFT did; pairs over
                                                 max_length dropped and counted, so TRL never cuts one
    sft_token_ids_row(features, ...)             TRL's tokenize_row for those rows: SFT's token ids, unchanged
    dpo_length_args(max_length)                  the DPOConfig length keys that go with them
    trl_sequence_logps(trainer, model, inputs)   policy and reference log-probs of prompt + reply, from TRL, with
                                                 the metrics TRL's DPOTrainer logs (rewards/*, logps/*, logits/*)
"""

from __future__ import annotations


def build_dpo_pairs(raw, tokenizer, max_length: int):
    """The DPO rows of `raw` as SFT tokenized them (build_dpo_dataset), pairs over `max_length` tokens dropped;
    prints what was kept and dropped."""
    from hh_sft_chat import build_dpo_dataset

    pairs, report = build_dpo_dataset(raw, tokenizer, max_length=max_length, return_report=True)
    print(f"DPO data (hh-sft chat format, max_length {max_length}): {report.summary()}")
    return pairs


def sft_token_ids_row(features, processing_class=None, max_prompt_length=None, max_completion_length=None,
                      add_special_tokens=False) -> dict:
    """TRL 0.26's DPOTrainer.tokenize_row for rows from build_dpo_pairs: the token ids SFT trained on, as they are
    (the row's `*_input_ids`, the reply's eos included). TRL's own tokenize_row re-tokenizes the text, which turns a
    literal "<|eot_id|>" typed in a message into the control token. Nothing is cut: every pair already fits."""
    return {key: features[key] for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}


def dpo_length_args(max_length: int) -> dict:
    """DPOConfig keys for rows from build_dpo_pairs: TRL 0.26's defaults keep the last 512 prompt tokens (cutting
    the BOS and first turns of long prompts); every pair already fits `max_length`, so nothing is cut."""
    return {"max_length": max_length, "max_prompt_length": None, "max_completion_length": None}


def trl_sequence_logps(trainer, model, inputs) -> tuple:
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs of each reply and its
    eos given its prompt, computed as TRL's own DPO loss does (concatenated_forward; the reference pass, or the
    precomputed reference log-probs when `precompute_ref_log_probs` is on).

    Also stores the training metrics TRL's DPOTrainer logs, under its names and with its values (its sigmoid loss's
    rewards, beta * (policy - reference) log-prob, with the trainer's `beta`: the one the repo's loss uses at this
    step), so its W&B panels stay."""
    policy = trainer.concatenated_forward(model, inputs)
    if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(inputs)
    chosen, rejected = policy["chosen_logps"], policy["rejected_logps"]
    device = trainer.accelerator.device
    chosen_rewards = trainer.beta * (chosen.to(device) - ref_chosen.to(device)).detach()
    rejected_rewards = trainer.beta * (rejected.to(device) - ref_rejected.to(device)).detach()
    per_pair = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "rewards/margins": chosen_rewards - rejected_rewards,
                "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
                "logits/chosen": policy["mean_chosen_logits"].detach(),
                "logits/rejected": policy["mean_rejected_logits"].detach()}
    trainer.store_metrics({name: trainer.accelerator.gather_for_metrics(value).mean().item()
                           for name, value in per_pair.items()}, train_eval="train")
    return chosen, rejected, ref_chosen, ref_rejected
