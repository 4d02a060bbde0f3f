"""How a failed request is answered: the one way any error becomes a reply frame.

The HTTP handlers, the session WebSocket and the push connection all answer a failure
with :func:`error_reply`: a ProtocolError keeps its code and message; anything else is a
server defect, logged with its traceback and answered as ``internal``. The code it
returns is the ``status`` label of the request metrics.
"""

from __future__ import annotations

import logging

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError

log = logging.getLogger("llmswarm.node")

# An error reply's message is cut to this many characters: even escaped six bytes a character in the
# JSON header, it stays within the header a client decodes (wire.WireLimits.max_header_bytes, 64 KiB).
MESSAGE_CHARS = 8 * 1024
_RETRY_AFTER_MAX = 3600.0
_REQUEST_ID_MAX = 2**31


def error_reply(error: Exception, request_id: int | None, what: str) -> tuple[bytes, ProtocolError]:
    """The error frame answering `error` (raised while serving `what`), and the ProtocolError it stands for."""
    if not isinstance(error, ProtocolError):
        log.error("%s failed", what, exc_info=error)
        error = ProtocolError("internal", f"{type(error).__name__}: {error}")
    retry_after = None if error.retry_after is None else min(max(error.retry_after, 0.0), _RETRY_AFTER_MAX)
    reply = wire.ErrorReply(code=error.code, message=error.message[:MESSAGE_CHARS], retryable=error.retryable,
                            retry_after=retry_after, request_id=request_id)
    return wire.reply_frame(reply), error


def request_id_of(data: bytes) -> int | None:
    """The request id of a frame that failed after decoding (None where it cannot be read)."""
    try:
        value = wire.decode(data).header.get("request_id")
    except ProtocolError:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _REQUEST_ID_MAX:
        return None  # not an id an error reply can carry (wire.ErrorReply)
    return value
