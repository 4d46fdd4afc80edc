"""The dependency locks agree with pyproject.toml, and everything installs from them.

requirements-dev.lock (runtime + the dev extra; `make run`, `make test`) and
requirements.lock (runtime; the image) are one universal resolution written by `make lock`.
A dependency added to pyproject.toml, tightened, given an extra or dropped without
re-locking fails here, naming it and the fix. `make audit` (tests/ops/audit.py) checks the
locked set for known vulnerabilities; it is not run here, so a new advisory cannot turn
CI red."""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import subprocess
import threading
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.ops import audit
from tests.ops.test_containers import DOCKERFILE, instructions

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
FIX = "run `make lock` and commit requirements.lock and requirements-dev.lock"
PROJECT_VIA = "outbox (pyproject.toml)"  # how uv names pyproject.toml in `# via` lines

# The lock is universal: a requirement counts if its marker holds anywhere we support.
_BASE = {**default_environment(), "extra": ""}
ENVIRONMENTS = [
    {
        **_BASE,
        "sys_platform": sys_platform,
        "platform_system": system,
        "os_name": os_name,
        "python_version": f"3.{minor}",
        "python_full_version": f"3.{minor}.0",
    }
    for sys_platform, system, os_name in (
        ("linux", "Linux", "posix"),
        ("darwin", "Darwin", "posix"),
        ("win32", "Windows", "nt"),
    )
    for minor in range(11, 15)
]


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: frozenset[str]
    via: frozenset[str]  # what the lock says needs it: package names or PROJECT_VIA


def read_lock(text: str) -> dict[NormalizedName, Pin]:
    """`name==version ; marker --hash=…` entries of a uv/pip-compile file, with `# via`."""
    entries: dict[NormalizedName, tuple[Requirement, list[str], set[str]]] = {}
    current: NormalizedName | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("#"):
            via = line.lstrip("#").strip().removeprefix("via").strip()
            if current is not None and via and not via.startswith("-c "):
                entries[current][2].add(via)
            continue
        if not line:
            continue
        spec, *hashes = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        current = canonicalize_name(requirement.name)
        entries[current] = (requirement, hashes, set())
    pins = {}
    for name, (requirement, hashes, via) in entries.items():
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{requirement}: a lock pins with =="
        assert hashes, f"{requirement}: no --hash (a lock is installed with --require-hashes)"
        via_names = {v if v == PROJECT_VIA else canonicalize_name(v) for v in via}
        pins[name] = Pin(Version(specifier.version), frozenset(hashes), frozenset(via_names))
    return pins


def project_requirements(pyproject: str) -> tuple[list[Requirement], list[Requirement]]:
    """([project.dependencies], the dev extra) of a pyproject.toml's text."""
    project = tomllib.loads(pyproject)["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return runtime, dev


def applies(requirement: Requirement, extras: Iterable[str] = ("",)) -> bool:
    marker = requirement.marker
    return marker is None or any(
        marker.evaluate({**env, "extra": extra}) for env in ENVIRONMENTS for extra in extras
    )


def unpinned(
    requirements: Iterable[Requirement], pins: dict[NormalizedName, Pin], lock: str
) -> list[str]:
    """Requirements the lock does not pin, or pins at a version they do not accept."""
    problems = []
    for requirement in requirements:
        if not applies(requirement):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement}: not in {lock}")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement}: {lock} pins {pin.version}")
    return problems


def stale(roots: Iterable[Requirement], pins: dict[NormalizedName, Pin], lock: str) -> list[str]:
    """Pins nothing in pyproject.toml leads to any more, by the lock's own `# via` lines."""
    wanted = {canonicalize_name(r.name) for r in roots}
    reached = {name for name, pin in pins.items() if PROJECT_VIA in pin.via and name in wanted}
    grew = True
    while grew:
        more = {name for name, pin in pins.items() if pin.via & reached} - reached
        reached |= more
        grew = bool(more)
    unreached = sorted(set(pins) - reached)
    return [
        f"{name}=={pins[name].version}: {lock} pins it, nothing requires it" for name in unreached
    ]


def unpinned_dependencies(
    roots: Iterable[Requirement], pins: dict[NormalizedName, Pin], lock: str
) -> list[str]:
    """What the installed packages require, with the extras asked for (here, on this
    platform), that the lock does not pin or pins at a version they do not accept: an
    extra added to a requirement (`psycopg[binary,pool,c]`) without re-locking."""
    problems: list[str] = []
    queue = [(r, "pyproject.toml") for r in roots if applies(r)]
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    while queue:
        requirement, parent = queue.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if name == "outbox":
            continue
        pin = pins.get(name)
        if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
            if parent != "pyproject.toml":  # those, unpinned() names
                found = "not in" if pin is None else f"{pin.version} in"
                problems.append(f"{requirement} (required by {parent}): {found} {lock}")
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (another platform's, or a venv before the lock)
        extras = ("", *requirement.extras)
        for text in requires:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({**_BASE, "extra": e}) for e in extras):
                queue.append((dependency, name))
    return problems


def disagreements(pyproject: str, dev_lock: str, lock: str) -> list[str]:
    runtime, dev = project_requirements(pyproject)
    dev_pins, pins = read_lock(dev_lock), read_lock(lock)
    problems = [
        *unpinned([*runtime, *dev], dev_pins, DEV_LOCK.name),
        *unpinned(runtime, pins, LOCK.name),
        *stale([*runtime, *dev], dev_pins, DEV_LOCK.name),
        *stale(runtime, pins, LOCK.name),
        *unpinned_dependencies([*runtime, *dev], dev_pins, DEV_LOCK.name),
    ]
    # The image runs what the tests ran: the runtime lock is the dev lock's subset.
    for name, pin in sorted(pins.items()):
        dev_pin = dev_pins.get(name)
        if dev_pin is None or (dev_pin.version, dev_pin.hashes) != (pin.version, pin.hashes):
            found = "not" if dev_pin is None else f"{dev_pin.version}"
            problems.append(f"{name}=={pin.version} in {LOCK.name}, {found} in {DEV_LOCK.name}")
    return problems


def test_the_locks_agree_with_pyproject() -> None:
    assert LOCK.exists() and DEV_LOCK.exists(), f"no lock files: {FIX}"
    problems = disagreements(PYPROJECT.read_text(), DEV_LOCK.read_text(), LOCK.read_text())
    assert problems == [], f"pyproject.toml and the locks disagree ({FIX}):\n  " + "\n  ".join(
        problems
    )


def _edited(old: str, new: str) -> list[str]:
    pyproject = PYPROJECT.read_text()
    assert old in pyproject, old
    edited = pyproject.replace(old, new, 1)
    return disagreements(edited, DEV_LOCK.read_text(), LOCK.read_text())


def test_a_dependency_added_without_relocking_is_named() -> None:
    # A new dependency, runtime or dev; a bound the pin no longer meets; a new extra.
    added = _edited('"cronsim>=2.6",', '"cronsim>=2.6", "left-pad>=1",')
    assert any(p.startswith("left-pad>=1: not in requirements-dev.lock") for p in added), added
    assert any(p.startswith("left-pad>=1: not in requirements.lock") for p in added), added
    dev = _edited('"pytest>=8",', '"pytest>=8", "right-pad>=2",')
    assert dev == ["right-pad>=2: not in requirements-dev.lock"], dev  # not the image's
    tightened = _edited('"starlette>=0.46",', '"starlette>=999",')
    assert any(p.startswith("starlette>=999: requirements-dev.lock pins") for p in tightened)
    extra = _edited('"psycopg[binary,pool]>=3.2",', '"psycopg[binary,pool,c]>=3.2",')
    assert any(p.startswith("psycopg-c") and "not in" in p for p in extra), extra
    # A dependency dropped: its pin (and what only it needed) is stale.
    dropped = _edited('"cronsim>=2.6",', "")
    assert any(p.startswith("cronsim==") and "nothing requires it" in p for p in dropped)


# How it is installed ---------------------------------------------------------------------


def test_make_installs_the_dev_lock_and_the_project_without_its_dependencies() -> None:
    """`make -n` prints what `make venv` would run after a lock change (nothing is run)."""
    dry = subprocess.run(
        ["make", "-n", "-W", DEV_LOCK.name, "venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.splitlines()
    sync = [c for c in commands if " pip sync " in c or " pip install " in c]
    assert any("--require-hashes" in c and c.endswith(DEV_LOCK.name) for c in sync), commands
    project = [c for c in sync if c.endswith("-e .")]
    assert project and all("--no-deps" in c for c in project), commands
    assert not any("[dev]" in c for c in commands), "installs from pyproject.toml, not the lock"


def test_the_image_installs_the_runtime_lock_with_hashes() -> None:
    pairs = instructions(DOCKERFILE.read_text())
    runs = [args for keyword, args in pairs if keyword == "RUN"]
    locked = [r for r in runs if "-r requirements.lock" in r]
    assert locked and "--require-hashes" in locked[0], runs
    project = [r for r in runs if "--editable ." in r]
    assert project and "--no-deps" in project[0], runs
    assert runs.index(locked[0]) < runs.index(project[0])
    assert ("COPY", "requirements.lock ./") in pairs


# make audit --------------------------------------------------------------------------------


@pytest.fixture
def advisory_server() -> Iterator[str]:
    """A local stand-in for PyPI's JSON API: release JSON with a `vulnerabilities` list."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"info": {}, "vulnerabilities": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # OSV's query; any JSON object is an answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_audit_says_in_one_line_when_no_advisory_database_answers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    down = _closed_port()
    monkeypatch.delenv("AUDIT_STRICT", raising=False)
    assert audit.main([str(DEV_LOCK)], pypi=down, osv=down) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOT audited" in err, err
    assert "/pypi/" in err and "/v1/query" in err, err  # both databases, each with why
    monkeypatch.setenv("AUDIT_STRICT", "1")
    assert audit.main([str(DEV_LOCK)], pypi=down, osv=down) == audit.UNREACHABLE_STRICT_EXIT
    assert capsys.readouterr().err.count("\n") == 1


def test_audit_probe_accepts_only_advisory_data(advisory_server: str) -> None:
    name, version = audit.first_pin(DEV_LOCK)
    assert audit.probe_pypi(name, version, advisory_server) is None
    assert audit.probe_osv(name, version, advisory_server) is None
    refused = audit.probe_pypi(name, version, _closed_port())
    assert refused is not None and "refused" in refused.lower(), refused
