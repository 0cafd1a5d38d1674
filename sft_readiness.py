"""Reference readiness: how the SFT model scores the preference pairs the DPO stage will train on.

DPO starts from this model as its reference. Before spending GPU hours on DPO it is worth knowing whether SFT
raised the log-probability of the chosen replies over the base model, how the reference already ranks chosen
against rejected (its implicit preference accuracy, where DPO's margins start), and how far apart and how
spread the chosen-rejected log-prob margins are (the DPO repo's dynamic-beta logic reacts to margins).

    held_out_pairs(raw, eval_rows, n)          the SFT eval split's rows as DPO pairs (build_dpo_dataset)
    reply_sequences(tokenizer, pairs, ...)     the pairs tokenized as SFT does, and where each reply starts
    reply_logps(model, replies, ...)           sum and per-token mean log-prob of each chosen/rejected reply
    summarize(sft, base)                       the report: means, SFT vs base, preference accuracy, margins
    score_readiness(...)                       both models, one at a time (the base freed after), timed
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from data_process_sft import CompletionOnlyCollator
from hh_sft_chat import IGNORE_INDEX, build_dpo_dataset, tokenize_conversations

PERCENTILES = (5, 25, 50, 75, 95)


def held_out_pairs(raw, eval_rows: list[int], n: int):
    """The first `n` preference pairs among the raw rows of the SFT eval split, built and filtered exactly as
    for the DPO stage (conversational rows; pairs build_dpo_dataset drops are not scored)."""
    pairs = build_dpo_dataset(raw.select(sorted(eval_rows)))
    return pairs.select(range(min(n, len(pairs))))


def reply_sequences(tokenizer, pairs, max_length: int) -> tuple[list[int], list[list[int]], list[int]]:
    """Token ids of prompt + chosen and prompt + rejected of every pair (the SFT tokenization: chat template, one
    BOS, the reply and its <|eot_id|>, in one batched call) and where each reply starts; pairs with a side over
    max_length are left out. Returns (kept pair indices, sequences, reply starts), chosen before rejected."""
    conversations = [pair["prompt"] + pair[side] for pair in pairs for side in ("chosen", "rejected")]
    ids = tokenize_conversations(tokenizer, conversations)
    labels = CompletionOnlyCollator(tokenizer).labels_for(ids)
    kept, sequences, starts = [], [], []
    for i in range(len(pairs)):
        if max(len(ids[2 * i]), len(ids[2 * i + 1])) > max_length:
            continue
        for seq, row in zip(ids[2 * i: 2 * i + 2], labels[2 * i: 2 * i + 2]):
            trained = np.asarray(row) != IGNORE_INDEX
            sequences.append(seq)
            starts.append(len(seq) - int(np.argmin(trained[::-1])) if not trained.all() else 0)
        kept.append(i)
    return kept, sequences, starts


@torch.no_grad()
def reply_logps(model, replies, pad_id: int, *, batch_size: int) -> dict[str, np.ndarray]:
    """Per kept pair of `replies` (reply_sequences): `chosen_sum`, `rejected_sum` (log-prob of the final reply and
    its <|eot_id|> given the prompt) and `chosen_mean`, `rejected_mean` (per reply token). One forward per batch
    of `batch_size` sequences."""
    kept, sequences, starts = replies
    sums, counts = np.zeros(len(sequences)), np.zeros(len(sequences))
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: little padding
    for begin in range(0, len(order), batch_size):
        batch = order[begin: begin + batch_size]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        reply = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
            reply[row, starts[i]: len(sequences[i])] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = ids[:, 1:].to(device)
        token_logp = logits[:, :-1].gather(-1, targets[..., None])[..., 0] - logits[:, :-1].logsumexp(-1)
        token_logp = token_logp * reply[:, 1:].to(device)
        sums[batch] = token_logp.sum(-1).double().cpu().numpy()
        counts[batch] = reply[:, 1:].sum(-1).numpy()
    means = sums / np.maximum(counts, 1)
    return {"pairs": np.asarray(kept), "chosen_sum": sums[0::2], "rejected_sum": sums[1::2],
            "chosen_mean": means[0::2], "rejected_mean": means[1::2]}


def summarize(sft: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict:
    """The readiness numbers (see the README's "Reference readiness" for what each means for DPO)."""
    margin = sft["chosen_sum"] - sft["rejected_sum"]
    if not len(margin):
        return {"pairs": 0}
    return {
        "pairs": int(len(margin)),
        "sft_chosen_logp": float(sft["chosen_sum"].mean()),
        "sft_rejected_logp": float(sft["rejected_sum"].mean()),
        "base_chosen_logp": float(base["chosen_sum"].mean()),
        "base_rejected_logp": float(base["rejected_sum"].mean()),
        "sft_chosen_logp_per_token": float(sft["chosen_mean"].mean()),
        "sft_rejected_logp_per_token": float(sft["rejected_mean"].mean()),
        "base_chosen_logp_per_token": float(base["chosen_mean"].mean()),
        "base_rejected_logp_per_token": float(base["rejected_mean"].mean()),
        "chosen_raised_share": float((sft["chosen_sum"] > base["chosen_sum"]).mean()),
        "pref_accuracy": float((margin > 0).mean()),
        "pref_accuracy_per_token": float((sft["chosen_mean"] > sft["rejected_mean"]).mean()),
        "margin_mean": float(margin.mean()),
        "margin_std": float(margin.std()),
        "margin_percentiles": {f"p{q}": float(np.percentile(margin, q)) for q in PERCENTILES},
        "margins": [round(float(m), 4) for m in margin],
        "margins_per_token": [round(float(m), 4) for m in sft["chosen_mean"] - sft["rejected_mean"]],
    }


def score_readiness(sft_dir: str, base_name: str, tokenizer, pairs, *, max_length: int, batch_size: int) -> dict:
    """Score the pairs under the saved SFT model, then under the base model (loaded only for this, freed
    after), both in fp32 as the DPO repo loads them; the report, with the seconds it took."""
    from transformers import AutoModelForCausalLM

    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    replies = reply_sequences(tokenizer, pairs, max_length)  # tokenized once, scored by both models
    scores = {}
    for name, folder in (("sft", sft_dir), ("base", base_name)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        scores[name] = reply_logps(model, replies, tokenizer.pad_token_id, batch_size=batch_size)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    report = summarize(scores["sft"], scores["base"])
    report["pairs_over_max_length"] = len(pairs) - report["pairs"]
    report["seconds"] = round(time.time() - start, 1)
    return report


def wandb_metrics(report: dict) -> dict[str, float]:
    """The W&B keys of the report (logged as eval/ref_*)."""
    if not report.get("pairs"):
        return {}
    return {"eval/ref_pref_accuracy": report["pref_accuracy"], "eval/ref_chosen_logp": report["sft_chosen_logp"],
            "eval/ref_rejected_logp": report["sft_rejected_logp"],
            "eval/ref_chosen_raised_share": report["chosen_raised_share"],
            **{f"eval/ref_margin_{k}": v for k, v in report["margin_percentiles"].items()}}


TOO_FEW = 50  # pairs under which the report's shares and percentiles are noise (one pair moves them by > 2%)


def summary_lines(report: dict, max_length: int | None = None) -> list[str]:
    """The report as a few printed lines, with how to read them; a report on fewer than TOO_FEW pairs says it is
    too few to read, and how many pairs were left out for length."""
    if not report.get("pairs"):
        return ["Reference readiness: no held-out preference pairs to score"]
    p = report["margin_percentiles"]
    left_out = report.get("pairs_over_max_length", 0)
    caveat = []
    if report["pairs"] < TOO_FEW:
        why = (f"; {left_out} more were left out because a side is over max_length {max_length}" if left_out else "")
        caveat = [f"  too few to read: {report['pairs']} pairs (under {TOO_FEW}, one pair moves a share by over 2%)"
                  f"{why}; more held-out preference rows (a larger val_ratio or dataset) give a readable report"]
    return [
        *caveat,
        f"Reference readiness ({report['pairs']} held-out pairs, {report['seconds']} s):",
        f"  chosen log-prob  SFT {report['sft_chosen_logp']:.2f}  base {report['base_chosen_logp']:.2f}  "
        f"(raised over base on {report['chosen_raised_share']:.0%} of pairs)",
        f"  rejected log-prob  SFT {report['sft_rejected_logp']:.2f}  base {report['base_rejected_logp']:.2f}",
        f"  preference accuracy (chosen > rejected)  by sum {report['pref_accuracy']:.0%}, "
        f"per token {report['pref_accuracy_per_token']:.0%}",
        f"  chosen-rejected margin  p5 {p['p5']:.2f}  p50 {p['p50']:.2f}  p95 {p['p95']:.2f}  "
        f"(std {report['margin_std']:.2f})",
        "  reading it: chosen raised over the base on most pairs = SFT moved toward the preferred replies; a "
        "preference accuracy far above 50% leaves DPO less to learn on these pairs (README: the readiness report)",
    ]
