"""``python -m potstill.cli``: the same entry point as the ``potstill`` script."""

import sys

from potstill.cli import main

sys.exit(main())
