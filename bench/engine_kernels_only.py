"""Import this before `generator.engine.<kernel module>` in a GPU micro-benchmark: it makes `generator.engine` an
empty package, so the kernel modules load without `generator/engine/__init__` (which pulls in the executor and its
dependencies), and puts the repository on the path."""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "generator.engine" not in sys.modules:
    sys.path.insert(0, str(ROOT))
    import generator  # noqa: E402  (empty package __init__)

    _engine = types.ModuleType("generator.engine")
    _engine.__path__ = [str(ROOT / "generator" / "engine")]
    sys.modules["generator.engine"] = _engine
    generator.engine = _engine  # type: ignore[attr-defined]
