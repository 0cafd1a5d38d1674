"""Test double of dynamic-dpo-v1's training.py (written for the tests): the three lines dpo_handoff.py's install
edits, in a script of the same shape."""

import argparse

import yaml
from datasets import load_dataset
from dataset_process_hh import build_HH_dataset
from risk_dpo_trainer import RiskBetaDPOConfig, RiskBetaDPOTrainer
from transformers import AutoModelForCausalLM
from trl import DPOConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config_dpo.yaml")
    config = yaml.safe_load(open(parser.parse_args().config))
    dpo_train_args = config["dpo_training"]
    raw_ds = load_dataset(config["dataset"]["dataset_name"], split=config["dataset"]["subset"])
    hh_ds = build_HH_dataset(raw_ds)  
    training_args = DPOConfig(
        per_device_train_batch_size=int(dpo_train_args["batch_size"]),
        output_dir=dpo_train_args['save_dir'],
    )
    trainer = RiskBetaDPOTrainer(model=AutoModelForCausalLM.from_pretrained(config["policy_name"]),
                                 ref_model=AutoModelForCausalLM.from_pretrained(config["ref_name"]),
                                 args=training_args, train_dataset=hh_ds, processing_class=None,
                                 dynamic_cfg=RiskBetaDPOConfig())
    trainer.train()


if __name__ == "__main__":
    main()
