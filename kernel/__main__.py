"""``python -m kernel`` is the ``kernel`` command."""

import sys

from kernel.cli import main

sys.exit(main())
