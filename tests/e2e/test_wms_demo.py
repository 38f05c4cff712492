"""``make wms-demo``: the scheduler and real pilots run a three-step job chain whose data moves through sandboxes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_wms_demo_chain_gives_the_right_count() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "wms_demo.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "result: 89 words (wc over the whole text says 89)" in done.stdout
    assert "stopped the scheduler and pilots" in done.stdout
