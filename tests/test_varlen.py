"""padding_free: the default's batches (same sampler, labels and loss normalisation) concatenated into one row
with no padding, attended per conversation (varlen_attention): the same training signal as padded batches."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import varlen_attention
from conftest import tiny_data, tiny_trainer, write_config
from data_process_sft import CompletionOnlyCollator
from sft_trainer import flattening_collator


def tiny_llama(tokenizer, layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))


def per_token_loss(logits, labels):
    """-log p(label) of every trained position (labels shifted as the causal-LM loss shifts them)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    trained = target != -100
    return -logp[trained].gather(-1, target[trained][:, None]).squeeze(-1)


def test_the_collator_concatenates_whole_conversations_with_their_boundaries():
    tokenizer, data = tiny_data()
    rows = [data[i] for i in range(5)]
    padded, flat = CompletionOnlyCollator(tokenizer)(rows), flattening_collator()(rows)
    sizes = [len(r["input_ids"]) for r in rows]
    mask = padded["attention_mask"].bool()
    assert flat["input_ids"].shape == (1, sum(sizes)) and "attention_mask" not in flat  # no padding at all
    assert torch.equal(flat["input_ids"][0], padded["input_ids"][mask])
    assert torch.equal(flat["labels"][0], padded["labels"][mask])  # the same labels, BOS untrained
    assert flat["cu_seq_lens_q"].tolist() == [0, *torch.tensor(sizes).cumsum(0).tolist()]
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["max_length_q"] == max(sizes)
    assert flat["position_ids"][0].tolist() == [p for n in sizes for p in range(n)]


def test_per_token_losses_equal_the_padded_batchs():
    tokenizer, data = tiny_data()
    rows = [data[i] for i in range(8)]
    padded, flat = CompletionOnlyCollator(tokenizer)(rows), flattening_collator()(rows)
    model = tiny_llama(tokenizer).eval()
    with torch.no_grad():
        want = per_token_loss(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                              padded["labels"])
        model.set_attn_implementation(varlen_attention.register())
        got = per_token_loss(model(**{k: v for k, v in flat.items() if k != "labels"}).logits, flat["labels"])
    assert got.shape == want.shape and len(got) > 100
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_twenty_steps_of_varlen_batches_train_what_padded_batches_train(tmp_path):
    """The same sampler order, labels and token normalisation: losses and grad norms of 20 optimizer steps agree
    within 1e-4 relative, and so do the trained weights."""
    runs = {}
    for padding_free in (False, True):
        trainer = tiny_trainer(tmp_path / str(padding_free), steps=20, padding_free=padding_free, batch_size=3,
                               learning_rate=5e-3)
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
        runs[padding_free] = (history, dict(trainer.model.named_parameters()))
    (padded, padded_weights), (varlen, varlen_weights) = runs[False], runs[True]
    assert len(padded) == len(varlen) == 20
    for a, b in zip(padded, varlen):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    assert padded[0]["loss"] != padded[-1]["loss"]  # it trained
    for name, weight in padded_weights.items():
        torch.testing.assert_close(varlen_weights[name], weight, rtol=1e-4, atol=1e-5)


def test_a_call_without_boundaries_is_plain_causal_attention_and_a_padded_batch_without_mask_is_refused():
    """Generation (the samples at each eval, the report's) runs the same model with no boundaries."""
    tokenizer, data = tiny_data()
    model = tiny_llama(tokenizer, layers=1).eval()
    ids = torch.tensor([data[0]["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.set_attn_implementation(varlen_attention.register())
        torch.testing.assert_close(model(input_ids=ids).logits, want)
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
        with pytest.raises(ValueError, match="got a batch of 2 rows and no mask"):
            model(input_ids=torch.cat([ids, ids]))
    assert greedy.shape == (1, ids.shape[1] + 4)


def test_the_saved_config_names_no_attention_of_ours(tmp_path):
    tokenizer, _ = tiny_data()
    model = tiny_llama(tokenizer, layers=1)
    model.set_attn_implementation(varlen_attention.register())
    model.save_pretrained(tmp_path)
    assert varlen_attention.ATTENTION not in (tmp_path / "config.json").read_text()


def test_on_a_cpu_the_note_says_sdpa_runs_once_per_conversation():
    assert "SDPA once per conversation (no varlen kernel on this machine" in varlen_attention.kernel_note()


@pytest.mark.parametrize(("keys", "said"), [
    ({"packing": True}, "sft_training.padding_free: packing already trains without padding"),
    ({"attn_implementation": "sdpa"}, "leave attn_implementation null instead of sdpa")])
def test_padding_free_with_packing_or_a_dense_attention_is_one_line(tmp_path, base_model_dir, keys, said):
    import run_env
    from sft_config import ConfigError, load_config

    cfg = load_config(str(write_config(tmp_path, base_model_dir, padding_free=True, **keys)))
    with pytest.raises(ConfigError, match=said):
        run_env.check_before_loading(cfg)
