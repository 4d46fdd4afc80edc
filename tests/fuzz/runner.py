"""Schemathesis against a running outbox, once per identity, and the run's totals.

Its command line (`schemathesis run`: every phase and every check) reads the published
/openapi.json; its NDJSON report gives each generated case with its response and the
checks' verdicts, which are added up here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEND_OPERATIONS = (
    "POST /api/v1/whatsapp/send",
    "POST /api/v1/whatsapp/send/",
    "POST /api/v1/whatsapp/send/batch",
)


@dataclass(frozen=True)
class Failure:
    identity: str
    check: str
    code: str
    title: str
    operation: str
    status: int | None
    request: str  # enough to replay it by hand
    response: str


@dataclass
class Totals:
    # (identity, "METHOD /path", generation mode, response status or None) → cases
    cases: Counter[tuple[str, str, str, int | None]] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    dropped: int = 0  # failures the hooks' filter_failure set aside (see hooks.py)
    output: dict[str, str] = field(default_factory=dict)  # the CLI's own report, by identity

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def statuses(self, operations: tuple[str, ...] | None = None) -> Counter[int | None]:
        counts: Counter[int | None] = Counter()
        for (_, operation, _, status), count in self.cases.items():
            if operations is None or operation in operations:
                counts[status] += count
        return counts

    def sends(self) -> tuple[int, int]:
        """(sends answered 202, sends generated) over the single and batch routes."""
        statuses = self.statuses(SEND_OPERATIONS)
        return statuses[202], sum(statuses.values())

    def summary(self) -> str:
        accepted, sends = self.sends()
        lines = [
            f"cases: {self.total}",
            "statuses: "
            + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses().items(), key=str)),
            f"sends: {sends}, answered 202: {accepted} ({accepted / max(sends, 1):.1%})",
            f"failures: {len(self.failures)} (set aside by hooks.py: {self.dropped})",
        ]
        by_operation: Counter[tuple[str, str, int | None]] = Counter()
        for (_, operation, mode, status), count in self.cases.items():
            by_operation[(operation, mode, status)] += count
        lines += [
            f"  {operation} [{mode}] {status}: {count}"
            for (operation, mode, status), count in sorted(by_operation.items(), key=str)
        ]
        for failure in self.failures:
            lines.append(
                f"FAILURE {failure.code} {failure.title} ({failure.check}, as {failure.identity}):"
                f" {failure.operation} → {failure.status}\n    {failure.request}"
                f"\n    ← {failure.response}"
            )
        return "\n".join(lines)


def _request_text(case: Mapping[str, Any]) -> str:
    parts = [f"{case.get('method')} {case.get('path')}"]
    for key in ("path_parameters", "query", "body"):
        if case.get(key) not in (None, {}):
            parts.append(f"{key}={json.dumps(case[key], ensure_ascii=True)[:2000]}")
    return " ".join(parts)


def _response_text(response: Mapping[str, Any] | None) -> str:
    if not response:
        return "(no response)"
    content = response.get("content") or {}
    body = base64.b64decode(content["$base64"]) if "$base64" in content else b""
    return body[:1000].decode(errors="replace")


def _events(report: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with report.open() as lines:
        for line in lines:
            event = json.loads(line)
            yield from event.items()


def _error(identity: str, title: str, detail: str) -> Failure:
    """A run that went wrong (an engine error, a crash): as much a failure as a check's."""
    return Failure(identity, "error", "-", title, "-", None, detail[-2000:], "")


def add_report(totals: Totals, identity: str, report: Path) -> None:
    """Count the cases of one NDJSON report, and keep its failures and errors."""
    for name, event in _events(report):
        if name in ("NonFatalError", "FatalError"):
            totals.failures.append(_error(identity, name, json.dumps(event, default=str)))
            continue
        if name not in ("ScenarioFinished", "FuzzScenarioFinished"):
            continue
        recorder = event["recorder"]
        totals.dropped += sum(recorder.get("filtered_failures", {}).values())
        cases = recorder.get("cases", {})
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = cases.get(case_id, {}).get("value", {})
            operation = f"{case.get('method')} {case.get('path')}"
            mode = ((case.get("meta") or {}).get("generation") or {}).get("mode", "?")
            response = interaction.get("response")
            status = response["status_code"] if response else None
            totals.cases[(identity, operation, mode, status)] += 1
            for check in recorder.get("checks", {}).get(case_id, []):
                if check["status"] == "success":
                    continue
                info = (check.get("failure_info") or {}).get("failure", {})
                totals.failures.append(
                    Failure(
                        identity=identity,
                        check=check["name"],
                        code=info.get("code", "?"),
                        title=info.get("title", check["status"]),
                        operation=info.get("operation", operation),
                        status=status,
                        request=_request_text(case),
                        response=_response_text(response),
                    )
                )


def run(
    base_url: str,
    identities: Mapping[str, str],
    *,
    max_examples: int,
    seed: int,
    phases: str,
    workdir: Path,
    timeout: float,
) -> Totals:
    """`schemathesis run` against `base_url` once per identity (name → bearer token)."""
    totals = Totals()
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    for identity, token in identities.items():
        report = workdir / f"{identity}.ndjson"
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--phases",
            phases,
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--generation-deterministic",
            "--continue-on-failure",
            "--workers",
            "1",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            "--no-color",
        ]
        done = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout
        )
        totals.output[identity] = output = done.stdout + done.stderr
        failures_before = len(totals.failures)
        if report.exists():
            add_report(totals, identity, report)
        # Exit 1 comes with the failures counted above; anything else is the run's own.
        if done.returncode != 0 and len(totals.failures) == failures_before:
            totals.failures.append(_error(identity, f"exit {done.returncode}", output))
    return totals
