"""OpenAPI 3.1 document, generated from the pydantic models of models.py."""

from __future__ import annotations

import functools
from typing import Any, get_args

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from outbox import models, senders
from outbox.body import PARSE_INLINE_BYTES
from outbox.states import MessageStatus

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int, body_bytes: int | None = None) -> dict[str, Any]:
    text = {
        400: "Malformed JSON",
        401: "Missing, invalid or expired token",
        403: "Admin only",
        404: "Not found",
        409: "Conflict",
        413: f"Body larger than {body_bytes} bytes, or holding too many JSON values",
        415: "Not JSON",
        422: "Validation error",
        503: "Database unavailable",
    }
    return {str(status): _json(_ref("ErrorResponse"), text[status]) for status in statuses}


def _json_body(schema: str, limit: int, setting: str, max_values: int) -> dict[str, Any]:
    """A JSON request body and its bounds (413 beyond them), in words and as numbers."""
    return {
        "required": True,
        "description": f"JSON, at most {limit} bytes ({setting}); a larger body is refused"
        f" with 413 before it is parsed, and so is one over {PARSE_INLINE_BYTES} bytes that"
        f" holds more than {max_values} JSON values",
        "content": {"application/json": {"schema": _ref(schema)}},
        "x-max-body-bytes": limit,
        "x-max-json-values": max_values,
    }


def _storable_json() -> dict[str, Any]:
    """Any JSON value that jsonb stores: what models._storable_json lets through, where
    JSON Schema can say it (it cannot tell `1e30` from an integer literal: the server
    bounds only the latter, so the document is the stricter)."""
    value = _ref("StorableJson")
    key = {"pattern": models.NO_NUL_PATTERN}
    return {
        "anyOf": [
            {"type": "string", "pattern": models.NO_NUL_PATTERN},
            {"type": "number", "minimum": -(2**63), "maximum": 2**64 - 1},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "array", "items": value},
            {"type": "object", "propertyNames": key, "additionalProperties": value},
        ],
    }


def _components() -> dict[str, Any]:
    """Template components: objects of storable JSON, bounded in depth and size."""
    return {
        "anyOf": [
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "propertyNames": {"pattern": models.NO_NUL_PATTERN},
                    "additionalProperties": _ref("StorableJson"),
                },
            },
            {"type": "null"},
        ],
        "default": None,
        "title": "Components",
        "description": "Passed through as the Cloud API defines them: no NUL character,"
        " integers within 64 bits, at most"
        f" {models.MAX_COMPONENTS_DEPTH} levels deep and {models.MAX_COMPONENTS_VALUES}"
        " JSON values in all (422 otherwise)",
    }


def _sender_paths(max_body_bytes: int) -> dict[str, Any]:
    """The admin routes of senders (outbox/senders_api.py)."""
    from outbox.senders_api import SENDER_JSON_VALUES

    sender_id = {
        "name": "sender_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": senders.SENDER_ID_PATTERN},
    }
    view = _json(_ref("SenderView"), "The sender")
    put_body = _json_body(
        "SenderRequest", max_body_bytes, "OUTBOX_MAX_BODY_BYTES", SENDER_JSON_VALUES
    )
    put_body["description"] += (
        "; credentials omitted on a replace keep the stored ones, and are required when"
        " the sender is created or changes provider (422)"
    )
    pause_body = _json_body("PauseRequest", max_body_bytes, "OUTBOX_MAX_BODY_BYTES", 100)
    pause_body["required"] = False
    read_only = "; the sender default is the environment's: 409"
    body_errors = (400, 401, 403, 404, 409, 413, 415, 422, 503)
    return {
        "/api/v1/whatsapp/senders": {
            "get": {
                "summary": "Admin: every sender (default first), with its state and counts",
                "responses": {
                    "200": _json(_ref("SenderList"), "The senders"),
                    **_errors(401, 403, 503),
                },
            }
        },
        "/api/v1/whatsapp/senders/{sender_id}": {
            "get": {
                "summary": "Admin: one sender, with its state and counts",
                "parameters": [sender_id],
                "responses": {"200": view, **_errors(401, 403, 404, 503)},
            },
            "put": {
                "summary": "Admin: create or replace a sender",
                "description": "Credentials are encrypted with OUTBOX_SECRET_KEY (503 when it"
                " is not set) and never shown" + read_only,
                "parameters": [sender_id],
                "requestBody": put_body,
                "responses": {
                    "200": _json(_ref("SenderView"), "Replaced"),
                    "201": _json(_ref("SenderView"), "Created"),
                    **_errors(*body_errors, body_bytes=max_body_bytes),
                },
            },
            "delete": {
                "summary": "Admin: delete a sender (409 while it has pending or in-flight"
                " messages)" + read_only,
                "parameters": [sender_id],
                "responses": {
                    "204": {"description": "Deleted"},
                    **_errors(401, 403, 404, 409, 503),
                },
            },
        },
        "/api/v1/whatsapp/senders/{sender_id}/pause": {
            "post": {
                "summary": "Admin: pause a sender by hand (default too)",
                "description": "A pause by hand is never probed: only a resume ends it",
                "parameters": [sender_id],
                "requestBody": pause_body,
                "responses": {
                    "200": _json(_ref("SenderView"), "Paused"),
                    **_errors(
                        *(code for code in body_errors if code != 409),
                        body_bytes=max_body_bytes,
                    ),
                },
            }
        },
        "/api/v1/whatsapp/senders/{sender_id}/resume": {
            "post": {
                "summary": "Admin: resume a paused sender (default too), at once",
                "parameters": [sender_id],
                "responses": {"200": view, **_errors(401, 403, 404, 503)},
            }
        },
    }


def _webhook_paths() -> dict[str, Any]:
    """The providers' receipt webhooks (outbox/webhooks.py): no JWT, a signature instead.
    Their bodies are the providers' (Meta's, a gateway's), described in words."""
    from outbox.webhooks import (
        GATEWAY_SIGNATURE_HEADER,
        HUB_SIGNATURE_HEADER,
        MAX_GATEWAY_STATUSES,
        MAX_SIGNATURE_AGE,
    )

    def query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": True, "schema": schema}

    def header(name: str, pattern: str, description: str) -> dict[str, Any]:
        schema = {"type": "string", "pattern": pattern}
        return {
            "name": name,
            "in": "header",
            "required": True,
            "description": description,
            "schema": schema,
        }

    counts = {
        "type": "object",
        "properties": {
            "recorded": {"type": "integer", "minimum": 0},
            "unknown": {"type": "integer", "minimum": 0},
            "ignored": {"type": "integer", "minimum": 0},
        },
        "required": ["recorded", "unknown", "ignored"],
    }
    acknowledged = _json(
        counts,
        "Acknowledged, its receipts recorded in one transaction: recorded (matched a message"
        " here), unknown (no message here has that id), ignored (not a receipt)",
    )
    too_large = _json(
        _ref("ErrorResponse"), "Body larger than OUTBOX_WEBHOOK_MAX_BYTES (1 MiB by default)"
    )
    unsigned = _json(
        _ref("ErrorResponse"), "Signature missing, malformed or not by a known secret: nothing"
    )
    return {
        "/webhooks/whatsapp": {
            "get": {
                "summary": "Meta's webhook verification handshake",
                "description": "hub.mode=subscribe and hub.verify_token equal to"
                " OUTBOX_CLOUD_VERIFY_TOKEN (set and not empty): 200 with hub.challenge as the"
                " plain-text body; anything else: 403",
                "security": [],
                "parameters": [
                    query("hub.mode", {"type": "string", "enum": ["subscribe"]}),
                    query("hub.verify_token", {"type": "string"}),
                    query("hub.challenge", {"type": "string"}),
                ],
                "responses": {
                    "200": {
                        "description": "hub.challenge, as given",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "403": _json(_ref("ErrorResponse"), "Not subscribe, or not the verify token"),
                },
            },
            "post": {
                "summary": "Meta's status notifications (delivered, read, failed, sent)",
                "description": "The Cloud API's webhook body (entry[].changes[].value.statuses[]),"
                " signed with the Meta app's secret: OUTBOX_CLOUD_APP_SECRET (any sender's"
                " messages) or a cloud sender's app_secret (that sender's messages). A status"
                " names its message by biz_opaque_callback_data (the task id) or by id (the"
                " wamid). Other statuses, inbound messages and other fields are acknowledged and"
                " ignored.",
                "security": [],
                "parameters": [
                    header(
                        HUB_SIGNATURE_HEADER,
                        "^sha256=[0-9a-fA-F]{64}$",
                        "sha256=<hex HMAC-SHA256 of the raw body, keyed by the app secret>",
                    )
                ],
                "responses": {
                    "200": acknowledged,
                    **_errors(400),
                    "401": unsigned,
                    "413": too_large,
                    **_errors(503),
                },
            },
        },
        "/webhooks/http": {
            "post": {
                "summary": "Receipts from a self-hosted gateway (an http sender)",
                "description": 'JSON {"sender": "<id>", "statuses": [{"task_id" or "id": "…",'
                ' "status": "delivered"|"read"|"failed", "timestamp": <unix seconds>,'
                ' "error": null | {"code": <integer or string>, "message": "…"}}]}, no other'
                f" field (422), at most {MAX_GATEWAY_STATUSES} statuses, signed with that"
                " sender's secret; the statuses are matched among that sender's messages only.",
                "security": [],
                "parameters": [
                    header(
                        GATEWAY_SIGNATURE_HEADER,
                        "^t=[0-9]+,v1=[0-9a-fA-F]{64}$",
                        't=<unix seconds>,v1=<hex HMAC-SHA256 of t + "." + the raw body, keyed'
                        f" by the sender's secret>; t more than {MAX_SIGNATURE_AGE} s from now:"
                        " 401",
                    )
                ],
                "responses": {
                    "200": acknowledged,
                    **_errors(400),
                    "401": unsigned,
                    "413": too_large,
                    **_errors(422, 503),
                },
            }
        },
    }


@functools.cache
def openapi_document(max_body_bytes: int) -> dict[str, Any]:
    """The document for a server whose body limit is `max_body_bytes`
    (OUTBOX_MAX_BODY_BYTES; the batch route's is BATCH_BODY_FACTOR times it)."""
    # outbox.api imports this module only when called.
    from outbox.api import BATCH_BODY_FACTOR, BATCH_JSON_VALUES, MESSAGE_JSON_VALUES

    batch_body_bytes = max_body_bytes * BATCH_BODY_FACTOR
    response_models: list[type[BaseModel]] = [
        models.SendResponse,
        models.BatchResponse,
        models.MessageView,
        models.MessageList,
        models.ErrorResponse,
        models.BatchRequest,
        models.AdminSummary,
        senders.SenderView,
        senders.SenderList,
        senders.PauseRequest,
    ]
    _, defs = models_json_schema(
        [(model, "serialization") for model in response_models], ref_template=_REF
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    send_schema = TypeAdapter(models.SendRequest).json_schema(ref_template=_REF)
    schemas.update(send_schema.pop("$defs", {}))
    schemas["SendRequest"] = send_schema
    sender_schema = senders.SENDER_REQUEST.json_schema(ref_template=_REF)
    schemas.update(sender_schema.pop("$defs", {}))
    schemas["SenderRequest"] = sender_schema
    schemas["StorableJson"] = _storable_json()
    schemas["Template"]["properties"]["components"] = _components()

    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }
    message_path = {
        "get": {
            "summary": "A message, its status and its attempts",
            "parameters": [task_id],
            "responses": {
                "200": _json(_ref("MessageView"), "The message"),
                **_errors(401, 404, 503),
            },
        },
        "delete": {
            "summary": "Cancel a pending message",
            "parameters": [task_id],
            "responses": {
                "200": _json(_ref("MessageView"), "Cancelled (or already cancelled)"),
                **_errors(401, 404, 409, 503),
            },
        },
    }
    retry_path = {
        "post": {
            "summary": "Admin: requeue an errored or cancelled message with a fresh attempt budget",
            "description": "Back to pending, due now, with OUTBOX_MAX_ATTEMPTS more attempts;"
            " the attempts made so far stay in its history. 409 from any other state (or"
            " once the message has expired, or when its sender has been deleted).",
            "parameters": [task_id],
            "responses": {
                "200": _json(_ref("MessageView"), "Requeued: the message as it is now"),
                **_errors(401, 403, 404, 409, 503),
            },
        }
    }
    summary_path = {
        "get": {
            "summary": "Admin: the dashboard's figures (counts, throughput, latency, failures)",
            "responses": {
                "200": _json(_ref("AdminSummary"), "The figures, read from the inspection views"),
                **_errors(401, 403, 503),
            },
        }
    }
    # A sender that exists but does not list the token's sub (DESIGN.md).
    forbidden_sender = {
        "403": _json(
            _ref("ErrorResponse"),
            "sender_forbidden: this token may not send from the sender named",
        )
    }
    send_op = {
        "post": {
            "summary": "Queue one WhatsApp message",
            "requestBody": _json_body(
                "SendRequest", max_body_bytes, "OUTBOX_MAX_BODY_BYTES", MESSAGE_JSON_VALUES
            ),
            "responses": {
                "202": _json(_ref("SendResponse"), "Committed to the outbox"),
                **_errors(400, 401, 409, 413, 415, 422, 503, body_bytes=max_body_bytes),
                **forbidden_sender,
            },
        }
    }
    batch_op = {
        "post": {
            "summary": "Queue 1 to 1,000 messages, all or nothing",
            "requestBody": _json_body(
                "BatchRequest",
                batch_body_bytes,
                f"{BATCH_BODY_FACTOR} × OUTBOX_MAX_BODY_BYTES",
                BATCH_JSON_VALUES,
            ),
            "responses": {
                "202": _json(_ref("BatchResponse"), "All committed to the outbox"),
                **_errors(400, 401, 409, 413, 415, 422, 503, body_bytes=batch_body_bytes),
                **forbidden_sender,
            },
        }
    }
    list_op = {
        "get": {
            "summary": "The caller's messages (an admin's: everyone's), newest first",
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "enum": [status.value for status in MessageStatus],
                    },
                },
                {
                    "name": "client_message_id",
                    "in": "query",
                    "schema": {"type": "string", "minLength": 1, "pattern": models.NO_NUL_PATTERN},
                },
                {
                    "name": "sender",
                    "in": "query",
                    "schema": {"type": "string", "pattern": models.SENDER_PATTERN},
                },
                {
                    "name": "priority",
                    "in": "query",
                    "schema": {"type": "string", "enum": list(models.PRIORITIES)},
                },
                {
                    "name": "delivery",
                    "in": "query",
                    "description": "Messages in this delivery state (their `delivery.state`):"
                    " accepted (sent, no receipt yet), delivered, read or failed",
                    "schema": {"type": "string", "enum": list(get_args(models.DeliveryName))},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                },
                {"name": "after", "in": "query", "schema": {"type": "string", "format": "uuid"}},
            ],
            "responses": {
                "200": _json(_ref("MessageList"), "A page of messages"),
                **_errors(401, 422, 503),
            },
        }
    }
    plain_ok = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    paths: dict[str, Any] = {
        "/api/v1/whatsapp/send/": send_op,
        "/api/v1/whatsapp/send": send_op,
        "/api/v1/whatsapp/send/batch": batch_op,
        "/api/v1/whatsapp/messages": list_op,
        "/api/v1/whatsapp/messages/{task_id}": message_path,
        "/api/v1/whatsapp/messages/{task_id}/retry": retry_path,
        "/api/v1/admin/summary": summary_path,
        **_sender_paths(max_body_bytes),
        **_webhook_paths(),
        "/dashboard": {
            "get": {
                "summary": "The admin dashboard (an HTML page; it asks for an admin token)",
                "security": [],
                "responses": {
                    "200": {"description": "The page", "content": {"text/html": {"schema": {}}}}
                },
            }
        },
        "/healthz": {"get": {"summary": "Process alive", "security": [], "responses": plain_ok}},
        "/readyz": {
            "get": {
                "summary": "Database reachable and migrations current",
                "security": [],
                "responses": {**plain_ok, **_errors(503)},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": plain_ok}
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "outbox",
            "version": "1",
            "description": "Reliable WhatsApp sending through a PostgreSQL outbox",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }
