"""Read a histogram's totals from the servers' Prometheus /metrics (shared by the benchmarks)."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def histogram_totals_in(text: str, metric: str, kind: str = "inference") -> tuple[float, float]:
    """(sum, count) of histogram `metric` with label kind=`kind` in one /metrics text (other labels ignored)."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("kind") != kind:
                continue
            if sample.name == f"{metric}_sum":
                total += sample.value
            elif sample.name == f"{metric}_count":
                count += sample.value
    return total, count


def histogram_totals(urls: list[str], metric: str, kind: str = "inference") -> tuple[float, float]:
    """(sum, count) of histogram `metric` with label kind=`kind`, summed over the servers at `urls`."""
    total = count = 0.0
    for url in urls:
        one_sum, one_count = histogram_totals_in(requests.get(f"{url}/metrics", timeout=10).text, metric, kind)
        total += one_sum
        count += one_count
    return total, count
