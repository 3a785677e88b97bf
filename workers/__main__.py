"""``python -m workers '<json spec>'``: a worker process (see workers.runtime)."""

import os
import sys

# A model with its own Python environment (kernel/execution_env.py): the server's site-packages come after the
# environment's, for the packages the worker needs and the environment lacks.
sys.path.extend(p for p in os.environ.get("EK_FALLBACK_PATH", "").split(os.pathsep) if p and p not in sys.path)

from workers.runtime import main  # noqa: E402 - after the path is complete

sys.exit(main())
