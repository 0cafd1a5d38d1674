"""model_io in process: the portable fields transformers 4.x reads are written from what transformers 5 saved,
without changing what transformers 5 reads; gathered weights are cast with their safetensors metadata kept."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import HUB_ROPE
from model_io import cast_saved_weights, write_portable_files

LLAMA3_ROPE = {**HUB_ROPE["rope_scaling"], "rope_theta": HUB_ROPE["rope_theta"]}  # as transformers 5 holds it


def saved(tmp_path, rope):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "is_local": True, "local_files_only": True, "eos_token": "x"}))
    write_portable_files(str(tmp_path))
    return (json.loads((tmp_path / name).read_text()) for name in ("config.json", "tokenizer_config.json"))


def test_llama3_rope_and_tokenizer_class_are_written_for_transformers_4(tmp_path):
    config, tokenizer = saved(tmp_path, LLAMA3_ROPE)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert config["rope_parameters"] == LLAMA3_ROPE  # what transformers 5 reads, unchanged
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "x"}


def test_default_rope_has_no_scaling_and_a_folder_without_the_files_is_left_alone(tmp_path):
    config, _ = saved(tmp_path, {"rope_type": "default", "rope_theta": 10000.0})
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    config, _ = saved(tmp_path, {"rope_theta": 10000.0})  # no rope_type: the default
    assert config["rope_scaling"] is None
    fast = {"tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(fast))
    write_portable_files(str(tmp_path))  # nothing to drop: unchanged
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == fast
    empty = tmp_path / "empty"
    empty.mkdir()
    write_portable_files(str(empty))
    assert list(empty.iterdir()) == []


def test_the_portable_config_loads_in_transformers_5_as_the_same_rope(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                rope_parameters=LLAMA3_ROPE).save_pretrained(tmp_path)
    write_portable_files(str(tmp_path))
    assert LlamaConfig.from_pretrained(tmp_path).rope_parameters == LLAMA3_ROPE


def test_cast_keeps_the_pt_metadata_that_from_pretrained_expects(tmp_path):
    save_file({"w": torch.randn(2, 2)}, tmp_path / "model-00001.safetensors", metadata={"format": "pt"})
    cast_saved_weights(str(tmp_path), torch.float16)
    with safe_open(tmp_path / "model-00001.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and f.get_tensor("w").dtype == torch.float16


def test_generation_stops_at_eot_and_at_the_bases_eos_whatever_the_tokenizer_names(llama32_tokenizer):
    from model_io import stop_token_ids

    eot, end_of_text = 128009, 128001
    named = llama32_tokenizer.eos_token
    try:
        for eos in ("<|end_of_text|>", "<|eot_id|>"):  # the base's eos still, or already the chat model's
            llama32_tokenizer.eos_token = eos
            for base_eos in (end_of_text, [end_of_text]):
                assert stop_token_ids(llama32_tokenizer, base_eos) == [eot, end_of_text]
    finally:
        llama32_tokenizer.eos_token = named
