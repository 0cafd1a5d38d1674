"""Run inside the DPO repo's pinned stack (trl 0.26.2), from a copy of the test double after `dpo_handoff.py
install` (cwd): train a few steps with the installed RiskBetaDPOTrainer (beta held at beta_0, as upstream's
risk-test warm-up holds it) and with TRL's stock DPOTrainer (sigmoid loss, same beta) on the same rows, seed and
batch order, both from the SFT folder. Writes each run's per-step logs to a JSON file for tests/test_dpo_handoff.py.

    python dpo_oracle_check.py SFT_DIR HH_FILE OUT_JSON
"""

import json
import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from hh_sft_dpo import build_dpo_pairs, dpo_length_args
from risk_dpo_trainer import RiskBetaDPOConfig, RiskBetaDPOTrainer

MAX_LENGTH, STEPS, BETA = 256, 4, 0.1


def run(trainer_class, sft_dir, pairs, tmp, **extra):
    args = DPOConfig(output_dir=tmp, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3, beta=BETA,
                     logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=7,
                     remove_unused_columns=False, disable_tqdm=True, **dpo_length_args(MAX_LENGTH))
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(sft_dir),
                            ref_model=AutoModelForCausalLM.from_pretrained(sft_dir), args=args,
                            train_dataset=pairs, processing_class=None, **extra)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def main(sft_dir, hh_file, out_json):
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    raw = load_dataset("json", data_files=hh_file, split="train[:24]")
    pairs = build_dpo_pairs(raw, tokenizer, max_length=MAX_LENGTH)
    installed = run(RiskBetaDPOTrainer, sft_dir, pairs, out_json + "-installed",
                    dynamic_cfg=RiskBetaDPOConfig(beta_0=BETA, log_margins=False))
    stock = run(DPOTrainer, sft_dir, pairs, out_json + "-stock")
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"installed": installed, "stock": stock}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
