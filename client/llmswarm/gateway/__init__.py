"""The gateway: an OpenAI-compatible HTTP API and a chat page in front of a swarm.

``llmswarm gateway --swarm URL`` (or ``python -m llmswarm.gateway``) holds client
sessions against the swarm and serves ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` in OpenAI's format, and a chat page at ``/``. See docs/gateway.md.

Modules, one job each: ``openai_schema`` (request and response bodies), ``errors``
(OpenAI error objects and statuses), ``engine`` (generation on worker threads, fair
admission, cancellation), ``sampling`` (OpenAI's sampling parameters as logits
processors), ``text`` (token ids to streamed text, stop sequences), ``streaming``
(server-sent events), ``metrics``, ``app`` (the aiohttp server), ``cli``.
"""
