"""A node for the Kubernetes API emulator: the operator's pods run for real (see README.md)."""
