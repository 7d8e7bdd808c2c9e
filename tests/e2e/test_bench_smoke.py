"""`scripts/bench --quick` runs to the end: a smoke test, no thresholds (those are for the bench table)."""

import os
import subprocess

from tests.support.processes import ROOT


def test_bench_quick_runs() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts/bench"), "--quick"], capture_output=True, text=True,
                            timeout=400, cwd=ROOT, env={**os.environ}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "outpost / bare mitmdump" in result.stdout
    # the peer (issue 17): its rows, or why there are none (scripts/bench installs it as root)
    assert ("outpost (lean runner, proxy mode) / Apache proxy mode" in result.stdout
            or "not installed: no Apache rows" in result.stdout), result.stdout[-3000:]
