"""Test double of dynamic-dpo-v1's own SFT data module (replaced by ours on install)."""
