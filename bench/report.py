"""The table: every figure as median (min–max), the issue's bars, PASS/FAIL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.common import summary


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
