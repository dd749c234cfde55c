"""Shared bits of the `kvplug` command line: the error type and plain-text tables.

    CliError(message)               a user error: main prints one line and exits with status 2
    format_table(rows, columns)     left-aligned text table of dict rows
    human_bytes(n)                  "1.5 MiB"
"""
from __future__ import annotations

from typing import Sequence


class CliError(Exception):
    """An error the user can fix; the message says how. Never shown with a traceback."""


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() else f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
