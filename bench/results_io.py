"""What every bench result records about the machine, and how it is written (bench scripts import
this from bench/, their own folder, which Python puts first on sys.path when they run as scripts)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from evdm.atomic import atomic_write


def machine(load_before: float) -> dict:
    """CPU count, the 1-minute load average before the run and now (the machine may be shared), Python."""
    return {"cpu_count": os.cpu_count(), "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version()}


def write_result(out: Path, result: dict) -> None:
    """The result as indented JSON at `out` (folders made, written atomically); prints where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}")
