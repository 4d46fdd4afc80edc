"""`make audit`: pip-audit on the locked set, or one line saying why it cannot run.

pip-audit asks PyPI's JSON API (`/pypi/<name>/<version>/json`) by default. Where that
answers 404 for every release (a proxy that serves PyPI's index but not that API, as on
the development machines) pip-audit prints "No known vulnerabilities found" having
audited nothing; where the host cannot be reached it ends in a traceback. So this first
asks each advisory database about one release the lock pins, and runs pip-audit against
the first that answers, with --strict: a release it then cannot look up fails the audit.

Exit status: pip-audit's (0 clean, 1 a pinned release has a known vulnerability); where
no database answers, 0 after one line on stderr, or 2 with AUDIT_STRICT=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

PYPI = "https://pypi.org"
OSV = "https://api.osv.dev"
TIMEOUT = 10.0
UNREACHABLE_STRICT_EXIT = 2
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def first_pin(lock: Path) -> tuple[str, str]:
    match = PIN.search(lock.read_text())
    if match is None:
        raise SystemExit(f"audit: {lock} pins nothing (run `make lock`)")
    return match.group(1), match.group(2)


def _ask(request: urllib.request.Request, key: str | None) -> str | None:
    """None when the answer is a JSON object (with `key`, if given), else why not."""
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except urllib.error.URLError as error:
        return str(error.reason)
    except (OSError, ValueError) as error:  # timeout, reset, not JSON
        return str(error) or type(error).__name__
    if not isinstance(body, dict) or (key is not None and key not in body):
        return "an answer that is not advisory data"
    return None


def probe_pypi(name: str, version: str, base: str = PYPI) -> str | None:
    url = f"{base}/pypi/{name}/{version}/json"
    reason = _ask(urllib.request.Request(url), "vulnerabilities")
    return None if reason is None else f"{url}: {reason}"


def probe_osv(name: str, version: str, base: str = OSV) -> str | None:
    url = f"{base}/v1/query"
    query = {"package": {"name": name, "ecosystem": "PyPI"}, "version": version}
    request = urllib.request.Request(
        url, data=json.dumps(query).encode(), headers={"Content-Type": "application/json"}
    )
    # OSV answers `{}` for a release with no advisory: any JSON object will do.
    reason = _ask(request, None)
    return None if reason is None else f"{url}: {reason}"


def main(argv: Sequence[str], pypi: str = PYPI, osv: str = OSV) -> int:
    lock = Path(argv[0]) if argv else Path("requirements-dev.lock")
    name, version = first_pin(lock)
    reasons = []
    for service, probe, base in (("pypi", probe_pypi, pypi), ("osv", probe_osv, osv)):
        reason = probe(name, version, base)
        if reason is None:
            command = [
                *(sys.executable, "-m", "pip_audit", "--requirement", str(lock)),
                *("--require-hashes", "--disable-pip", "--strict"),
                *("--vulnerability-service", service, "--progress-spinner", "off"),
            ]
            return subprocess.run(command, check=False).returncode
        reasons.append(reason)
    strict = os.environ.get("AUDIT_STRICT", "") not in ("", "0")
    print(
        f"audit: no advisory database answers ({'; '.join(reasons)}): "
        f"{lock} NOT audited" + (" (AUDIT_STRICT=1: exit 2)" if strict else ""),
        file=sys.stderr,
    )
    return UNREACHABLE_STRICT_EXIT if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
