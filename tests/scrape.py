"""Scraping a real /metrics endpoint over HTTP, parsed by prometheus_client's own parser."""

from __future__ import annotations

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of the exposition at `url`, keyed by (sample name, labels)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, default: float | None = None, **labels: str) -> float:
    """One sample's value; `default` when it is absent (None: it must be there)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        present = sorted(dict(got) for n, got in samples if n == name)
        assert default is not None, f"no sample {name}{labels}; {name} has {present}"
        return default
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on."""
    return {
        conn.laddr.port
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
