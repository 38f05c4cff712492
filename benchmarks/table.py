"""The one table format every benchmark prints: aligned columns of strings."""

from __future__ import annotations

from typing import Sequence


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        return
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
