"""Test double of dynamic-dpo-v1's own SFT script (replaced by a pointer on install)."""

from data_process_sft import build_sft_dataset  # noqa: F401
