"""``kopf run -m llmswarm_operator.entry``: importing this module registers the operator's handlers.

It is the only module whose import registers anything, into Kopf's default registry, which
``kopf run`` serves. ``python -m llmswarm_operator`` does not need it: it builds a registry of
its own.
"""

from llmswarm_operator.handlers import register_default

register_default()
