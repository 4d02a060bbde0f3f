"""``python -m llmswarm.gateway --swarm URL``: the same as ``llmswarm gateway``."""

import sys

from llmswarm.gateway.cli import main

sys.exit(main())
