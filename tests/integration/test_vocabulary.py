"""The API speaks the one vocabulary of outbox/states.py: the statuses its documents and
its list filter name are MessageStatus, every one of them."""

from __future__ import annotations

from typing import get_args

from outbox import api, models
from outbox.openapi import openapi_document
from outbox.states import MessageStatus


def test_the_documented_and_accepted_statuses_are_every_message_status() -> None:
    assert list(get_args(models.Status)) == list(MessageStatus)
    assert list(api.STATUSES) == list(MessageStatus)
    (status,) = [
        parameter
        for parameter in openapi_document(65536)["paths"]["/api/v1/whatsapp/messages"]["get"][
            "parameters"
        ]
        if parameter["name"] == "status"
    ]
    assert status["schema"]["enum"] == [s.value for s in MessageStatus]
