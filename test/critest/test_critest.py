"""Run the upstream CRI conformance suite (critest) through test/critest/run.sh.

Skipped unless a ``critest`` binary is given in $CRITEST or found on PATH (CI does not
have one: build it yourself from kubernetes-sigs/cri-tools, see README.md), and unless
running as root with docker-registry installed.  $CRITEST_FOCUS / $CRITEST_SKIP /
$CRITEST_EXTRA_SKIP pass through to the runner.  The test fails when critest does, with
the names of the failed specs and the runner's log tail in the message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "run.sh")


def _critest() -> str | None:
    c = os.environ.get("CRITEST") or shutil.which("critest")
    return c if c and os.access(c, os.X_OK) else None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_critest() is None, reason="no critest binary ($CRITEST or PATH)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="critest against moorage needs root"),
    pytest.mark.skipif(shutil.which("docker-registry") is None and not os.path.exists("/usr/bin/docker-registry"),
                       reason="docker-registry is not installed"),
]


def _failed_specs(junit: str) -> list[str]:
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for tc in root.iter("testcase"):
        f = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if f is not None:
            why = re.sub(r"\s+", " ", f.get("message") or "")[:300]
            out.append(re.sub(r"\s+", " ", tc.get("name", "?")) + "\n      " + why)
    return out


def test_critest(tmp_path):
    report = tmp_path / "report"   # junit.xml, critest.log, daemon.log (kept by pytest's tmp_path)
    env = {**os.environ, "CRITEST": _critest(), "CRITEST_REPORT_DIR": str(report)}
    timeout = int(os.environ.get("CRITEST_PYTEST_TIMEOUT", "5400"))
    r = subprocess.run([RUNNER], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        failed = _failed_specs(str(report / "junit.xml"))
        pytest.fail(f"critest exited {r.returncode}; {len(failed)} failed spec(s):\n  "
                    + "\n  ".join(failed) + "\n--- runner output (tail) ---\n" + r.stdout[-6000:])
