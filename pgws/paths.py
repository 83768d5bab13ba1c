"""The request-path grammar of SPEC 2: `/<token>`, `/<channel>/<token>`, and with a token header
`/` or `/<channel>`. Pure: a path in, (channel, token) out, or a BadRequest/Unauthorized."""

from __future__ import annotations

from urllib.parse import unquote

from pgws.channels import channel_problem
from pgws.errors import INVALID_TOKEN, BadRequest, Unauthorized


def _segments(path: str) -> list[str]:
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise BadRequest("bad request: the path must start with /")
    segments = path[1:].split("/")
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # a trailing slash
    return segments


def parse_path(path: str) -> tuple[str | None, str]:
    """Split a request path into (channel or None, token); raise BadRequest when malformed."""
    segments = _segments(path)
    if len(segments) == 1:
        if not segments[0]:
            raise Unauthorized(INVALID_TOKEN)
        return None, segments[0]
    if len(segments) != 2:
        raise BadRequest("bad request: expected /<channel>/<token> or /<token>")
    return _decode_channel(segments[0]), segments[1]


def parse_channel_path(path: str) -> str | None:
    """The channel of a path when the token came in a header: `/` (None) or `/<channel>`."""
    segments = _segments(path)
    if segments == [""]:
        return None
    if len(segments) != 1:
        raise BadRequest("bad request: with a token header the path is / or /<channel>")
    return _decode_channel(segments[0])


def _decode_channel(segment: str) -> str:
    try:
        channel = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("bad request: the channel is not valid UTF-8") from None
    if (problem := channel_problem(channel)) is not None:
        raise BadRequest(f"bad request: {problem}")
    return channel
