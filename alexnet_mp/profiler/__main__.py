"""``python -m alexnet_mp.profiler RUN_DIR`` (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
