"""The local substrate: ``llmswarm up`` runs the control plane with block servers as local processes."""
