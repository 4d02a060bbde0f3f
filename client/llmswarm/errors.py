"""What the client raises, and the failures of a server that it retries elsewhere."""

from __future__ import annotations

import requests
from websockets.exceptions import WebSocketException

from llmswarm_core.wire import ProtocolError


class SwarmError(RuntimeError):
    """The swarm could not serve a request after every retry."""


TRANSPORT_ERRORS = (OSError, WebSocketException, requests.RequestException, TimeoutError)
"""A server that cannot be reached, or whose connection broke."""

SERVER_FAILURES = (*TRANSPORT_ERRORS, ProtocolError)
"""What a server's request can end with: a transport error, or an error reply (retryable or not)."""
