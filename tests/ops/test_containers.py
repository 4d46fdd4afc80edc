"""Static checks of the container files (no engine here, so nothing is built or run):
`docker-compose config` (Debian's compose v1) accepts compose.yaml, compose.yaml is valid
against the Compose Specification, and the Dockerfile has the shape the README promises.

tests/ops/compose_spec.json is a copy of the Compose Specification schema as Debian's
docker-compose 1.29.2 ships it (/usr/lib/python3/dist-packages/compose/config/
compose_spec.json, from github.com/compose-spec/compose-spec, Apache-2.0), so that this
check does not depend on that package being installed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.ops.conftest import need

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
PGBOUNCER_ENV = ROOT / "deploy" / "pgbouncer.env"
DOCKERFILE = ROOT / "Dockerfile"
SPEC = Path(__file__).with_name("compose_spec.json")
# Placeholders for the variables compose.yaml requires (`${…:?…}`); not real secrets.
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": "owner-pw-placeholder",
    "POSTGRES_APP_PASSWORD": "app-pw-placeholder",
    "OUTBOX_JWT_SECRET": "jwt-placeholder",
    "OUTBOX_PROVIDER": "fake",
}


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose … config` as parsed YAML (variables interpolated, anchors merged)."""
    command = [need("docker-compose"), *args, "-f", str(COMPOSE), "config"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "COMPOSE_"))}
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**base, **REQUIRED_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def volume_pair(volume: str | dict[str, str]) -> tuple[str, str]:
    """(target, source) of a volume, in the short (`src:dst:ro`) or the long syntax."""
    if isinstance(volume, str):
        source, target = volume.split(":")[:2]
        return target, source
    return volume["target"], volume["source"]


# compose.yaml ---------------------------------------------------------------------------


def test_compose_config_accepts_the_file_and_wires_the_roles() -> None:
    services = compose_config()["services"]
    assert set(services) >= {"postgres", "migrate", "serve", "dispatch", "pgbouncer"}

    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for role in ("serve", "dispatch"):
        assert services[role]["command"] == [role]
        assert services[role]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        env = environment(services[role])
        # Without the pgbouncer env file: straight to PostgreSQL, prepared statements on.
        assert "@postgres:5432/" in env["OUTBOX_DATABASE_URL"]
        assert "@postgres:5432/" in env["OUTBOX_LISTEN_DATABASE_URL"]
        assert env["OUTBOX_DB_PGBOUNCER"] == "false"
        # The runtime role, with data access only; the owner's password is not theirs.
        for url in (env["OUTBOX_DATABASE_URL"], env["OUTBOX_LISTEN_DATABASE_URL"]):
            assert url.startswith("postgresql://outbox_app:app-pw-placeholder@"), url
        assert REQUIRED_ENV["POSTGRES_PASSWORD"] not in str(env)
    migrate_url = environment(services["migrate"])["OUTBOX_DATABASE_URL"]
    assert migrate_url.startswith("postgresql://outbox:owner-pw-placeholder@"), migrate_url
    postgres = services["postgres"]
    assert environment(postgres)["POSTGRES_APP_PASSWORD"] == "app-pw-placeholder"
    mounts = dict(volume_pair(volume) for volume in postgres["volumes"])
    assert mounts["/docker-entrypoint-initdb.d"] == str(ROOT / "deploy" / "initdb")
    assert mounts["/outbox/runtime-role.sql"] == str(ROOT / "deploy" / "runtime-role.sql")
    assert environment(services["pgbouncer"])["DB_USER"] == "outbox_app"

    serve_env = environment(services["serve"])
    assert serve_env["OUTBOX_HOST"] == "0.0.0.0"
    assert serve_env["OUTBOX_JWT_SECRET"] == REQUIRED_ENV["OUTBOX_JWT_SECRET"]
    assert [p["target"] for p in services["serve"]["ports"]] == [8001]
    assert environment(services["dispatch"])["OUTBOX_METRICS_PORT"] == "9101"


def test_compose_sets_only_settings_that_exist() -> None:
    """A misspelt OUTBOX_* variable would be ignored silently by the processes."""
    from outbox.settings import Settings

    known = {f"OUTBOX_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose_config()["services"].items():
        unknown = {k for k in environment(service) if k.startswith("OUTBOX_")} - known
        assert unknown == set(), f"{name}: {sorted(unknown)}"


def test_dispatch_can_be_scaled() -> None:
    """`--scale dispatch=N` needs no fixed container name and no fixed host port."""
    dispatch = compose_config()["services"]["dispatch"]
    assert "container_name" not in dispatch
    for port in dispatch.get("ports", []):
        assert not (isinstance(port, dict) and port.get("published")), port
        assert not (isinstance(port, str) and ":" in port), port


def test_pgbouncer_profile_routes_queries_through_it_and_listen_direct() -> None:
    args = ["--env-file", str(PGBOUNCER_ENV)]
    config = compose_config(*args)
    services = config["services"]
    pgbouncer = services["pgbouncer"]
    assert pgbouncer["profiles"] == ["pgbouncer"]
    assert environment(pgbouncer)["POOL_MODE"] == "transaction"
    for role in ("serve", "dispatch"):
        env = environment(services[role])
        assert "@pgbouncer:5432/" in env["OUTBOX_DATABASE_URL"]
        assert env["OUTBOX_DB_PGBOUNCER"] == "true"
        assert "@postgres:5432/" in env["OUTBOX_LISTEN_DATABASE_URL"]
    # Migrations run on the direct connection either way.
    assert "@postgres:5432/" in environment(services["migrate"])["OUTBOX_DATABASE_URL"]
    # The env file turns the profile on (compose reads COMPOSE_PROFILES from it).
    assert "COMPOSE_PROFILES=pgbouncer" in PGBOUNCER_ENV.read_text().splitlines()
    compose_config("--profile", "pgbouncer")  # and the profile alone is accepted


def test_compose_refuses_to_run_without_the_secrets() -> None:
    """Secrets are `${VAR:?…}` placeholders: a missing one stops compose, naming it."""
    base = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    result = subprocess.run(
        [need("docker-compose"), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD" in result.stderr or "set OUTBOX_JWT_SECRET" in result.stderr
    text = COMPOSE.read_text()
    for name in REQUIRED_ENV:
        assert "${" + name + ":?" in text, name


def test_compose_needs_the_provider_named() -> None:
    """No silent `fake`: without OUTBOX_PROVIDER compose stops, naming it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "COMPOSE_"))}
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "OUTBOX_PROVIDER"}
    result = subprocess.run(
        [need("docker-compose"), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "set OUTBOX_PROVIDER" in result.stderr


def test_git_ignores_the_env_file() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, timeout=30
    )
    assert ignored.returncode == 0, ".env must be git-ignored: it holds the deployment's secrets"


def _spec_validator() -> jsonschema.protocols.Validator:
    spec = json.loads(SPEC.read_text())
    jsonschema.Draft201909Validator.check_schema(spec)
    return jsonschema.Draft201909Validator(spec)


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in _spec_validator().iter_errors(document)
    ]
    assert errors == []


def test_third_party_images_are_pinned_to_a_version() -> None:
    # Images we do not build name a version: `latest` would change the database or the
    # pooler under a deployment at its next pull. (Read from the file itself, defaults
    # of `${VAR:-image}` included, so no docker-compose is needed.)
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    images = {
        name: service["image"].removeprefix("${").rstrip("}").split(":-")[-1]
        for name, service in services.items()
        if "image" in service and "outbox" not in service["image"]
    }
    assert set(images) == {"postgres", "pgbouncer"}, images
    for name, image in images.items():
        tag = image.partition(":")[2]
        assert tag and tag != "latest", f"{name}: {image}"


def test_the_schema_check_catches_a_misspelt_key() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    document["services"]["dispatch"]["replcias"] = 3
    document["services"]["serve"]["depends_on"]["migrate"]["condition"] = "service_done"
    messages = [e.message for e in _spec_validator().iter_errors(document)]
    assert any("replcias" in m for m in messages), messages
    assert any("service_done" in m for m in messages), messages


# Dockerfile ------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    pairs = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec form: {args}"
    return [str(v) for v in value]


def _without_options(args: str) -> list[str]:
    return [word for word in shlex.split(args) if not word.startswith("--")]


def test_dockerfile_is_multi_stage_on_a_slim_base() -> None:
    pairs = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for kw, a in pairs if kw == "ARG" and "=" in a)
    stages = [_without_options(a) for kw, a in pairs if kw == "FROM"]
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0]
        if image.startswith("${"):
            image = args[image.strip("${}")]
        assert image.startswith("python:") and "-slim" in image, image
    # The last stage is the image that runs.
    assert stages[-1][-1] == "runtime"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    pairs = instructions(DOCKERFILE.read_text())
    users = [a for kw, a in pairs if kw == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_from = max(i for i, (kw, _) in enumerate(pairs) if kw == "FROM")
    assert any(kw == "USER" for kw, _ in pairs[last_from:]), "USER not in the final stage"


def test_dockerfile_entrypoint_is_the_cli_and_healthcheck_asks_healthz() -> None:
    pairs = instructions(DOCKERFILE.read_text())
    entrypoint = [a for kw, a in pairs if kw == "ENTRYPOINT"]
    assert [_exec_form(a) for a in entrypoint][-1] == ["outbox"]
    assert [_exec_form(a) for kw, a in pairs if kw == "CMD"][-1] == ["serve"]
    health = [a for kw, a in pairs if kw == "HEALTHCHECK"][-1]
    command = health.split("CMD", 1)[1].strip()
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2] and "urllib" in argv[2]
    # Valid Python (test_healthcheck_command_passes_against_a_live_api runs it).
    compile(argv[2], "<healthcheck>", "exec")


def test_every_copy_source_exists_and_is_not_dockerignored() -> None:
    pairs = instructions(DOCKERFILE.read_text())
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = []
    for keyword, args in pairs:
        if keyword not in ("COPY", "ADD") or "--from=" in args:
            continue  # --from copies out of another stage, not the repository
        words = _without_options(args)
        sources.extend(words[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    # The application reads its SQL beside the package: both are copied.
    assert {"outbox", "sql", "pyproject.toml"} <= set(sources)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".outbox-data", "**/__pycache__", ".pytest_cache"} <= ignored


def test_healthcheck_command_passes_against_a_live_api(api: Any) -> None:
    """The Dockerfile's HEALTHCHECK command, run as is against a real server."""
    import sys

    pairs = instructions(DOCKERFILE.read_text())
    health = [a for kw, a in pairs if kw == "HEALTHCHECK"][-1]
    argv = _exec_form(health.split("CMD", 1)[1].strip())
    env = {**os.environ, "OUTBOX_PORT": str(api.port)}
    ok = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    env["OUTBOX_PORT"] = "1"  # nothing listens there: the check fails
    down = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert down.returncode != 0
