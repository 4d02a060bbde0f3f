"""The control plane's shared logic: placement, rebalancing, load metrics and the route-map service.

Both substrates build on it: the Kopf operator (``llmswarm_operator``) and the local
process substrate (``llmswarm_local``). Pure planning modules (:mod:`.placement`,
:mod:`.rebalance`, :mod:`.routetable`, :mod:`.routemap_authority`) do no I/O; :mod:`.load_metrics` and
:mod:`.routemap_service` do.
"""
