"""Test double of dynamic-dpo-v1's dataset_process_hh.py (written for the tests): HH rows -> raw-text
prompt ("...\n\nAssistant:") and the final replies."""

from datasets import Dataset

TAG = "\n\nAssistant:"


def build_HH_dataset(ds):  # noqa: N802 (upstream's name)
    rows = []
    for row in ds:
        cut = row["chosen"].rfind(TAG) + len(TAG)
        prompt = row["chosen"][:cut]
        if cut >= len(TAG) and row["rejected"].startswith(prompt):
            chosen, rejected = row["chosen"][cut:].lstrip("\n"), row["rejected"][cut:].lstrip("\n")
            if chosen.strip() and rejected.strip():
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)
