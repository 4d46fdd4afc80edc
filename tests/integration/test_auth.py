"""JWT: every rejection the issue lists, each a 401 with WWW-Authenticate; what is accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import JWT_SECRET
from tests.integration.conftest import ClientFactory
from tests.support import wait_for

SEND = "/api/v1/whatsapp/send/"
MESSAGES = "/api/v1/whatsapp/messages"
TEXT = {"to": "5511999999999", "type": "text", "text": "hi"}
Auth = Callable[..., dict[str, str]]
AUDIENCE = "outbox-api"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + 600}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def hs256(payload: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, as an attacker would (pyjwt refuses to sign these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


def assert_401(response: httpx.Response, reason: str = "") -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert reason.lower() in error["message"].lower(), error
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer"), challenge


def assert_no_rows(sql_conn: psycopg.Connection) -> None:
    assert sql_conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


# Rejections with the default HS256 configuration -------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": ""}, "missing"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
        ({"Authorization": "Token abc"}, "Bearer"),
    ],
    ids=["no-header", "empty", "basic", "bearer-no-token", "other-scheme"],
)
def test_missing_or_misshapen_header_is_401(
    client: httpx.Client,
    sql_conn: psycopg.Connection,
    headers: dict[str, str],
    reason: str,
) -> None:
    assert_401(client.post(SEND, json=TEXT, headers=headers), reason)
    assert_401(client.get(MESSAGES, headers=headers), reason)
    assert_no_rows(sql_conn)


@pytest.mark.parametrize(
    "token",
    ["abc", "a.b", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 5000, "e30.e30.e30",
     b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(b"[1]") + ".sig"],
)  # fmt: skip
def test_malformed_token_is_401(
    client: httpx.Client, sql_conn: psycopg.Connection, token: str
) -> None:
    assert_401(client.post(SEND, json=TEXT, headers=bearer(token)), "token")
    assert_no_rows(sql_conn)


@pytest.mark.parametrize(
    "token",
    [b64(b"\xff\xfe\xfd") + ".e30.sig", "abc", "a.b.c", b64(b'{"alg":"HS256"}') + ".!!.sig"],
)
def test_a_garbage_token_says_malformed_without_the_parser_s_internals(
    client: httpx.Client, token: str
) -> None:
    response = client.post(SEND, json=TEXT, headers=bearer(token))
    assert_401(response)
    assert response.json()["error"]["message"] == "malformed token"
    assert "codec" not in response.headers["www-authenticate"]


def test_admin_claim_value_is_configurable(client_with: ClientFactory) -> None:
    with client_with(jwt_admin_value="outbox:admin") as http:
        summary = "/api/v1/admin/summary"
        admin = bearer(hs256(claims(sub="x", role="outbox:admin")))
        assert http.get(summary, headers=admin).status_code == 200
        plain = bearer(hs256(claims(sub="x", role="admin")))
        assert http.get(summary, headers=plain).status_code == 403


def test_max_age_refuses_old_tokens_and_tokens_without_iat(client_with: ClientFactory) -> None:
    now = int(time.time())
    with client_with(jwt_max_age=60) as http:
        fresh = hs256(claims(iat=now - 5))
        assert http.post(SEND, json=TEXT, headers=bearer(fresh)).status_code == 202
        old = hs256(claims(iat=now - 120, exp=now + 600))
        assert_401(http.post(SEND, json=TEXT, headers=bearer(old)), "too old")
        assert_401(http.post(SEND, json=TEXT, headers=bearer(hs256(claims(iat=None)))), "iat")
        # The same token ages out between two requests (verified tokens are cached).
        ageing = hs256(claims(iat=int(time.time()) - 56))  # 4 s of margin for a busy machine
        assert http.post(SEND, json=TEXT, headers=bearer(ageing)).status_code == 202
        wait_for(
            lambda: http.post(SEND, json=TEXT, headers=bearer(ageing)).status_code == 401,
            timeout=20,
            interval=0.2,
            what="the cached token to age out",
        )


def test_bad_signature_is_401(client: httpx.Client, sql_conn: psycopg.Connection) -> None:
    forged = hs256(claims(), secret="another-secret-that-is-long-enough-for-hs256")
    assert_401(client.post(SEND, json=TEXT, headers=bearer(forged)), "signature")
    # A valid token with its payload swapped keeps a signature that no longer matches.
    good_header, _, good_signature = hs256(claims()).split(".")
    tampered = (
        f"{good_header}.{b64(json.dumps(claims(sub='admin-user')).encode())}.{good_signature}"
    )
    assert_401(client.post(SEND, json=TEXT, headers=bearer(tampered)), "signature")
    assert_no_rows(sql_conn)


def test_alg_none_is_401(client: httpx.Client, sql_conn: psycopg.Connection) -> None:
    for alg in ("none", "None", "NONE"):
        unsigned = handmade({"alg": alg, "typ": "JWT"}, claims(), key=None)
        assert_401(client.post(SEND, json=TEXT, headers=bearer(unsigned)))
    assert_401(client.post(SEND, json=TEXT, headers=bearer(jwt.encode(claims(), None, "none"))))
    assert_no_rows(sql_conn)


def test_expired_token_is_401(client: httpx.Client, sql_conn: psycopg.Connection) -> None:
    now = int(time.time())
    expired = hs256(claims(iat=now - 120, exp=now - 60))
    assert_401(client.post(SEND, json=TEXT, headers=bearer(expired)), "expired")
    assert_no_rows(sql_conn)


def test_a_cached_token_is_refused_once_it_expires(client: httpx.Client) -> None:
    short = hs256(claims(exp=time.time() + 1.5))
    assert client.get(MESSAGES, headers=bearer(short)).status_code == 200
    # The verified token is cached; its expiry must still be enforced.
    wait_for(
        lambda: client.get(MESSAGES, headers=bearer(short)).status_code == 401,
        timeout=10,
        what="a cached token to expire",
    )
    assert_401(client.get(MESSAGES, headers=bearer(short)), "expired")


def test_exp_is_required_by_default(client: httpx.Client) -> None:
    assert_401(client.post(SEND, json=TEXT, headers=bearer(hs256(claims(exp=None)))), "exp")


def test_exp_may_be_optional(client_with: ClientFactory) -> None:
    with client_with(jwt_require_exp=False) as http:
        response = http.post(SEND, json=TEXT, headers=bearer(hs256(claims(exp=None))))
        assert response.status_code == 202, response.text
        # Still enforced when present.
        expired = hs256(claims(exp=int(time.time()) - 60))
        assert_401(http.post(SEND, json=TEXT, headers=bearer(expired)), "expired")


@pytest.mark.parametrize(
    "sub",
    [None, "", True, ["user-1"], {"id": "user-1"}, 1.5, "a\u0000b"],
    ids=["missing", "empty", "bool", "list", "object", "float", "nul"],
)
def test_missing_or_unusable_sub_is_401(
    client: httpx.Client, sql_conn: psycopg.Connection, sub: Any
) -> None:
    payload = claims()
    if sub is None:
        del payload["sub"]
    else:
        payload["sub"] = sub
    assert_401(client.post(SEND, json=TEXT, headers=bearer(hs256(payload))), "sub")
    assert_no_rows(sql_conn)


def test_numeric_sub_is_accepted_as_its_string(
    client: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    numeric = bearer(hs256(claims(sub=42)))
    response = client.post(SEND, json=TEXT, headers=numeric)
    assert response.status_code == 202, response.text
    row = sql_conn.execute(
        "SELECT user_id FROM outbox.messages WHERE id = %s", [response.json()["task_id"]]
    ).fetchone()
    assert row == ("42",)
    # The same owner as the string "42".
    task_id = response.json()["task_id"]
    as_string = bearer(hs256(claims(sub="42")))
    assert client.get(f"{MESSAGES}/{task_id}", headers=as_string).status_code == 200


def test_admin_claim(client: httpx.Client, auth: Auth) -> None:
    response = client.post(SEND, json=TEXT, headers=auth("alice"))
    task_id = response.json()["task_id"]
    url = f"{MESSAGES}/{task_id}"
    assert client.get(url, headers=bearer(hs256(claims(sub="x", role="admin")))).status_code == 200
    for not_admin in ("user", "Admin", ["admin"], True):
        headers = bearer(hs256(claims(sub="x", role=not_admin)))
        assert client.get(url, headers=headers).status_code == 404, not_admin
    other_claim = bearer(hs256(claims(sub="x", is_admin="admin")))
    assert client.get(url, headers=other_claim).status_code == 404


def test_admin_claim_name_is_configurable(client_with: ClientFactory, auth: Auth) -> None:
    with client_with(jwt_admin_claim="scope") as http:
        task_id = http.post(SEND, json=TEXT, headers=auth("alice")).json()["task_id"]
        url = f"{MESSAGES}/{task_id}"
        assert (
            http.get(url, headers=bearer(hs256(claims(sub="x", scope="admin")))).status_code == 200
        )
        assert (
            http.get(url, headers=bearer(hs256(claims(sub="x", role="admin")))).status_code == 404
        )


# Audience and issuer -----------------------------------------------------------------


@pytest.fixture
def scoped(client_with: ClientFactory) -> Iterator[httpx.Client]:
    with client_with(jwt_audience="outbox", jwt_issuer="https://auth.example") as http:
        yield http


def test_right_audience_and_issuer_are_accepted(scoped: httpx.Client) -> None:
    token = hs256(claims(aud="outbox", iss="https://auth.example"))
    assert scoped.post(SEND, json=TEXT, headers=bearer(token)).status_code == 202
    listed = hs256(claims(aud=["other", "outbox"], iss="https://auth.example"))
    assert scoped.post(SEND, json=TEXT, headers=bearer(listed)).status_code == 202


@pytest.mark.parametrize(
    ("aud", "iss", "reason"),
    [
        ("other", "https://auth.example", "audience"),
        (None, "https://auth.example", "aud"),
        ("outbox", "https://evil.example", "issuer"),
        ("outbox", None, "iss"),
    ],
    ids=["wrong-aud", "missing-aud", "wrong-iss", "missing-iss"],
)
def test_wrong_audience_or_issuer_is_401(
    scoped: httpx.Client,
    sql_conn: psycopg.Connection,
    aud: str | None,
    iss: str | None,
    reason: str,
) -> None:
    token = hs256(claims(aud=aud, iss=iss))
    assert_401(scoped.post(SEND, json=TEXT, headers=bearer(token)), reason)
    assert_no_rows(sql_conn)


def test_audience_is_ignored_when_not_configured(client: httpx.Client) -> None:
    token = hs256(claims(aud="anything", iss="anyone"))
    assert client.post(SEND, json=TEXT, headers=bearer(token)).status_code == 202


# Public keys -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def rs256(client_with: ClientFactory, rsa_key: rsa.RSAPrivateKey) -> Iterator[httpx.Client]:
    with client_with(
        jwt_public_key=public_pem(rsa_key),
        jwt_algorithms=["RS256"],
        jwt_secret="",
        jwt_audience=AUDIENCE,
    ) as http:
        yield http


def test_rs256_token_is_accepted(rs256: httpx.Client, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(aud=AUDIENCE), rsa_key, algorithm="RS256")
    assert rs256.post(SEND, json=TEXT, headers=bearer(token)).status_code == 202


def test_hs256_signed_with_the_public_key_is_401(
    rs256: httpx.Client, rsa_key: rsa.RSAPrivateKey, sql_conn: psycopg.Connection
) -> None:
    # The classic key-confusion attack: HMAC keyed with the server's public key.
    pem = public_pem(rsa_key).encode()
    for key in (pem, pem.strip()):
        confused = handmade({"alg": "HS256", "typ": "JWT"}, claims(aud=AUDIENCE), key=key)
        assert_401(rs256.post(SEND, json=TEXT, headers=bearer(confused)), "algorithm")
    assert_no_rows(sql_conn)


def test_rs256_rejects_another_key_and_the_hs256_secret(
    rs256: httpx.Client, sql_conn: psycopg.Connection
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_401(
        rs256.post(
            SEND, json=TEXT, headers=bearer(jwt.encode(claims(aud=AUDIENCE), stranger, "RS256"))
        ),
        "signature",
    )
    assert_401(
        rs256.post(SEND, json=TEXT, headers=bearer(hs256(claims(aud=AUDIENCE)))), "algorithm"
    )
    assert_no_rows(sql_conn)


def test_es256_with_a_public_key(client_with: ClientFactory) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with client_with(
        jwt_public_key=public_pem(key), jwt_algorithms=["ES256"], jwt_audience=AUDIENCE
    ) as http:
        good = jwt.encode(claims(aud=AUDIENCE), key, algorithm="ES256")
        assert http.post(SEND, json=TEXT, headers=bearer(good)).status_code == 202
        assert_401(
            http.post(SEND, json=TEXT, headers=bearer(hs256(claims(aud=AUDIENCE)))), "algorithm"
        )


def test_a_hostile_token_header_does_not_break_the_challenge(client: httpx.Client) -> None:
    # pyjwt quotes the unknown `crit` extension in its message: a quote and a non-latin-1
    # character must neither end the quoted string nor break the header encoding.
    token = handmade(
        {"alg": "HS256", "crit": ['€" , Basic realm="x']}, claims(), JWT_SECRET.encode()
    )
    response = client.post(SEND, json=TEXT, headers=bearer(token))
    assert_401(response)
    challenge = response.headers["www-authenticate"]
    assert challenge.count('"') == 4, challenge
    assert challenge.isascii()


def test_a_public_key_with_escaped_newlines_is_accepted(
    client_with: ClientFactory, rsa_key: rsa.RSAPrivateKey
) -> None:
    # As it arrives from many secret stores: one line, with literal backslash-n.
    one_line = public_pem(rsa_key).replace("\n", "\\n")
    assert "\n" not in one_line
    with client_with(
        jwt_public_key=one_line, jwt_algorithms=["RS256"], jwt_secret="", jwt_audience=AUDIENCE
    ) as http:
        token = jwt.encode(claims(aud=AUDIENCE), rsa_key, algorithm="RS256")
        assert http.post(SEND, json=TEXT, headers=bearer(token)).status_code == 202
