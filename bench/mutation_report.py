"""Per-module table of a mutmut run (killed / timeout / survived / no tests), for MUTATION.md.

    mutmut run --max-children 2 <the patterns in MUTATION.md>
    python bench/mutation_report.py > table.md
"""

from __future__ import annotations

import subprocess
from collections import Counter, defaultdict

STATUSES = ("killed", "timeout", "survived", "no tests")


def mutant_statuses() -> list[tuple[str, str]]:
    """(mutant name, status) of every mutant of the last `mutmut run`, in mutmut's order."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    rows = (line.strip().rpartition(": ") for line in out.splitlines())
    return [(name, status) for name, _, status in rows if status in (*STATUSES, "not checked")]


def main() -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, status in mutant_statuses():
        if status in STATUSES:
            counts[name.split(".x")[0]][status] += 1
    print("| module | killed | timeout | survived | no tests | score |\n|---|---:|---:|---:|---:|---:|")
    total = Counter()
    for module, c in sorted(counts.items()):
        total.update(c)
        print(_row(module, c))
    print(_row("**all**", total))


def _row(name: str, c: Counter) -> str:
    caught, scored = c["killed"] + c["timeout"], sum(c[s] for s in STATUSES)
    return f"| {name} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | {caught / scored:.1%} |"


if __name__ == "__main__":
    main()
