"""The llmswarm control plane: placement, the route-map service, the local substrate, the Kopf operator.

Importing the package registers the operator's Kopf handlers into Kopf's default registry
(registration only, nothing runs), so that ``kopf run -m llmswarm_operator`` finds them.
"""

from llmswarm_operator.handlers import register_default

register_default()
