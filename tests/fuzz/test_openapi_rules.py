"""/openapi.json publishes the rules the server enforces: a body the document calls valid
is accepted (202), one it calls invalid is refused (422), and each body route states
its byte limit and its 413."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from outbox.api import BATCH_BODY_FACTOR, create_app
from outbox.settings import Settings
from tests.support import ServerThread

SEND = "/api/v1/whatsapp/send"


def _validator(document: dict[str, Any], schema: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    )


def _text(**fields: Any) -> dict[str, Any]:
    return {"type": "text", "to": "5511999999999", "text": "hi", **fields}


def _image(link: str) -> dict[str, Any]:
    return {"type": "image", "to": "5511999999999", "image": {"link": link}}


def _template(*components: dict[str, Any]) -> dict[str, Any]:
    template = {"name": "hello", "language": {"code": "en"}, "components": list(components)}
    return {"type": "template", "to": "5511999999999", "template": template}


# Each body lies on one side of a rule; newlines at the end are left out: Python's re
# (jsonschema's) matches `$` before one, ECMA-262 and pydantic's Rust regex do not.
BODIES = [
    _text(to="12345678"),
    _text(to="+123456789012345"),
    _text(to="1234567"),  # too short
    _text(to="1234567890123456"),  # too long
    _text(to="+"),
    _text(to="++12345678"),
    _text(to="12345678a"),
    _text(to="１２３４５６７８"),  # fullwidth digits: not ASCII
    _text(text="nul \x00 inside"),
    _text(text="no nul"),
    _text(client_message_id="a\x00b"),
    _image("https://example.com/a.png"),
    _image("ftp://example.com/a.png"),
    _image("https://example.com/a b.png"),
    _image("https://example.com/a\u0085b.png"),  # NEL: Unicode White_Space
    _image("https://example.com/a\u3000b.png"),  # ideographic space
    _image("https://example.com/a\ufeffb.png"),  # BOM: not White_Space, allowed
    _image("https://example.com/a\x1cb.png"),  # Python's \s has it, Unicode's does not
    _image("https://example.com/a\x00b.png"),
    _image("https://"),
    _text(send_at="2020-01-01T00:00:00+15:59"),
    _text(send_at="2020-01-01T00:00:00+16:00"),
    _text(send_at="2020-01-01T00:00:00-16:00"),
    _text(send_at="2020-01-01T00:00:00Z"),
    _template({"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}),
    _template({"n": -(2**63), "m": 2**64 - 1, "x": 1.5}),
    _template({"n": 2**64}),
    _template({"n": -(2**63) - 1}),
    _template({"s": ["a\x00"]}),
    _template({"a\x00": 1}),
    _text(priority="high", ordered=False),
    _text(priority="low", ordered=True),
    _text(priority="urgent"),
    _text(priority="HIGH"),
    _text(priority=0),
    _text(priority=None),
    _text(ordered="false"),
    _text(ordered=0),
    _text(ordered=None),
]


def test_the_document_and_the_server_agree_on_each_rule(
    client: httpx.Client, auth: Callable[..., dict[str, str]]
) -> None:
    document = client.get("/openapi.json").json()
    single = _validator(document, "SendRequest")
    disagreements = []
    for body in BODIES:
        valid = single.is_valid(body)
        status = client.post(SEND, json=body, headers=auth()).status_code
        if status != (202 if valid else 422):
            disagreements.append(
                (body, "document: valid" if valid else "document: invalid", status)
            )
    assert not disagreements, disagreements


@pytest.mark.parametrize("limit", [1024 * 1024, 4096])
def test_each_body_route_states_its_byte_limit_and_413(settings: Settings, limit: int) -> None:
    with (
        ServerThread(create_app(settings.model_copy(update={"max_body_bytes": limit}))) as api,
        httpx.Client(base_url=api.url, timeout=10) as client,
    ):
        paths = client.get("/openapi.json").json()["paths"]
    expected = {
        "/api/v1/whatsapp/send": limit,
        "/api/v1/whatsapp/send/": limit,
        "/api/v1/whatsapp/send/batch": limit * BATCH_BODY_FACTOR,
        "/api/v1/whatsapp/senders/{sender_id}": limit,  # PUT
        "/api/v1/whatsapp/senders/{sender_id}/pause": limit,
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            body = operation.get("requestBody")
            if path not in expected or method in ("get", "delete"):
                assert body is None, (method, path)
                continue
            assert body["x-max-body-bytes"] == expected[path], path
            assert str(expected[path]) in body["description"]
            assert str(expected[path]) in operation["responses"]["413"]["description"]
