"""``python -m lens.cli``: the ``lens`` command."""

import sys

from .main import main

sys.exit(main())
