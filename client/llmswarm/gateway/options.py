"""The gateway's settings: one typed object, filled from the command line (``cli.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from llmswarm_core.defaults import DEFAULT_MODEL, FLOAT_DTYPES

DEFAULT_PORT = 8080


@dataclass
class GatewayOptions:
    swarm: str  # route-map URL of the swarm
    model: str = DEFAULT_MODEL  # model SPEC for the client's local part (embeddings, LM head, tokenizer)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    token: str | None = None  # one API key clients must send as a bearer token (a small gateway; see api_keys)
    api_keys: str | None = None  # a key file (gateway/keys.py): many hashed, revocable keys with rate limits
    swarm_token: str | None = None  # the gateway's own credential for the swarm (never a client's API key)
    served_model_name: str | None = None  # the `model` name clients use (default: the route map's model name)
    wire_dtype: str = "float32"  # dtype of hidden states between the gateway and the servers
    max_concurrent: int = 8  # generations running against the swarm at once
    max_queued: int = 64  # admitted requests waiting for a slot; more are refused with 429
    max_tokens: int = 2048  # the most completion tokens one request may ask for (and the chat default)
    context_length: int | None = None  # prompt + completion tokens (default: the model's max_position_embeddings)
    max_body_bytes: int = 4 * 1024 * 1024  # largest request body
    write_timeout: float = 30.0  # seconds a stream may wait for a client that does not read before it is dropped
    load_retry_seconds: float = 5.0  # pause between attempts to reach the swarm at start
    # Host names (no port) a gateway without an API key answers to, besides loopback names; checked only when it
    # listens on a loopback address, where a web page could reach it through DNS rebinding. "*": any.
    allowed_hosts: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse settings that cannot work, with the option's name."""
        checks = [
            (self.max_concurrent >= 1, "--max-concurrent must be at least 1"),
            (self.max_queued >= 0, "--max-queued must be 0 or more"),
            (self.max_tokens >= 1, "--max-tokens must be at least 1"),
            (self.context_length is None or self.context_length >= 2, "--context-length must be at least 2"),
            (self.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024"),
            (self.write_timeout > 0, "--write-timeout must be above 0"),
            (0 <= self.port <= 65535, "--port must be between 0 and 65535"),
            (self.wire_dtype in FLOAT_DTYPES, "--wire-dtype must be float32, float16 or bfloat16"),
            (self.token is None or (self.token.strip() == self.token and self.token != ""), "the token must not be empty or padded"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
