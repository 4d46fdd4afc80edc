"""`outbox` as a real process: --help, bad settings, serve's logs, token, and dev."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from psycopg.conninfo import make_conninfo

from outbox.cli import build_parser
from outbox.dev import without_password
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import OUTBOX, Process, clean_env, free_port
from tests.support import wait_for

SEND = "/api/v1/whatsapp/send/"
PHONE = "5511999999999"
MASKED = "5511*****9999"
SHORT_PHONE = "12345678"


def subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        choices: dict[str, Any] = getattr(action, "choices", None) or {}
        if choices:
            return sorted(choices)
    raise AssertionError("no subcommands found")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OUTBOX, *args], env=env or clean_env(), capture_output=True, text=True, timeout=60
    )


def test_the_issue_subcommands_exist() -> None:
    assert {"serve", "migrate", "token", "dev"} <= set(subcommands())


@pytest.mark.parametrize("command", [[], *[[name] for name in subcommands()]], ids=str)
def test_help_exits_0(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: outbox" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_PORT", "abc"),
        ("OUTBOX_DB_POOL_TIMEOUT", "xyz"),
        ("OUTBOX_DB_POOL_SIZE", "0"),
        ("OUTBOX_LOG_FORMAT", "yaml"),
        ("OUTBOX_JWT_ALGORITHMS", "HS256,none"),
    ],
)
def test_a_bad_setting_stops_serve_with_one_line(variable: str, value: str) -> None:
    env = clean_env(
        OUTBOX_DATABASE_URL="postgresql://postgres@127.0.0.1:1/x",
        OUTBOX_JWT_SECRET=JWT_SECRET,
        **{variable: value},
    )
    result = run("serve", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_a_cloud_phone_number_id_with_a_newline_stops_dispatch_with_one_line(
    database_url: str,
) -> None:
    # A mounted secret's trailing newline makes an invalid URL: refused at start.
    env = clean_env(
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_PROVIDER="cloud",
        OUTBOX_CLOUD_TOKEN="token",
        OUTBOX_CLOUD_PHONE_NUMBER_ID="123\n",
        OUTBOX_METRICS_PORT="0",
    )
    result = run("dispatch", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "OUTBOX_CLOUD_PHONE_NUMBER_ID" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"OUTBOX_PROVIDER": "http", "OUTBOX_PROVIDER_URL": "https://gateway.example/send"},
            "OUTBOX_PROVIDER_SECRET is required",
        ),
        (
            {
                "OUTBOX_PROVIDER": "cloud",
                "OUTBOX_CLOUD_TOKEN": "token",
                "OUTBOX_CLOUD_PHONE_NUMBER_ID": "123",
                "OUTBOX_CLOUD_BASE_URL": "http://graph.example.com",
            },
            "OUTBOX_CLOUD_BASE_URL must be https://",
        ),
    ],
    ids=["http-unsigned", "cloud-plain-http"],
)
def test_dispatch_refuses_unsafe_provider_settings_with_one_line(
    database_url: str, settings: dict[str, str], named: str
) -> None:
    env = clean_env(OUTBOX_DATABASE_URL=database_url, OUTBOX_METRICS_PORT="0", **settings)
    result = run("dispatch", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]


def test_a_bad_duration_for_token_is_one_line() -> None:
    result = run("token", "--ttl", "soon", env=clean_env(OUTBOX_JWT_SECRET=JWT_SECRET))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--ttl" in result.stderr


# serve -------------------------------------------------------------------------------


def token_from_cli(*args: str) -> str:
    result = run("token", *args, env=clean_env(OUTBOX_JWT_SECRET=JWT_SECRET))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    return token


def test_serve_logs_one_json_line_per_request_with_phones_masked(
    serve: tuple[Process, str],
) -> None:
    process, url = serve
    headers = {"Authorization": f"Bearer {token_from_cli('--sub', 'user-7')}"}
    with httpx.Client(base_url=url, timeout=10) as http:
        sent = http.post(
            SEND, json={"to": f"+{PHONE}", "type": "text", "text": "hi"}, headers=headers
        )
        assert sent.status_code == 202, sent.text
        task_id = sent.json()["task_id"]
        short = http.post(
            SEND, json={"to": SHORT_PHONE, "type": "text", "text": "x"}, headers=headers
        )
        assert short.status_code == 202, short.text
        bad = http.post(SEND, json={"to": PHONE, "type": "text"}, headers=headers)
        assert bad.status_code == 422
        assert http.get(f"/api/v1/whatsapp/messages/{task_id}", headers=headers).status_code == 200
        assert http.get("/api/v1/whatsapp/messages", headers={}).status_code == 401

    def request_lines() -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in list(process.stderr) if line.startswith("{")]
        return [
            line for line in parsed if line.get("event") == "request" and line["path"] != "/healthz"
        ]

    wait_for(lambda: len(request_lines()) >= 5, what="the request log lines")
    assert process.interrupt() == 0
    stderr = "\n".join(process.stderr)
    for line in process.stderr:  # every line is JSON
        json.loads(line)
    lines = request_lines()
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", SEND, 202),
        ("POST", SEND, 202),
        ("POST", SEND, 422),
        ("GET", f"/api/v1/whatsapp/messages/{task_id}", 200),
        ("GET", "/api/v1/whatsapp/messages", 401),
    ]
    for line in lines:
        assert {"method", "path", "status", "duration_ms", "message_id", "user_id"} <= line.keys()
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert lines[0]["message_id"] == task_id
    assert lines[0]["user_id"] == "user-7"
    assert lines[0]["to"] == MASKED
    assert lines[1]["to"] == "12****78"
    assert lines[3]["message_id"] == task_id
    assert lines[4]["user_id"] is None
    assert PHONE not in stderr
    assert SHORT_PHONE not in stderr


def test_a_cli_token_is_accepted_and_admin_sees_everyone(serve: tuple[Process, str]) -> None:
    _, url = serve
    user = {"Authorization": f"Bearer {token_from_cli('--sub', 'x', '--ttl', '10m')}"}
    admin = {"Authorization": f"Bearer {token_from_cli('--sub', 'boss', '--admin')}"}
    with httpx.Client(base_url=url, timeout=10) as http:
        sent = http.post(SEND, json={"to": PHONE, "type": "text", "text": "hi"}, headers=user)
        assert sent.status_code == 202, sent.text
        task_id = sent.json()["task_id"]
        other = {"Authorization": f"Bearer {token_from_cli('--sub', 'y')}"}
        assert http.get(f"/api/v1/whatsapp/messages/{task_id}", headers=other).status_code == 404
        seen = http.get(f"/api/v1/whatsapp/messages/{task_id}", headers=admin)
        assert seen.status_code == 200, seen.text


# dev ---------------------------------------------------------------------------------


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "postgres" in (proc.info["name"] or "") and str(data_dir) in cmdline:
            found.append(proc)
    return found


def banner(process: Process) -> tuple[str, str]:
    """The dev token and the curl command printed by `outbox dev`."""
    process.wait_for_output("curl ", timeout=120)
    lines = process.stdout
    token_line = lines.index(next(line for line in lines if "dev token" in line))
    token = lines[token_line + 1].strip()
    curl = next(line for line in lines if line.strip().startswith("curl ")).strip()
    assert token in curl
    return token, curl


def test_dev_runs_on_an_embedded_postgres_and_keeps_messages(
    start: type[Process], tmp_path: Path
) -> None:
    data_dir = tmp_path / "dev-data"
    port = free_port()
    env = clean_env(OUTBOX_DEV_DATA_DIR=str(data_dir), OUTBOX_PORT=str(port))
    url = f"http://127.0.0.1:{port}"

    first = start(["dev"], env)
    try:
        token, curl = banner(first)
        assert f"127.0.0.1:{port}" in curl
        result = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        accepted = json.loads(result.stdout)
        assert accepted["status"] == "queued", accepted
        task_id = accepted["task_id"]
        assert postgres_processes(data_dir), "the embedded server should be running"
    finally:
        code = first.interrupt()
    assert code == 0, "\n".join(first.stdout + first.stderr)
    wait_for(lambda: not postgres_processes(data_dir), timeout=30, what="postgres to stop")

    second = start(["dev"], env)
    try:
        token, _ = banner(second)
        headers = {"Authorization": f"Bearer {token}"}
        seen = httpx.get(f"{url}/api/v1/whatsapp/messages/{task_id}", headers=headers, timeout=10)
        assert seen.status_code == 200, seen.text
        assert seen.json()["task_id"] == task_id
        assert seen.json()["to"] == "5511999999999"
    finally:
        code = second.interrupt()
    assert code == 0, "\n".join(second.stdout + second.stderr)
    wait_for(lambda: not postgres_processes(data_dir), timeout=30, what="postgres to stop")


_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PUBLIC_PEM = (
    _RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
_PRIVATE_PEM = _RSA_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"OUTBOX_JWT_SECRET": JWT_SECRET}, "OUTBOX_DATABASE_URL"),
        ({"OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}, "OUTBOX_JWT_SECRET"),
        (
            {
                "OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                "OUTBOX_JWT_ALGORITHMS": "RS256",
                "OUTBOX_JWT_PUBLIC_KEY": "not a key",
            },
            "OUTBOX_JWT_PUBLIC_KEY",
        ),
        (
            {
                "OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                "OUTBOX_JWT_SECRET": JWT_SECRET,
                "OUTBOX_JWT_ALGORITHMS": "HS257",
            },
            "OUTBOX_JWT_ALGORITHMS",
        ),
        (
            {
                "OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                "OUTBOX_JWT_SECRET": "a",
            },
            "OUTBOX_JWT_SECRET must be at least 32 bytes",
        ),
        (
            {
                "OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                "OUTBOX_JWT_ALGORITHMS": "RS256",
                "OUTBOX_JWT_PUBLIC_KEY": _PUBLIC_PEM,
            },
            "OUTBOX_JWT_AUDIENCE is required",
        ),
        (
            {
                "OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
                "OUTBOX_JWT_ALGORITHMS": "RS256",
                "OUTBOX_JWT_PUBLIC_KEY": _PRIVATE_PEM,
                "OUTBOX_JWT_AUDIENCE": "outbox-api",
            },
            "OUTBOX_JWT_PUBLIC_KEY holds a private key",
        ),
    ],
    ids=[
        "no-database",
        "no-key",
        "bad-public-key",
        "unknown-algorithm",
        "short-secret",
        "public-key-without-audience",
        "private-key-as-public-key",
    ],
)
def test_serve_refuses_to_start_without_what_it_needs(settings: dict[str, str], named: str) -> None:
    result = run("serve", env=clean_env(**settings))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]


def test_dev_banner_never_prints_the_database_password(
    start: type[Process], tmp_path: Path, database_url: str
) -> None:
    # The local server trusts 127.0.0.1, so any password connects: the banner must hide it.
    password = "hunter2-not-for-the-terminal"
    with_password = make_conninfo(database_url, password=password)
    env = clean_env(
        OUTBOX_DATABASE_URL=with_password,
        OUTBOX_DEV_DATA_DIR=str(tmp_path / "dev-data"),
        OUTBOX_PORT=str(free_port()),
    )
    process = start(["dev"], env)
    banner(process)
    printed = "\n".join(process.stdout + process.stderr)
    assert password not in printed
    assert "password=***" in printed
    assert process.interrupt() == 0


@pytest.mark.parametrize(
    ("conninfo", "shown"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://h/db?password=secret&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("host=h user=u password=secret dbname=d", "user=u password=*** dbname=d host=h"),
        ("host=h dbname=d", "host=h dbname=d"),
        # The embedded server's: an empty password, a socket directory.
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/postgres?host=/tmp/pg",
        ),
    ],
)
def test_a_printed_connection_string_hides_its_password(conninfo: str, shown: str) -> None:
    assert without_password(conninfo) == shown


def test_status_and_purge_find_the_dev_database_and_a_killed_dev_leaves_no_server(
    start: type[Process], tmp_path: Path
) -> None:
    data_dir = tmp_path / "dev-data"
    port = free_port()
    first = start(["dev"], clean_env(OUTBOX_DEV_DATA_DIR=str(data_dir), OUTBOX_PORT=str(port)))
    token, _ = banner(first)
    sent = httpx.post(
        f"http://127.0.0.1:{port}{SEND}",
        json={"to": PHONE, "type": "text", "text": "hi"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert sent.status_code == 202, sent.text
    first.popen.kill()  # kill -9: no clean-up; its pid stays in pgserver's handle file
    first.finish(timeout=10)
    assert postgres_processes(data_dir), "the embedded server outlives a killed dev"

    # No OUTBOX_DATABASE_URL: both find the dev database, as `outbox token` finds its secret.
    env = clean_env(OUTBOX_DEV_DATA_DIR=str(data_dir))
    status = run("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    counts = {name: v["count"] for name, v in json.loads(status.stdout)["statuses"].items()}
    assert sum(counts.values()) == 1, counts  # the message sent through the killed dev
    # The dead dev's handle was forgotten, so status, the last holder, stopped the server.
    wait_for(lambda: not postgres_processes(data_dir), timeout=30, what="postgres to stop")
    purge = run("purge", "--dry-run", env=env)
    assert purge.returncode == 0, purge.stderr
    assert "dry run: would delete" in purge.stdout
    wait_for(lambda: not postgres_processes(data_dir), timeout=30, what="postgres to stop")
