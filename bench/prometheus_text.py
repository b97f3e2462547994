"""Reading a histogram out of a service's Prometheus text, so the bench can report what the server did."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative count per upper bound (`le`, +Inf included) of histogram `name` in Prometheus text."""
    for family in text_string_to_metric_families(text):
        if family.name == name and family.type == "histogram":
            return {float(s.labels["le"]): s.value for s in family.samples if s.name == f"{name}_bucket"}
    raise ValueError(f"histogram {name!r} is not in the metrics text")


def bucket_counts(before: dict[float, float], after: dict[float, float]) -> dict[float, int]:
    """Observations that fell in each bucket between two scrapes: the cumulative counts' difference, un-cumulated.
    A key is the bucket's upper bound; its lower bound is the previous key."""
    counts, below = {}, 0.0
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        counts[bound] = round(cumulative - below)
        below = cumulative
    return counts


def share_at_most(counts: dict[float, int], bound: float) -> float:
    """Share of observations in buckets whose upper bound is at most `bound` (0 when there are none)."""
    total = sum(counts.values())
    return sum(n for b, n in counts.items() if b <= bound) / total if total else 0.0


def format_buckets(counts: dict[float, int]) -> str:
    """`1:3 2:0 3-4:5 …` — each bucket as its range of integer rows and its count, empty tail buckets left out."""
    parts, lower = [], 0.0
    last = max((b for b, n in counts.items() if n), default=0.0)
    for bound in sorted(counts):
        if bound > last:
            break
        low = int(lower) + 1
        label = f"{low}" if low == bound else f"{low}-{'inf' if bound == float('inf') else int(bound)}"
        parts.append(f"{label}:{counts[bound]}")
        lower = bound
    return " ".join(parts)
