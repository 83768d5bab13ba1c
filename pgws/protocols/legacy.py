"""The legacy wire protocol (SPEC 3), pure: one received frame in, the actions to take out.

No I/O and no clock of its own, so any frame and any grant can be tried without a server. The
session executes the actions in order and stops at the first that closes the socket.
"""

from __future__ import annotations

import dataclasses

from pgws.claims import Grant
from pgws.envelope import EnvelopeWriter
from pgws.errors import MessageRefused

EXPIRED = 3001  # SPEC 3: the token's `exp` passed while the socket was open
NOT_TEXT = 1003  # RFC 6455: a binary frame that is not UTF-8 text


# Actions are plain (not frozen) slotted dataclasses: one is built per frame and channel, and a
# frozen dataclass takes three times as long to build.


@dataclasses.dataclass(slots=True)
class Publish:
    """NOTIFY this envelope (addressed to `channel`) on the listen channel."""

    channel: str
    envelope: str


@dataclasses.dataclass(slots=True)
class Ignore:
    """Drop the frame unread: the socket is read-only (SPEC 3).

    `size` is what the client sent, in bytes, which counts against the socket's read-only budget.
    """

    size: int


@dataclasses.dataclass(slots=True)
class Close:
    """Close the socket with `code` and `reason`.

    `at_once`: fail the connection without waiting on the peer (an expired token: nothing it
    sends afterwards may be processed). Otherwise the close handshake runs as usual.
    """

    code: int
    reason: str
    at_once: bool = False


@dataclasses.dataclass(slots=True)
class Refuse:
    """The frame cannot become a NOTIFY (too big for it): close with the error's code and text."""

    error: MessageRefused

    @property
    def code(self) -> int:
        """The close code the error carries."""
        return self.error.close_code

    @property
    def reason(self) -> str:
        """The close reason: the error's message."""
        return str(self.error)


Action = Publish | Ignore | Close | Refuse


def receive(grant: Grant, writer: EnvelopeWriter, frame: str | bytes, now: float) -> list[Action]:
    """The actions one received frame calls for, read at UNIX time `now` (finite).

    A writer's text frame becomes one `WebsocketMessage` envelope per granted channel, in the
    grant's order; a binary frame counts as its UTF-8 text. If an envelope cannot be built, the
    ones before it are still published, then the socket is refused (SPEC 3: 1009).
    """
    if not grant.can_write:
        if isinstance(frame, str) and not frame.isascii():
            return [Ignore(len(frame.encode(errors="replace")))]  # bytes, as the client sent them
        return [Ignore(len(frame))]
    if isinstance(frame, bytes):
        try:
            frame = frame.decode()
        except UnicodeDecodeError:
            return [Close(NOT_TEXT, "binary frames must be UTF-8 text")]
    if grant.expires_at is not None and now >= grant.expires_at:
        # Checked per frame, not only by the expiry timer: a flood parsed in one read before the
        # timer ran would otherwise be published after `exp` (SPEC 3: expiry).
        return [Close(EXPIRED, "JWT expired", at_once=True)]
    actions: list[Action] = []
    for channel in grant.channels:
        try:
            envelope = writer.build("WebsocketMessage", channel, frame, now)
        except MessageRefused as exc:
            actions.append(Refuse(exc))
            break
        actions.append(Publish(channel, envelope))
    return actions
