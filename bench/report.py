"""The table: every figure as median (min–max), its bar, PASS/FAIL; its rows as data."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import summary
from bench.config import Config


@dataclass
class Row:
    figure: str
    unit: str
    values: list[float]
    bar: str = ""
    threshold: float | None = None  # in the row's unit
    higher_is_better: bool = True
    judge_on: str = "median"  # "median" or "max" (RSS: every process must pass)
    note: str = ""
    cpu: str = ""
    within: float | None = None  # set: PASS when |value / threshold - 1| <= within

    def stats(self) -> dict[str, float] | None:
        return summary(self.values)

    def verdict(self) -> tuple[float | None, str]:
        s = self.stats()
        if s is None:
            return None, "n/a"
        if self.threshold is None or self.threshold <= 0:
            return None, ""
        value = s[self.judge_on]
        ratio = value / self.threshold
        if self.within is not None:
            ok = abs(ratio - 1) <= self.within
        else:
            ok = ratio >= 1 if self.higher_is_better else ratio <= 1
        return ratio, "PASS" if ok else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        ratio, result = self.verdict()
        return {
            "figure": self.figure,
            "unit": self.unit,
            "values": self.values,
            **(self.stats() or {}),
            "bar": self.bar,
            "threshold": self.threshold,
            "vs_bar": None if ratio is None else round(ratio, 3),
            "result": result,
            "note": self.note,
            "cpu": self.cpu,
        }


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(rows: list[Row]) -> str:
    header = ["figure", "unit", "median", "min–max", "bar", "vs bar", "result", "note", "CPU %"]
    lines = [header]
    for row in rows:
        s = row.stats()
        ratio, result = row.verdict()
        lines.append(
            [
                row.figure,
                row.unit,
                fmt(s["median"]) if s else "n/a",
                f"{fmt(s['min'])}–{fmt(s['max'])}" if s else "",
                row.bar,
                "" if ratio is None else f"{ratio:.2f}×",
                result,
                row.note,
                row.cpu,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# The table's rows, as data ------------------------------------------------------------

# CPU columns: (key in a run's `cpu`, label in the table); `other` is added to each.
PGBENCH = (("pgbench", "pgbench"), ("postgres", "pg"))
GEN = (("loadgen", "gen"), ("serve", "serve"), ("postgres", "pg"))
DRAIN = (("dispatch", "disp"), ("postgres", "pg"))
M4 = (
    ("loadgen", "gen"),
    ("serve", "serve"),
    ("dispatch", "disp"),
    ("provider", "prov"),
    ("postgres", "pg"),
)
M4_FLOOR = (("loadgen", "gen"), ("worker", "worker"), *M4[-2:])


@dataclass(frozen=True)
class Ratio:
    """A note `0.93× bare app` (or `96% of ceiling`): the row's median against `base`."""

    base: str  # a figure's name (its median) or a derived value (see `Context.base`)
    label: str
    percent: bool = False


@dataclass(frozen=True)
class Spec:
    """One row of the table. `figure`, `bar` and `note` are format strings over the config
    and `Context.labels` (e.g. `{m1_clients}`, `{med[ws_rss_before]:.0f}`, `{count}`)."""

    figure: str
    unit: str
    source: str  # a figure's name, or `rss:<role>` for the peak RSS of each such process
    bar: str = ""
    threshold: float | None = None  # constant, or `factor` × the median of `relative_to`
    relative_to: str = ""
    ratios: tuple[Ratio, ...] = ()
    note: str = ""
    cpu: tuple[tuple[str, str], ...] = ()
    higher_is_better: bool = True
    judge_on: str = "median"
    within: float | None = None  # see Row.within


ROWS: tuple[Spec, ...] = (
    Spec("floor: pgbench INSERT, 1 client", "tx/s", "floor_c1", cpu=PGBENCH),
    Spec("floor: pgbench INSERT, 16 clients", "tx/s", "floor_c16", cpu=PGBENCH),
    Spec(
        "M1 ingest, 1 client sequential",
        "req/s",
        "m1_single",
        bar="≥ 0.4× floor@1",
        threshold=0.4,
        relative_to="floor_c1",
        ratios=(Ratio("floor_c1", "floor@1"), Ratio("m1_bare", "bare app")),
        cpu=GEN,
    ),
    Spec(
        "M1 floor: bare ASGI app, same INSERT, 1 client",
        "req/s",
        "m1_bare",
        ratios=(Ratio("floor_c1", "floor@1"),),
        cpu=GEN,
    ),
    Spec(
        "M1 ingest, {m1_clients} clients (wrk), 1 serve",
        "req/s",
        "m1_16",
        bar="≥ 5,000",
        threshold=5000,
        ratios=(Ratio("floor_c16", "floor@16"),),
        cpu=GEN,
    ),
    Spec(
        "M1 ingest, batch of {m1_batch:,}",
        "msg/s",
        "m1_batch",
        bar="≥ 40,000",
        threshold=40000,
        ratios=(Ratio("floor_c1", "floor@1"),),
        cpu=GEN,
    ),
    Spec(
        "M2 drain, 1 dispatcher ({m2_concurrency} in flight)",
        "msg/s",
        "m2_1p",
        bar="≥ 12,000",
        threshold=12000,
        cpu=DRAIN,
    ),
    Spec(
        "M2 over {m2_senders} senders, 1 dispatcher ({m2_concurrency} in flight)",
        "msg/s",
        "m2_senders",
        bar="≥ 0.9× M2 1 disp.",
        threshold=0.9,
        relative_to="m2_1p",
        ratios=(Ratio("m2_1p", "M2 1 disp."),),
        note="round-robin, stored fake senders",
        cpu=DRAIN,
    ),
    Spec(
        "M2 from {m2_users:,} users × {m2_per_user}, 1 dispatcher ({m2_concurrency} in flight)",
        "msg/s",
        "m2_users",
        bar="≥ 0.9× M2 1 disp.",
        threshold=0.9,
        relative_to="m2_1p",
        ratios=(Ratio("m2_1p", "M2 1 disp."),),
        note="round-robin users",
        cpu=DRAIN,
    ),
    Spec(
        "M2 one conversation of {conv_n:,} ordered messages, 1 dispatcher",
        "msg/s",
        "m2_conversation",
        ratios=(Ratio("m2_1p", "M2 1 disp."),),
        note="{conv_order}",
        cpu=DRAIN,
    ),
    Spec(
        "M2 drain, 2 dispatchers ({m2_concurrency} in flight each)",
        "msg/s",
        "m2_2p",
        bar="≥ 1× M2 1 disp.",
        threshold=1,
        relative_to="m2_1p",
        ratios=(Ratio("m2_1p", "M2 1 disp."),),
        cpu=DRAIN,
    ),
    Spec(
        "M3 provider {m3_latency_ms:.0f} ms, {m3_concurrency} in flight",
        "msg/s",
        "m3",
        bar="≥ 94% of {m3_ceiling:,.0f}",
        threshold=0.94,
        relative_to="m3_ceiling",
        ratios=(Ratio("m3_ceiling", "ceiling", percent=True),),
        cpu=DRAIN,
    ),
    Spec("M4 latency p50", "ms", "m4_p50", cpu=M4),
    Spec("M4 latency p95", "ms", "m4_p95"),
    Spec("M4 latency p99", "ms", "m4_p99"),
    Spec("M4 latency max", "ms", "m4_max"),
    Spec(
        "M4 to the call's start (PROTOCOL.md), p50",
        "ms",
        "m4_start_p50",
        note="peers: to the handler",
    ),
    Spec("M4 to the call's start (PROTOCOL.md), p99", "ms", "m4_start_p99"),
    Spec(
        "M4 floor: thinnest client, p50",
        "ms",
        "m4floor_p50",
        note="sync psycopg + raw socket",
        cpu=M4_FLOOR,
    ),
    Spec("M4 floor: thinnest client, p99", "ms", "m4floor_p99"),
    Spec("M4 floor: to the claim's return, p50", "ms", "m4floor_start_p50"),
    Spec(
        "M2 limited: 1 sender at {limited_rate:g}/s, 2 dispatchers, {limited_n:,} messages",
        "msg/s",
        "m2_limited",
        bar="{limited_rate:g} ± 2%",
        threshold=1,
        relative_to="limit",
        within=0.02,
        ratios=(Ratio("limit", "limit"),),
        note="first call to last, {limited_timing}",
        cpu=DRAIN,
    ),
    Spec(
        "M2 limited: most calls in any 1 s",
        "calls",
        "m2_limited_peak",
        bar="≤ {limited_cap:,.0f}",
        threshold=1,
        relative_to="limited_cap",
        higher_is_better=False,
        judge_on="max",
        note="limit × (1 + OUTBOX_SENDER_BURST); {limited_timing}",
    ),
    Spec(
        "M2 limited: most rows claimed in any 1 s",
        "rows",
        "m2_limited_claimed_peak",
        bar="≤ {limited_cap:,.0f}",
        threshold=1,
        relative_to="limited_cap",
        higher_is_better=False,
        judge_on="max",
        note="by the claims' clock (the bucket's)",
    ),
    Spec(
        "1 sender at {cpu_rate:g}/s, {cpu_n:,} due, {cpu_dispatchers} disp.: dispatcher CPU",
        "% core",
        "limited_cpu_disp",
        bar="< 5",
        threshold=5,
        higher_is_better=False,
        judge_on="max",
        note="each dispatcher; {cpu_seconds:g} s window",
    ),
    Spec(
        "1 sender at {cpu_rate:g}/s, {cpu_n:,} due, {cpu_dispatchers} disp.: PostgreSQL CPU",
        "% core",
        "limited_cpu_pg",
        bar="< 5",
        threshold=5,
        higher_is_better=False,
        judge_on="max",
        note="its database's backends",
    ),
    Spec(
        "OTP under campaign: high at {otp_rate:g}/s, {otp_campaign:,} low, 1 sender at "
        "{otp_limit:g}/s; p50",
        "ms",
        "otp_p50",
        note="{otp_timing}",
        cpu=M4,
    ),
    Spec(
        "OTP under campaign: p99",
        "ms",
        "otp_p99",
        bar="< 100",
        threshold=100,
        higher_is_better=False,
        note="max {med[otp_max]:.1f} ms",
    ),
    Spec(
        "OTP under campaign: to the call's start (attempts.started_at), p99",
        "ms",
        "otp_start_p99",
        note="p50 {med[otp_start_p50]:.1f} ms",
    ),
    Spec(
        "receipts: webhook ingestion, {receipts_clients} clients, POSTs of {receipts_batch}",
        "statuses/s",
        "receipts_ingest",
        note="{med[receipts_posts]:,.0f} POSTs/s; 1 serve",
        cpu=GEN,
    ),
    Spec("receipts: webhook POST latency p50", "ms", "receipts_post_p50"),
    Spec("receipts: webhook POST latency p99", "ms", "receipts_post_p99"),
    Spec(
        "receipts: POST → message_status on a feed at {receipts_rate:g}/s, p50",
        "ms",
        "receipts_event_p50",
        note="one `read` per POST",
    ),
    Spec("receipts: POST → message_status on a feed, p99", "ms", "receipts_event_p99"),
    Spec(
        "cost growth: M2 1 disp. + {old_rows} old rows",
        "msg/s",
        "growth",
        bar="≥ 0.9× M2 1 disp.",
        threshold=0.9,
        relative_to="m2_1p",
        ratios=(Ratio("m2_1p", "M2 1 disp."),),
        cpu=DRAIN,
    ),
    Spec(
        "ws: serve RSS, {ws_clients:,} idle feeds",
        "MB",
        "ws_rss",
        bar="< 300",
        threshold=300,
        higher_is_better=False,
        note="{med[ws_rss_before]:.0f} MB before they came",
    ),
    Spec("ws: serve RSS once they left", "MB", "ws_rss_after"),
    Spec(
        "ws: POST→event p50 at {m4_rate:.0f}/s, {ws_clients:,} feeds open",
        "ms",
        "ws_p50",
        cpu=M4[:3],
    ),
    Spec("ws: POST→event p99, {ws_clients:,} feeds open", "ms", "ws_p99"),
    Spec(
        "peak RSS, serve (each process)",
        "MB",
        "rss:serve",
        bar="≤ 200",
        threshold=200,
        higher_is_better=False,
        judge_on="max",
        note="{count} processes",
    ),
    Spec(
        "peak RSS, dispatch (each process)",
        "MB",
        "rss:dispatch",
        bar="≤ 150",
        threshold=150,
        higher_is_better=False,
        judge_on="max",
        note="{count} processes",
    ),
)


class _Medians(dict[str, float]):
    """`{med[name]}` in a note: a figure's median, 0 when it has none."""

    def __missing__(self, name: str) -> float:
        return 0


@dataclass
class Context:
    """What the row specs are rendered from: the run's figures, processes and config."""

    figures: dict[str, dict[str, Any]]
    rss: dict[str, list[dict[str, Any]]]
    cfg: Config

    def values(self, source: str) -> list[float]:
        if source.startswith("rss:"):
            return [r["peak_rss_mb"] for r in self.rss[source[4:]] if r["peak_rss_mb"]]
        return list(self.figures.get(source, {}).get("values", []))

    def median(self, name: str) -> float | None:
        s = summary(self.values(name))
        return s["median"] if s else None

    def m3_ceiling(self) -> float:
        """M3's best possible rate: every slot busy with calls of the provider's latency."""
        return 1000 / self.cfg.m3_latency_ms * self.cfg.m3_concurrency

    def limited_cap(self) -> float:
        """The most calls a limited sender may start in any one second."""
        return self.cfg.limited_rate * (1 + self.cfg.sender_burst)

    def base(self, name: str) -> float | None:
        derived = {
            "m3_ceiling": self.m3_ceiling,
            "limit": lambda: self.cfg.limited_rate,
            "limited_cap": self.limited_cap,
        }
        return derived[name]() if name in derived else self.median(name)

    def runs(self, name: str) -> list[dict[str, Any]]:
        return list(self.figures.get(name, {}).get("runs", []))

    def conv_order(self) -> str:
        """What m2_conversation found of its calls' order (a run out of order on a schema
        with order fails instead of recording)."""
        runs = self.runs("m2_conversation")
        if any(run.get("schema_ordered") is False for run in runs):
            worst = max(run.get("out_of_order", 0) for run in runs)
            overlapping = max(run.get("overlapping", 0) for run in runs)
            return (
                f"no order columns (not required): up to {worst} calls out of order, "
                f"{overlapping} overlapping"
            )
        return "one call at a time, in seq order" if runs else ""

    def otp_timing(self) -> str:
        """From where to where the OTPs were timed: from their POST's answer or (an API
        without the `priority` field) their INSERT's commit; to their call's arrival at
        the provider server or (BENCH_OTP_PROVIDER=fake) its start."""
        runs = self.runs("otp_p50")
        start = "INSERT committed" if any(r.get("via") == "sql" for r in runs) else "POST answered"
        fake = any(r.get("timed_by") == "attempts.started_at" for r in runs)
        return f"{start} → call {'starts (fake sender)' if fake else 'arrives'}"

    def labels(self) -> dict[str, Any]:
        old = self.cfg.growth_sent + self.cfg.growth_error
        medians = {name: m for name in self.figures if (m := self.median(name)) is not None}
        return {
            **asdict(self.cfg),
            "m3_ceiling": self.m3_ceiling(),
            "m2_per_user": max(1, self.cfg.m2_n // self.cfg.m2_users),
            "conv_order": self.conv_order(),
            "otp_timing": self.otp_timing(),
            "limited_cap": self.limited_cap(),
            "limited_timing": "arrivals"
            if self.cfg.limited_provider == "http"
            else "attempts.started_at",
            "old_rows": f"{old / 1e6:.1f} M" if old >= 1e6 else f"{old / 1e3:.0f} k",
            "med": _Medians(medians),
        }

    def cpu(self, name: str, keys: tuple[tuple[str, str], ...]) -> str:
        """Median CPU of each process group over the runs; `other` when it reached 10 %."""
        runs = self.figures.get(name, {}).get("runs", [])
        parts = []
        for key, label in [*keys, ("other", "other")]:
            vals = [r["cpu"][key] for r in runs if r.get("cpu") and key in r["cpu"]]
            if vals and (key != "other" or statistics.median(vals) >= 10):
                parts.append(f"{label} {statistics.median(vals):.0f}")
        return " / ".join(parts)

    def ratio(self, value: float | None, ratio: Ratio) -> str:
        base = self.base(ratio.base)
        if value is None or not base:
            return ""
        if ratio.percent:
            return f"{100 * value / base:.0f}% of {ratio.label}"
        return f"{value / base:.2f}× {ratio.label}"

    def threshold(self, spec: Spec) -> float | None:
        if not spec.relative_to or spec.threshold is None:
            return spec.threshold
        base = self.base(spec.relative_to)
        return spec.threshold * base if base else None

    def row(self, spec: Spec, labels: dict[str, Any]) -> Row:
        values = self.values(spec.source)
        labels = {**labels, "count": len(values)}
        value = self.median(spec.source)
        notes = [self.ratio(value, ratio) for ratio in spec.ratios]
        notes.append(spec.note.format(**labels))
        return Row(
            spec.figure.format(**labels),
            spec.unit,
            values,
            bar=spec.bar.format(**labels),
            threshold=self.threshold(spec),
            higher_is_better=spec.higher_is_better,
            judge_on=spec.judge_on,
            within=spec.within,
            note="; ".join(note for note in notes if note),
            cpu=self.cpu(spec.source, spec.cpu) if spec.cpu else "",
        )


def rows(
    figures: dict[str, dict[str, Any]], rss: dict[str, list[dict[str, Any]]], cfg: Config
) -> list[Row]:
    """The table's rows for a run, one per spec of ROWS."""
    context = Context(figures, rss, cfg)
    labels = context.labels()
    return [context.row(spec, labels) for spec in ROWS]
