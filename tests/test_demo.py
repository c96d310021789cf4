"""The demo end to end on the built-in model and text (the --fast path)."""

import json

import pytest

from prunext.cli import main

pytestmark = pytest.mark.integration


def test_demo_fast_end_to_end(tmp_path, builtin_model_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["round_trip_exact"] is True
    ppls = [row["ppl"] for row in results["rows"]]
    assert len(set(ppls)) == 1 and 5 < ppls[0] < 100
    assert "identical" in (out / "report.md").read_text()
    assert "| dense" in capsys.readouterr().out
