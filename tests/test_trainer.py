"""SFTRunTrainer in process, on a tiny model: the batches it trains on come from the length-grouped sampler in its
order, a NaN or inf loss stops the run before the optimizer touches the weights, and eval_accuracy is the
token-weighted accuracy over every assistant token of the eval set."""

import json
import math

import pytest
import torch
import trl

from conftest import tiny_data, tiny_trainer
from sft_trainer import ConversationLengthSampler, NonFiniteLoss


@pytest.fixture(scope="module")
def tiny():
    """A small BPE with the Llama-3 special tokens and 40 tokenized HH conversations (conftest.tiny_data)."""
    return tiny_data()


def make_trainer(tiny, tmp_path, steps=3, **sft):
    return tiny_trainer(tmp_path, steps=steps, **sft)


def test_training_batches_come_from_the_length_sampler_in_its_order(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ConversationLengthSampler)
    lengths = trainer.train_dataset["length"]
    expected = [lengths[i] for i in ConversationLengthSampler(lengths, 4, seed=42)]
    seen = [n for batch in trainer.get_train_dataloader() for n in batch["attention_mask"].sum(1).tolist()]
    assert seen == expected


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_before_the_update(tiny, tmp_path, monkeypatch, bad):
    trainer = make_trainer(tiny, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    step = trl.SFTTrainer.training_step
    monkeypatch.setattr(trl.SFTTrainer, "training_step", lambda self, *a, **k: step(self, *a, **k) * bad)
    with pytest.raises(NonFiniteLoss, match=rf"the training loss became {bad} at step 1"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_eval_accuracy_is_token_weighted_over_the_whole_eval_set(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path, steps=40, learning_rate=3e-2)
    trainer.train()  # some skill, so that accuracy is neither 0 nor the same in every batch
    metrics = trainer.evaluate()
    hits = tokens = 0
    batch_means = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            correct = (logits[:, :-1].argmax(-1) == labels) & mask
            hits, tokens = hits + correct.sum().item(), tokens + mask.sum().item()
            batch_means.append(correct.sum().item() / mask.sum().item())
    assert metrics["eval_accuracy"] == pytest.approx(hits / tokens, abs=1e-6)
    assert abs(sum(batch_means) / len(batch_means) - hits / tokens) > 1e-4  # the per-batch mean differs here


def test_final_save_writes_the_run_precision_a_stop_at_eot_and_portable_files(tiny, tmp_path):
    from safetensors import safe_open
    from transformers import GenerationConfig

    from model_io import save_final_model

    tokenizer = tiny[0]
    trainer = make_trainer(tiny, tmp_path)
    trainer.train()
    save_dir = tmp_path / "out"
    save_final_model(trainer, tokenizer, str(save_dir), "bf16")
    with safe_open(save_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    generation = GenerationConfig.from_pretrained(save_dir)
    assert generation.eos_token_id[0] == eot and generation.pad_token_id == tokenizer.pad_token_id
    config = json.loads((save_dir / "config.json").read_text())
    assert config["use_cache"] is True and "rope_theta" in config
    assert json.loads((save_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (save_dir / "trainer_state.json").is_file() and not (save_dir / ".final-model-tmp").exists()


def test_a_resume_trains_with_the_configured_learning_rate(tiny, tmp_path):
    first = make_trainer(tiny, tmp_path, steps=4, lr_scheduler_type="constant", learning_rate=0.05)
    first.args.save_strategy, first.args.save_steps = "steps", 2
    first.train()
    resumed = make_trainer(tiny, tmp_path, steps=4, lr_scheduler_type="constant", learning_rate=0.001)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    rates = {h["step"]: h["learning_rate"] for h in resumed.state.log_history if "learning_rate" in h}
    assert rates[1] == rates[2] == 0.05 and rates[3] == rates[4] == 0.001
    assert all(g["lr"] == 0.001 for g in resumed.optimizer.param_groups)



def test_a_resume_from_a_checkpoint_at_max_steps_mid_epoch_trains_no_step(tiny, tmp_path):
    """The fifth trial's late kill, in process: resumed from checkpoint-2 of a max_steps 2 run that stopped mid-epoch,
    the Trainer took one more batch before it checked max_steps; now the weights are the checkpoint's."""
    from safetensors.torch import load_file

    first = make_trainer(tiny, tmp_path, steps=2, save_steps=2, lr_scheduler_type="constant")
    first.train()
    assert first.state.epoch < 1  # stopped mid-epoch
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    resumed = make_trainer(tiny, tmp_path, steps=2, save_steps=2, lr_scheduler_type="constant")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 2
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items() if k in saved)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def test_lora_trains_only_the_adapter_and_saves_base_plus_adapter_merged(tiny, tmp_path):
    """Base weights stay bit-identical while training (only lora_A/lora_B move); the saved folder is an ordinary
    model whose logits are the adapted model's, and the adapter is kept beside it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model_io import save_final_model

    trainer = make_trainer(tiny, tmp_path, steps=3, lora=LORA)
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_A" in k or "lora_B" in k for k in trainable)
    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)  # base: bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in trainable if "lora_B" in k)  # the adapter learned

    ids = torch.tensor([tiny[1][0]["input_ids"][:40]])
    with torch.no_grad():
        adapted = model.eval()(ids).logits
    save_dir = tmp_path / "out"
    save_final_model(trainer, tiny[0], str(save_dir), "fp32")
    merged = AutoModelForCausalLM.from_pretrained(save_dir)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert (merged(ids).logits - adapted).abs().max().item() <= 1e-5
    (tmp_path / "base").mkdir()
    base = PeftModel.from_pretrained(make_trainer(tiny, tmp_path / "base").model, save_dir / "adapter")
    with torch.no_grad():  # the kept adapter on a fresh base gives the same function
        assert (base.model.eval()(ids).logits - adapted).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_the_fast_training_loss_trains_exactly_what_trls_loss_trained(tiny, tmp_path):
    """Speed must not change what is trained: 20 steps of the default path (no attention mask for right-padded
    batches, TRL's metrics kept on the device until a logging step) against TRL's compute_loss with the mask, same
    seed and data: the same loss (1e-4 relative), grad norm, and the same logged entropy, accuracy and token count."""
    logged = {}
    for fast in (False, True):
        (tmp_path / str(fast)).mkdir()
        trainer = make_trainer(tiny, tmp_path / str(fast), steps=20, batch_size=2)
        trainer.fast_training_loss = fast
        trainer.train()
        logged[fast] = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged[True]) == len(logged[False]) == 20
    for step, (new, old) in enumerate(zip(logged[True], logged[False]), start=1):
        for name in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert new[name] == pytest.approx(old[name], rel=1e-4), (step, name)


def test_the_fast_training_loss_syncs_the_host_only_at_logging_steps(tiny, tmp_path):
    """TRL reads three metrics with .item() at every step; ours reads them once per logging step. Counted as torch
    dispatches the host syncs (aten::_local_scalar_dense), over 6 steps that log at the first and the last."""
    from torch.profiler import profile

    syncs = {}
    for fast, mask in ((False, True), (True, True), (True, False)):
        (tmp_path / f"{fast}{mask}").mkdir()
        trainer = make_trainer(tiny, tmp_path / f"{fast}{mask}", steps=6, batch_size=2, log_steps=100)
        trainer.fast_training_loss, trainer.right_padded = fast, not mask
        with profile() as prof:
            trainer.train()
        syncs[fast, mask] = sum(e.name == "aten::_local_scalar_dense" for e in prof.events())
    # TRL reads at least three per step (each `.item()`, and `num_valid > 0` twice); ours one per logging step
    assert syncs[False, True] - syncs[True, True] >= 3 * 6 - 2
    assert syncs[True, False] < syncs[True, True]  # and the masked forward's own checks


@pytest.mark.slow
def test_gradient_accumulation_trains_what_one_large_batch_trains(tmp_path):
    """4 micro-batches of 2 and one batch of 8, the same 8 conversations (the same seeded order): the loss is over
    the accumulated batch's trained tokens (TRL's num_items_in_batch), so loss, gradient norm and weights agree.
    Divided by each micro-batch's own count instead, short conversations would weigh more."""
    runs = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        trainer = tiny_trainer(tmp_path / f"{batch}x{accumulation}", steps=1, batch_size=batch,
                               gradient_accumulation=accumulation, learning_rate=1e-2)
        trainer.train_dataset = trainer.train_dataset.remove_columns("length")  # a plain seeded order, same rows
        trainer.train()
        logged = next(h for h in trainer.state.log_history if "loss" in h)
        runs[accumulation] = (logged, {k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    (one, one_weights), (four, four_weights) = runs[1], runs[4]
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, weight in one_weights.items():
        torch.testing.assert_close(four_weights[name], weight, rtol=1e-5, atol=1e-6)
