"""Tables for the console and for files, rendered by `rich` (text and markdown) and `csv`."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

FORMATS = ("text", "md", "csv")


def render(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "text",
           right: Sequence[str] = (), title: str | None = None) -> str:
    """`rows` under `header` as an aligned text table (`fmt="text"`), a markdown table (`"md"`) or CSV (`"csv"`).
    Columns named in `right` are right-aligned (numbers). Text is never wrapped or cut: lines are as wide as
    the table needs."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows([["" if c is None else c for c in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.MARKDOWN if fmt == "md" else box.SIMPLE_HEAD, title=None if fmt == "md" else title,
                  title_justify="left", show_edge=fmt == "md", pad_edge=fmt == "md")
    for h in header:
        table.add_column(str(h), justify="right" if h in right else "left", no_wrap=True)
    for r in rows:
        table.add_row(*("" if c is None else str(c) for c in r))
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(table)
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)
