"""``python -m llmswarm_cli``: the ``llmswarm`` command."""

import sys

from llmswarm_cli.main import main

sys.exit(main())
