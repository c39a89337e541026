"""``python -m warmpool.cpu_engine``: serve a model directory with the CPU engine."""

import sys

from warmpool.cpu_engine._engine import main

sys.exit(main())
