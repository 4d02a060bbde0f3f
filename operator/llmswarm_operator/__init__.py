"""The Kopf operator for ``Swarm`` resources.

Importing this package has no side effects: the Kopf handlers are registered by the entry
modules, :mod:`llmswarm_operator.__main__` (``python -m llmswarm_operator``, into its own
registry) and :mod:`llmswarm_operator.entry` (``kopf run -m llmswarm_operator.entry``, into
Kopf's default registry).
"""
