"""``bns-pipe accuracy`` smoke test: paired runs, a well-formed report, resume by skipping
finished runs and redoing those whose options changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bns_pipe.bench.accuracy import Study, accuracy, score_of_run
from bns_pipe.errors import ConfigError


def test_study_reports_and_resumes(tmp_path: Path) -> None:
    study = Study(["synthetic"], ["single", "bns-0.1-renorm"], [0, 1], tmp_path, epochs=2)
    result = accuracy(study, progress=False)
    rows = result["table"]["synthetic"]
    assert result["metric"] == {"synthetic": "accuracy"}
    assert set(rows) == {"single", "bns-0.1-renorm"} and rows["single"]["paired_diff"] == 0.0
    assert 0 < rows["bns-0.1-renorm"]["mean"] <= 100 and "target_met" in rows["bns-0.1-renorm"]
    table = (tmp_path / "accuracy.md").read_text()
    assert "| synthetic | – |" in table and "Δ" in table
    assert (tmp_path / "accuracy_curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = sorted((tmp_path / "runs").rglob("*.jsonl"))
    assert len(runs) == 4
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = accuracy(study, progress=False)  # every run is finished: nothing is redone
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert json.loads((tmp_path / "accuracy.json").read_text())["table"] == again["table"]
    longer = Study(["synthetic"], ["single"], [0], tmp_path, epochs=3)  # options changed
    accuracy(longer, progress=False)
    redone = [p.stat().st_mtime_ns != t for p, t in zip(runs, stamps, strict=True)]
    assert redone == [False, False, True, False]  # single/seed_0 only
    assert json.loads(runs[2].read_text().splitlines()[0])["config"]["epochs"] == 3


def test_study_reads_the_runs_metric() -> None:
    """A run with --metric rocauc is scored by its ROC-AUC; a file from before the metric
    existed by its accuracy."""
    epoch = {"epoch": 0, "loss": 1.0, "val_acc": 0.78, "val_metric": 0.91}
    final = {"final": True, "test_acc": 0.78, "metric": "rocauc", "test_metric": 0.93}
    assert score_of_run([{"header": True}, epoch, final]) == {
        "test": 0.93,
        "metric": "rocauc",
        "val_curve": [0.91],
    }
    old = [{"epoch": 0, "val_acc": 0.7}, {"final": True, "test_acc": 0.72}]
    assert score_of_run(old) == {"test": 0.72, "metric": "accuracy", "val_curve": [0.7]}


def test_gat_study_runs_gat_and_knows_its_datasets(tmp_path: Path) -> None:
    study = Study(["synthetic"], ["single"], [0], tmp_path, epochs=2, model="gat")
    result = accuracy(study, progress=False)
    assert result["model"] == "gat" and "cora" in result["published"]
    header = json.loads(next((tmp_path / "runs").rglob("*.jsonl")).read_text().splitlines()[0])
    assert header["config"]["model"] == "gat" and header["config"]["heads"] == 8
    assert (tmp_path / "accuracy.md").read_text().startswith("# bns-pipe accuracy: GAT")
    with pytest.raises(ConfigError, match="amazon-computers"):
        Study(["amazon-computers"], ["single"], [0], tmp_path, model="gat").validate()
