"""Packing (`packing: true`): conversations packed in one row must not see each other. Per-token losses of a
packed, padding-free batch (TRL's BFD packer and collator, as training runs them) equal those of the same
conversations run unpacked and padded, and so do the labels."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from data_process_sft import CompletionOnlyCollator
from hh_sft_chat import IGNORE_INDEX, tokenize_conversations

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times three?"}, {"role": "assistant", "content": "Twelve, of course."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
    [{"role": "user", "content": "A long question about the weather in the hills this weekend?"},
     {"role": "assistant", "content": "Expect rain on Saturday and sun on Sunday afternoon."}],
]


def per_token_losses(logits, labels):
    """Loss of each trained token (HF convention: position t predicts labels[t + 1])."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses, shift_labels != IGNORE_INDEX


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_matches_unpacked(llama32_tokenizer, attn_implementation):
    tokenizer = llama32_tokenizer
    ids = tokenize_conversations(tokenizer, CONVERSATIONS)
    collator = CompletionOnlyCollator(tokenizer)
    labels = collator.labels_for(ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation=attn_implementation)).eval()

    unpacked = collator([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)])
    with torch.no_grad():
        logits = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"],
                       use_cache=False).logits
    expected, expected_mask = per_token_losses(logits, unpacked["labels"])

    packed_rows = pack_dataset(Dataset.from_dict({"input_ids": ids, "labels": labels}), 96, "bfd")
    assert len(packed_rows) < len(ids)  # several conversations share a row
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        list(packed_rows))
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position_ids
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).logits
    got, got_mask = per_token_losses(packed_logits, batch["labels"])

    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    matched = set()
    for begin, end in zip(starts, starts[1:]):
        segment = batch["input_ids"][0, begin:end].tolist()
        row = ids.index(segment)
        matched.add(row)
        n = len(segment)
        assert batch["labels"][0, begin:end].tolist() == labels[row]  # labels survive packing
        # the segment's own predictions (its last token predicts nothing of its own)
        seg_mask = got_mask[0, begin:end - 1]
        assert seg_mask.tolist() == expected_mask[row, : n - 1].tolist()
        torch.testing.assert_close(got[0, begin:end - 1][seg_mask], expected[row, : n - 1][seg_mask],
                                   atol=1e-4, rtol=0)
    assert matched == set(range(len(ids)))
