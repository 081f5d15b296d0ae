"""Numbers as people read them at a glance: durations, latencies, rates, counts, bytes.
Shared by the dashboard, the summary line and the outage lines of sinks and the relay."""

from __future__ import annotations


def fmt_duration(seconds: float | None) -> str:
    """Compact and readable at a glance: 0.4s, 12s, 3m12s, 2h05m, 3d04h."""
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return fmt_duration(seconds)


def fmt_rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s" if per_second >= 100 else f"{per_second:.1f}/s"


def fmt_count(n: int, cap: int | None = None) -> str:
    return f"{n:,}+" if cap is not None and n >= cap else f"{n:,}"


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TB"
