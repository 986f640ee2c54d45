"""flexgr vlm prepare / info / verify, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.helpers import assert_one_line_error, run


def test_prepare_info_verify(tmp_path: Path) -> None:
    out = tmp_path / "store"
    args = ["--users", "6", "--days", "1", "--items", "50", "--out", out]
    result = run("vlm", "prepare", "synthetic-multitenant", *args)
    assert result.exit_code == 0, result.output
    assert "24 examples" in result.output and "data.source=versioned" in result.output
    info = json.loads(run("vlm", "info", out).stdout)
    assert info["examples"] == 24 and info["protocol"] == "loo-val" and info["bytes"]["tier"] > 0
    result = run("vlm", "verify", out)
    assert result.exit_code == 0 and result.stdout.startswith("ok: 24 examples"), result.output
    assert_one_line_error(run("vlm", "prepare", "synthetic-multitenant", *args), "already exists")
    # A flipped byte in a tier stripe is found by verify, naming the file.
    data = max((out / "tier").glob("bucket=*/*.parquet"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert_one_line_error(run("vlm", "verify", out), "tier", "checksum mismatch")


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("vlm", "prepare", "no-such-data", "--out", tmp_path / "x"),
                          "no-such-data")  # fmt: skip
    assert_one_line_error(
        run("vlm", "prepare", "synthetic-multitenant", "--users", "0", "--out", tmp_path / "x"),
        "users must be >= 1",
    )
    assert_one_line_error(
        run("vlm", "prepare", str(tmp_path), "--users", "3"), "applies to the synthetic log"
    )
    assert_one_line_error(run("vlm", "info", tmp_path), "no versioned dataset", "vlm.json")
    assert_one_line_error(run("vlm", "verify", tmp_path), "no versioned dataset")
    assert not (tmp_path / "x").exists()
