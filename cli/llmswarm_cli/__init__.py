"""The ``llmswarm`` command line: the top layer, which builds on every other package."""
