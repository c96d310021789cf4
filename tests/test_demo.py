"""The demo end to end on the built-in model and text (the --fast path)."""

import json
import math

import pytest

from prunext.cli import main

pytestmark = pytest.mark.integration


def test_demo_fast_end_to_end(tmp_path, builtin_model_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["dense", "flexigpt 30%, before healing", "shortgpt 30%, before healing", "flexigpt 30%, healed"]
    ppl = {name: row["perplexity"]["ppl"] for name, row in rows.items()}
    assert all(math.isfinite(p) for p in ppl.values())
    assert 5 < ppl["dense"] < 100
    assert ppl["dense"] < ppl["flexigpt 30%, before healing"]
    assert ppl["flexigpt 30%, healed"] < ppl["flexigpt 30%, before healing"]  # healing helps even on a tiny budget
    assert results["round_trip_exact"] is True
    for row in rows.values():
        assert set(row["tasks"]["tasks"]) == {"piqa", "arc_easy"}
        assert row["tasks"]["tasks"]["piqa"]["n"] == 10
    metrics = [json.loads(line) for line in (out / "heal" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == results["settings"]["train_tokens"] // 1024
    report = (out / "report.md").read_text()
    for plot in ("importance.png", "loss.png", "perplexity.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    assert (out / "heal" / "final" / "config.json").exists()
    assert "| dense |" in capsys.readouterr().out
