"""Oracle: on all real HH rows, our ids and labels equal what TRL itself builds with assistant_only_loss=True
(its llama3_training.jinja with {% generation %} markers), with the real Llama-3.2 tokenizer."""

from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from data_process_sft import build_sft_dataset


def test_labels_equal_trl_assistant_only_loss_masks(hh_rows, llama32_tokenizer, tmp_path):
    raw = Dataset.from_list(hh_rows)
    ours = build_sft_dataset(raw, llama32_tokenizer, num_proc=2)
    messages = build_sft_dataset(raw)  # the same rows, untokenized
    assert len(ours) == len(messages) >= 1490

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama32_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, report_to=[],
                     use_cpu=True, bf16=False, dataset_num_proc=2)
    trl_data = SFTTrainer(model=model, args=args, train_dataset=messages,
                          processing_class=llama32_tokenizer).train_dataset

    assert len(trl_data) == len(ours)
    mismatched = [i for i, (a, b) in enumerate(zip(ours, trl_data))
                  if a["input_ids"] != b["input_ids"] or a["labels"] != b["labels"]]
    assert mismatched == []
