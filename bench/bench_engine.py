"""Throughput of the pytorch engine on random MPT-shaped weights: see generator/bench/engine.py
(the same as `gen-repo bench` and `python -m generator bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.bench.engine import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
