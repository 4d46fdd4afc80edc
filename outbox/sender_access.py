"""Whether a request may send from the senders its messages name, decided from the senders
kept in memory (outbox/sender_directory.py): the send path makes no query of its own.
A sender not known, or not allowed to this user, is read for again before it is refused
(it may have been created or changed a moment ago)."""

from __future__ import annotations

from collections.abc import Sequence

from outbox.auth import Principal
from outbox.errors import ApiError
from outbox.sender_directory import SenderDirectory

SENDER_FORBIDDEN = "sender_forbidden"


async def check_senders(
    directory: SenderDirectory, principal: Principal, senders: Sequence[str], *, batch: bool
) -> None:
    """Raise unless `principal` may send from each of `senders` (one per message, in the
    request's order): 422 naming every message whose sender does not exist (with its
    `index` in a batch), else 403 `sender_forbidden` for the first message whose sender
    does not list this user (an admin may send from any). When the senders could not be
    read (the database away since start-up), the database's error: 503."""
    if _refused(directory, principal, senders):
        # Maybe created or changed a moment ago, its NOTIFY not yet heard: read again.
        await directory.reread()
    unknown = {sender for sender in set(senders) if directory.get(sender) is None}
    if unknown:
        fields = [
            ({"index": index} if batch else {})
            | {"path": "sender", "message": f"there is no sender {sender!r}"}
            for index, sender in enumerate(senders)
            if sender in unknown
        ]
        raise ApiError(422, "invalid batch" if batch else "invalid message", fields=fields)
    if principal.is_admin:
        return
    for index, sender in enumerate(senders):
        known = directory.get(sender)
        if known is not None and not known.allows(principal.user_id):
            where = f"item {index}: " if batch else ""
            raise ApiError(
                403,
                f"{where}this token may not send from sender {sender!r}",
                code=SENDER_FORBIDDEN,
                extra={"index": index} if batch else None,
            )


def _refused(directory: SenderDirectory, principal: Principal, senders: Sequence[str]) -> bool:
    """Whether the senders as known now refuse any of these messages."""
    for sender in set(senders):
        known = directory.get(sender)
        if known is None or not (principal.is_admin or known.allows(principal.user_id)):
            return True
    return False
