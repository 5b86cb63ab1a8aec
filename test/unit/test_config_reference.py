"""docs/config.md is the generated config reference, and it covers every key."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from moorage.cri import config as c
from moorage.cri import config_reference
from moorage.cri.reload import RELOADABLE, leaves

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_checked_in_reference_is_the_generated_one() -> None:
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        text = f.read()
    assert text == config_reference.markdown(), \
        "docs/config.md is out of date: regenerate it with `moorage config reference > docs/config.md`"


def test_cli_prints_the_reference() -> None:
    r = subprocess.run([sys.executable, "-m", "moorage.cri.cli", "config", "reference"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == config_reference.markdown()


def test_every_key_has_a_row_with_its_reload_column() -> None:
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
             for line in config_reference.markdown().splitlines()
             if line.startswith("| `") and not line.startswith("| `moorage ")]
    rows = {row[0].strip("`"): row for row in cells}
    assert all(len(row) == 5 for row in cells)
    for key in leaves(c.Config()):
        if key == "runtime.handlers":
            assert {"runtime.handlers.<name>.path", "runtime.handlers.<name>.root"} <= set(rows)
        row = rows[key]
        assert row[3] == ("yes" if key in RELOADABLE else "no"), key
        assert row[4], f"{key} has no comment in config.DOCS"
    assert rows["cni.conf_dir"][1:3] == ["string", '`"/etc/cni/net.d"`']
    assert rows["runtime.rlimits"][1] == "table of lists of integers"
    assert rows["log_level"][4] == "debug \\| info \\| warning \\| error"
