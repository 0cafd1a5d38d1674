"""Run a sample of the mutants that only the DPO repo's stack reaches against the slow tests that run there.

`dpo_handoff.py check` scores pairs in a process of its own, with the DPO repo's pinned stack (transformers 4.57.3,
trl 0.26.2 in `.dpo-stack`): mutmut's in-process coverage never sees that code, so it lists those mutants as "no
tests" (or, for `check` itself, whose refusals run in process, as survivors of the quick tier). This script runs
each sampled mutant (every `--every`-th, in mutmut's order) against the tests that run check in that stack; the
mutated code runs there because those processes start from mutants/ with MUTANT_UNDER_TEST in their environment.

    mutmut run --max-children 2 "handoff_record.*" "dpo_handoff.*" "hh_sft_dpo.*" "sft_report.*"
    python bench/mutation_sample.py --every 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mutation_report import mutant_statuses  # bench/, beside this script

ROOT = Path(__file__).resolve().parent.parent
# The code that runs only in the DPO repo's stack: check past its input refusals, and what it calls there
IN_DPO_STACK = ("dpo_handoff.x_check_", "dpo_handoff.x__measure_", "dpo_handoff.x__loss_logps_",
                "dpo_handoff.x__check_vocabulary_", "dpo_handoff.x__repo_rows_", "dpo_handoff.x__pairs_",
                "dpo_handoff.x__load_tokenizer_", "hh_sft_dpo.x_trl_sequence_logps_", "hh_sft_dpo.x_build_dpo_pairs_")
TESTS = ("tests/test_dpo_handoff.py::test_check_fails_on_reply_only_scoring_then_passes_after_install",
         "tests/test_dpo_handoff.py::test_check_refuses_a_model_whose_vocabulary_is_smaller_than_its_tokenizer")


def unkilled() -> list[str]:
    """The mutants of IN_DPO_STACK that the mutmut run did not kill, in mutmut's order."""
    return [name for name, status in mutant_statuses()
            if name.startswith(IN_DPO_STACK) and status in ("no tests", "survived")]


def run(mutant: str, timeout: int) -> str:
    # check runs as a script (`python dpo_handoff.py check`), where its functions' module is __main__: mutmut's
    # trampoline applies a mutant only in the module it names
    active = mutant.replace("dpo_handoff.", "__main__.", 1) if mutant.startswith("dpo_handoff.") else mutant
    env = {**os.environ, "MUTANT_UNDER_TEST": active}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                                cwd=ROOT / "mutants", env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if result.returncode == 0 else "killed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=10, help="run every N-th mutant (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default: %(default)s)")
    parser.add_argument("names", nargs="*", help="run these mutants instead of a sample")
    args = parser.parse_args()
    stack = ROOT / "mutants" / ".dpo-stack"
    if not stack.exists():
        stack.symlink_to(ROOT / ".dpo-stack")
    names = unkilled()
    sample = args.names or names[::args.every]
    print(f"{len(names)} mutants reached only in the DPO repo's stack; running {len(sample)}"
          + ("" if args.names else f" (every {args.every}th)"))
    results = {}
    for name in sample:
        results[name] = run(name, args.timeout)
        print(f"{name}: {results[name]}", flush=True)
    counts = {status: list(results.values()).count(status) for status in ("killed", "timeout", "survived")}
    print(f"sample: {counts['killed']} killed, {counts['timeout']} timeout, {counts['survived']} survived of "
          f"{len(sample)}")


if __name__ == "__main__":
    main()
