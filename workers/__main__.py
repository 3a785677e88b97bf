"""``python -m workers '<json spec>'``: a worker process (see workers.runtime)."""

import sys

from workers.runtime import main

sys.exit(main())
