"""Read a histogram's totals from the servers' Prometheus /metrics (shared by the benchmarks)."""

from __future__ import annotations

import re

import requests


def histogram_totals(urls: list[str], metric: str, kind: str = "inference") -> tuple[float, float]:
    """(sum, count) of histogram `metric` with label kind=`kind`, summed over the servers at `urls`."""
    total = count = 0.0
    for url in urls:
        text = requests.get(f"{url}/metrics", timeout=10).text
        total += sum(float(v) for v in re.findall(rf'{metric}_sum\{{kind="{kind}"\}} (\S+)', text))
        count += sum(float(v) for v in re.findall(rf'{metric}_count\{{kind="{kind}"\}} (\S+)', text))
    return total, count
