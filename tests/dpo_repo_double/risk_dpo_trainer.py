"""Test double of dynamic-dpo-v1's risk_dpo_trainer.py, written for tests/test_dpo_handoff.py (not copied from it).

Its training loss does what upstream's did at commit a8345ab: it runs both models on the reply alone
(`chosen_input_ids` hold only the reply in TRL 0.26) and masks the reply's first len(prompt) tokens, so short
replies score nothing. The lines dpo_handoff.py's install replaces open and close the block as upstream's do.
"""

from dataclasses import dataclass

import torch
from trl import DPOTrainer


def compute_log_prob(logits, labels):
    """Summed log-prob of the labelled tokens (labels -100 are not scored)."""
    targets = labels[:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * (targets != -100)).sum(-1)


def dpo_loss_tensor(policy_chosen_log_prob, policy_rejected_log_prob, ref_chosen_log_prob, ref_rejected_log_prob,
                    beta):
    """Per-pair sigmoid DPO loss and the implicit rewards."""
    chosen = beta * (policy_chosen_log_prob - ref_chosen_log_prob)
    rejected = beta * (policy_rejected_log_prob - ref_rejected_log_prob)
    return -torch.nn.functional.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


@dataclass
class RiskBetaDPOConfig:
    beta_0: float = 0.1
    log_margins: bool = True


class RiskBetaDPOTrainer(DPOTrainer):
    def __init__(self, *args, dynamic_cfg, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = dynamic_cfg.beta_0

    def labels_without_prompt(self, inputs, side):
        labels = inputs[f"{side}_input_ids"].clone()
        for row, prompt_length in enumerate(inputs["prompt_attention_mask"].sum(1).tolist()):
            labels[row, :prompt_length] = -100
        labels[inputs[f"{side}_attention_mask"] == 0] = -100
        return labels

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        # policy chosen and response output (needs grads)
        policy_chosen_out = model(input_ids=inputs["chosen_input_ids"],
                                  attention_mask=inputs["chosen_attention_mask"]).logits
        policy_rejected_out = model(input_ids=inputs["rejected_input_ids"],
                                    attention_mask=inputs["rejected_attention_mask"]).logits
        with torch.no_grad():
            ref_chosen_out = self.ref_model(input_ids=inputs["chosen_input_ids"],
                                            attention_mask=inputs["chosen_attention_mask"]).logits
            ref_rejected_out = self.ref_model(input_ids=inputs["rejected_input_ids"],
                                              attention_mask=inputs["rejected_attention_mask"]).logits
        chosen_labels = self.labels_without_prompt(inputs, "chosen")
        rejected_labels = self.labels_without_prompt(inputs, "rejected")
        policy_chosen_log_prob = compute_log_prob(logits=policy_chosen_out, labels=chosen_labels)
        policy_rejected_log_prob = compute_log_prob(logits=policy_rejected_out, labels=rejected_labels)
        ref_chosen_log_prob = compute_log_prob(logits=ref_chosen_out, labels=chosen_labels)
        ref_rejected_log_prob = compute_log_prob(logits=ref_rejected_out, labels=rejected_labels)
        losses, chosen_rewards, rejected_rewards = dpo_loss_tensor(
            policy_chosen_log_prob=policy_chosen_log_prob, policy_rejected_log_prob=policy_rejected_log_prob,
            ref_chosen_log_prob=ref_chosen_log_prob, ref_rejected_log_prob=ref_rejected_log_prob, beta=self.beta)
        loss = losses.mean()
        return (loss, {"chosen": chosen_rewards, "rejected": rejected_rewards}) if return_outputs else loss
