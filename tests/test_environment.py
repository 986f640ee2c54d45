"""Knobs live in the config: flexgr reads only a documented few environment variables."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_flexgr_reads_only_the_documented_variables() -> None:
    read = set()
    for path in [*(REPO / "flexgr").rglob("*.py"), *(REPO / "cli").rglob("*.py")]:
        read |= set(re.findall(r"FLEXGR_[A-Z_]+", path.read_text()))
    assert read <= {"FLEXGR_HOME", "FLEXGR_TRITON_TILE_CACHE"}, read
    table = (REPO / "docs" / "train.md").read_text().split("### Environment", 1)[1]
    for name in read:
        assert f"`{name}`" in table, f"{name} is not in docs/train.md's environment table"
