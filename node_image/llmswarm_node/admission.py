"""Stateless requests in flight (forward and backward), bounded in count and in bytes.

A request is admitted before its body is read, for the bytes it declares (``Content-Length``,
or the message limit where it declares none), and holds them until its reply is on its way:
while it is read, while it waits for the compute thread and while it runs. Past either bound
the server answers ``overloaded`` with ``Retry-After``, at once, instead of queueing without end;
a request larger than the whole byte bound is ``too_large``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llmswarm_core.wire import ProtocolError
from llmswarm_node.sessions import RETRY_AFTER


def refusal(requests: int, held: int, size: int, max_requests: int, max_bytes: int) -> ProtocolError | None:
    """Why one more request of `size` bytes is refused, with `requests` holding `held` bytes in flight (None: it is not)."""
    if size > max_bytes:
        return ProtocolError("too_large", f"a request of {size} bytes, more than the {max_bytes} this server takes in "
                                          "flight at all")
    if requests >= max_requests:
        return ProtocolError("overloaded", f"{requests} forward/backward requests in flight, the limit is {max_requests}",
                             retry_after=RETRY_AFTER)
    if held + size > max_bytes:
        return ProtocolError("overloaded", f"{held} bytes of requests in flight; {size} more would pass the limit "
                                           f"{max_bytes}", retry_after=RETRY_AFTER)
    return None


@dataclass
class InFlight:
    """The stateless requests being read, queued or run (event-loop thread only)."""

    max_requests: int
    max_bytes: int
    requests: int = 0
    bytes: int = 0

    @contextmanager
    def holding(self, size: int) -> Iterator[None]:
        """Admit a request of `size` bytes for the duration of the block, or raise its refusal."""
        refused = refusal(self.requests, self.bytes, size, self.max_requests, self.max_bytes)
        if refused is not None:
            raise refused
        self.requests += 1
        self.bytes += size
        try:
            yield
        finally:
            self.requests -= 1
            self.bytes -= size
