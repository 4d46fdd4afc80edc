"""One error shape everywhere, every status the API promises, and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from tests.integration.conftest import ClientFactory

SEND = "/api/v1/whatsapp/send/"
BATCH = "/api/v1/whatsapp/send/batch"
Auth = Callable[..., dict[str, str]]
TEXT = {"to": "5511999999999", "type": "text", "text": "hi"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body.keys() == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if code == "validation_error":
        assert error["fields"], error
        for field in error["fields"]:
            assert isinstance(field["path"], str)
            assert isinstance(field["message"], str) and field["message"]
    else:
        assert "fields" not in error
    return error


@pytest.mark.parametrize("path", [SEND, BATCH])
@pytest.mark.parametrize("content", [b"{", b'{"to": "1",}', b"not json", b"\xff\xfe{}", b""])
def test_malformed_json_is_400(client: httpx.Client, auth: Auth, path: str, content: bytes) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    response = client.post(path, content=content, headers=headers)
    assert_error(response, 400, "malformed_json")


def test_unknown_route_is_404(client: httpx.Client, auth: Auth) -> None:
    assert_error(client.get("/api/v1/nothing", headers=auth()), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", SEND), ("PUT", SEND), ("GET", BATCH), ("POST", "/api/v1/whatsapp/messages/x"),
     ("POST", "/healthz")],
)  # fmt: skip
def test_wrong_method_is_405(client: httpx.Client, auth: Auth, method: str, path: str) -> None:
    response = client.request(method, path, headers=auth())
    assert_error(response, 405, "method_not_allowed")
    assert response.headers.get("allow")


def test_405_allow_names_every_method_of_the_path(client: httpx.Client, auth: Auth) -> None:
    response = client.put("/api/v1/whatsapp/messages/x", headers=auth())
    assert_error(response, 405, "method_not_allowed")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", [SEND, BATCH])
def test_non_json_is_415(client: httpx.Client, auth: Auth, path: str, content_type: str) -> None:
    headers = {**auth(), "Content-Type": content_type}
    response = client.post(path, content=json.dumps(TEXT).encode(), headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_charset_is_accepted(client: httpx.Client, auth: Auth) -> None:
    headers = {**auth(), "Content-Type": "application/json; charset=utf-8"}
    response = client.post(SEND, content=json.dumps(TEXT).encode(), headers=headers)
    assert response.status_code == 202, response.text


def test_validation_error_names_fields(client: httpx.Client, auth: Auth) -> None:
    response = client.post(SEND, json={"to": "x", "type": "text"}, headers=auth())
    error = assert_error(response, 422, "validation_error")
    assert {f["path"] for f in error["fields"]} == {"to", "text"}


@pytest.mark.parametrize(
    "body",
    [None, 1, "x", [], [TEXT], {"to": None, "type": None}, {"to": 5511999999999, "type": "text",
     "text": "x"}, {"type": "text", "to": "5511999999999", "text": "x", "send_at": "tomorrow"},
     {"type": ["text"]}, {"type": "text", "to": "5511999999999", "text": "\u0000" * 10},
     {"type": "template", "to": "5511999999999", "template": {"name": "n",
      "language": {"code": "pt_BR"}, "components": "x"}}],
)  # fmt: skip
def test_bad_input_is_never_a_500(client: httpx.Client, auth: Auth, body: Any) -> None:
    response = client.post(SEND, json=body, headers=auth())
    assert response.status_code < 500, response.text
    assert response.json()["error"]["code"] in {"validation_error", "malformed_json"}


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_in_components_are_422(
    client: httpx.Client, auth: Auth, number: bytes
) -> None:
    content = (
        b'{"to": "5511999999999", "type": "template", "template": {"name": "n", '
        b'"language": {"code": "pt_BR"}, "components": [{"type": "body", "x": ' + number + b"}]}}"
    )
    headers = {**auth(), "Content-Type": "application/json"}
    for path in (SEND, BATCH):
        body = content if path == SEND else b'{"messages": [' + content + b"]}"
        response = client.post(path, content=body, headers=headers)
        error = assert_error(response, 422, "validation_error")
        assert "template.components" in error["fields"][0]["path"]


@pytest.mark.parametrize(
    "extra",
    [{"text": "a\u0000b"}, {"text": "x", "client_message_id": "a\u0000"}],
)
def test_nul_characters_are_422(client: httpx.Client, auth: Auth, extra: dict[str, str]) -> None:
    response = client.post(SEND, json={**TEXT, **extra}, headers=auth())
    assert_error(response, 422, "validation_error")
    nul_query = client.get(
        "/api/v1/whatsapp/messages", params={"client_message_id": "a\u0000"}, headers=auth()
    )
    assert_error(nul_query, 422, "validation_error")


def test_deeply_nested_json_is_not_a_500(client: httpx.Client, auth: Auth) -> None:
    content = (
        b'{"to": "5511999999999", "type": "template", "template": {"name": "n", '
        b'"language": {"code": "pt_BR"}, "components": [' + b"[" * 5000 + b"]" * 5000 + b"]}}"
    )
    headers = {**auth(), "Content-Type": "application/json"}
    response = client.post(SEND, content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text


# 413 ---------------------------------------------------------------------------------


@pytest.fixture
def small(client_with: ClientFactory) -> Iterator[httpx.Client]:
    with client_with(max_body_bytes=2048) as http:
        yield http


def _text_of_size(size: int) -> bytes:
    skeleton = json.dumps({**TEXT, "text": ""}).encode()
    return json.dumps({**TEXT, "text": "x" * (size - len(skeleton))}).encode()


def test_body_over_the_limit_is_413(small: httpx.Client, auth: Auth) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    at_limit = _text_of_size(2048)
    assert len(at_limit) == 2048
    assert small.post(SEND, content=at_limit, headers=headers).status_code == 202
    over = _text_of_size(2049)
    assert_error(small.post(SEND, content=over, headers=headers), 413, "payload_too_large")


def test_body_over_the_limit_without_content_length_is_413(small: httpx.Client, auth: Auth) -> None:
    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        body = _text_of_size(4000)
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    headers = {**auth(), "Content-Type": "application/json"}
    response = small.post(SEND, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_the_batch_allows_sixteen_times_the_limit(small: httpx.Client, auth: Auth) -> None:
    item = {**TEXT, "text": "x" * 1000}
    headers = {**auth(), "Content-Type": "application/json"}

    def batch_of(count: int) -> bytes:
        return json.dumps({"messages": [item] * count}).encode()

    fits = batch_of(30)
    assert 2048 < len(fits) <= 16 * 2048
    assert small.post(BATCH, content=fits, headers=headers).status_code == 202
    too_big = batch_of(40)
    assert len(too_big) > 16 * 2048
    assert_error(small.post(BATCH, content=too_big, headers=headers), 413, "payload_too_large")
    # A single send is still held to the plain limit.
    assert_error(
        small.post(SEND, content=_text_of_size(3000), headers=headers), 413, "payload_too_large"
    )


# 503 ---------------------------------------------------------------------------------


@pytest.fixture
def no_database(client_with: ClientFactory) -> Iterator[httpx.Client]:
    with client_with(database_url="postgresql://postgres@127.0.0.1:1/x", db_pool_timeout=1) as h:
        yield h


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", SEND, TEXT), ("POST", BATCH, {"messages": [TEXT]}),
     ("GET", "/api/v1/whatsapp/messages", None),
     ("GET", "/api/v1/whatsapp/messages/0190a000-0000-7000-8000-000000000000", None),
     ("DELETE", "/api/v1/whatsapp/messages/0190a000-0000-7000-8000-000000000000", None),
     ("GET", "/readyz", None)],
)  # fmt: skip
def test_database_unreachable_is_503_with_retry_after(
    no_database: httpx.Client, auth: Auth, method: str, path: str, body: Any
) -> None:
    response = no_database.request(method, path, json=body, headers=auth())
    assert_error(response, 503, "unavailable")
    assert int(response.headers["retry-after"]) > 0


def test_healthz_answers_without_a_database(no_database: httpx.Client) -> None:
    response = no_database.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# 401 shape (the reasons are in test_auth.py) ---------------------------------------


def test_401_has_the_shape_and_www_authenticate(client: httpx.Client) -> None:
    response = client.post(SEND, json=TEXT)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_401_comes_before_reading_the_body(client: httpx.Client) -> None:
    response = client.post(SEND, content=b"{", headers={"Content-Type": "text/plain"})
    assert_error(response, 401, "unauthorized")


# OpenAPI -----------------------------------------------------------------------------


def test_openapi_is_valid_and_covers_every_route(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    expected = {
        ("/api/v1/whatsapp/send/", "post"),
        ("/api/v1/whatsapp/send", "post"),
        ("/api/v1/whatsapp/send/batch", "post"),
        ("/api/v1/whatsapp/messages", "get"),
        ("/api/v1/whatsapp/messages/{task_id}", "get"),
        ("/api/v1/whatsapp/messages/{task_id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
    }
    documented = {(path, method) for path, ops in paths.items() for method in ops}
    assert expected <= documented
    schemas = document["components"]["schemas"]
    for name in ("SendRequest", "SendResponse", "BatchRequest", "MessageView", "ErrorResponse"):
        assert name in schemas
    # The send body is the pydantic union, with every type.
    send_schema = json.dumps(schemas["SendRequest"])
    for kind in ("TextMessage", "TemplateMessage", "ImageMessage", "DocumentMessage",
                 "AudioMessage", "VideoMessage"):  # fmt: skip
        assert kind in send_schema


def test_every_route_of_the_app_is_in_openapi(client: httpx.Client) -> None:
    from outbox.api import ROUTES

    paths = client.get("/openapi.json").json()["paths"]
    for route in ROUTES:
        documented = route.path in paths or route.path.rstrip("/") in paths
        assert documented, route.path
        target = paths.get(route.path) or paths[route.path.rstrip("/")]
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in target, (route.path, method)
