"""Tables and numbers that fit an 80-column terminal.

Rich shrinks a table wider than the terminal by cutting its columns to `loc…`;
these tables use less room (no vertical rules, two spaces between columns)
and print numbers compactly, so the common case fits and a long name wraps
instead of being cut.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

__all__ = ["compact_table", "count", "latency", "usd"]


def compact_table(title: str | None = None, caption: str | None = None) -> Table:
    """A table with a rule under its header and nothing else: each column costs its content plus two spaces."""
    return Table(
        title=title, caption=caption, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False
    )


def count(value: int) -> str:
    """12, 9,999, 12.3k, 4.6M: at most six characters."""
    if value < 10_000:
        return f"{value:,}"
    if value < 1_000_000:
        return f"{value / 1000:.1f}k"
    return f"{value / 1_000_000:.1f}M"


def latency(ms: float | None) -> str:
    """443ms, 2.5s, 397s: the unit written, so milliseconds and a 7-minute outlier stay short."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s" if ms < 10_000 else f"{ms / 1000:.0f}s"


def usd(value: float | None) -> str:
    """$0.000123, $0.0123, $12.34: six significant decimals for the small amounts a call costs."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if value >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if value >= 0.01 else f"${value:.6f}"
