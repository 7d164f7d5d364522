"""The reliability suite's short version (`hierspec reliability --quick`): a real Redis killed and restarted, level
replicas killed, a poison request, schemathesis against the app's schema, a soak, the saved model DB.

Every row but those measured in time or memory (reported by the suite, never asserted here) must hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_reliability_suite_holds(tmp_path):
    out = tmp_path / "reliability.json"
    proc = subprocess.run([str(Path(sys.executable).with_name("hierspec")), "reliability", "--quick", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.exists(), proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["case"] for row in rows} == {"auth", "limits", "faults", "fuzz", "soak", "storage"}
    off = [row for row in rows if not row["holds"] and not row["timing"]]
    assert not off, (off, proc.stdout[-3000:])
    assert "holds" in proc.stdout  # the table was printed
