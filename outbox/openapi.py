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
