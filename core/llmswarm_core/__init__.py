"""The shared core of llmswarm: what the client, the block server and the control plane all speak.

The wire format (:mod:`.wire`), the route map's schema and client (:mod:`.routemap`,
:mod:`.routemap_client`), credentials and TLS (:mod:`.security`), model sources and the
architecture table (:mod:`.source`, :mod:`.arch`), spans and coverage (:mod:`.spans`),
thread budgets (:mod:`.threads`) and defaults (:mod:`.defaults`). It imports nothing of
``llmswarm`` (client), ``llmswarm_node`` (server) or the control plane.
"""
