"""benchmarks/serve_load.py finds the server's URL past the lines a CUDA warm-up prints first."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
spec = importlib.util.spec_from_file_location("serve_load", PATH)
assert spec is not None and spec.loader is not None
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)


def test_the_url_line_after_warm_up_lines(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO(
        "warming up: batches of 1 to 64 (first calls compile kernels)\n"
        "warmed up: 21 batches in 12.5 s\n"
        "serving runs/x (model weights, 3,706 items) on http://127.0.0.1:40123 (Ctrl-C stops)\n"
    )
    assert serve_load.server_url(out) == "http://127.0.0.1:40123"
    assert "warmed up: 21 batches" in capsys.readouterr().err  # echoed while waiting


@pytest.mark.parametrize(
    ("text", "said"), [("", "no output"), ("error: no model here\n", "error: no model here")]
)
def test_a_server_that_never_listens_is_reported(text: str, said: str) -> None:
    with pytest.raises(SystemExit, match=said):
        serve_load.server_url(io.StringIO(text))
