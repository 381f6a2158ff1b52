"""``bns-pipe bench`` smoke test: every method runs and the outputs are well-formed (not speed);
every run, PyG's included, scores the chosen ``--metric``."""

from __future__ import annotations

import json
from pathlib import Path

from bns_pipe.bench.report import PLOTS
from bns_pipe.bench.suite import METHODS, Settings, aggregate, bench, runs


def test_every_method_runs_and_the_report_is_complete(tmp_path: Path) -> None:
    settings = Settings(graphs=["tiny"], worlds=[1, 2], epochs=2, warmup=1, repeats=1, metric="f1")
    assert "quant-4" in METHODS and "quant-4" not in settings.methods  # opt-in methods
    settings.methods = list(METHODS)
    results = bench(settings, tmp_path, progress=False)
    done = {(r["method"], r["world"]) for r in results["runs"]}
    assert done == {(m.name, 2 if m.distributed else 1) for m in METHODS.values()}
    assert len(runs(settings)) == len(METHODS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["epochs"] == 2 and saved["machine"]["cpu_cores"] >= 1
    for run in saved["runs"]:
        assert run["epoch_time_s"] > 0 and 0 <= run["test_acc"] <= 1
        assert run["metric"] == "f1" and 0 <= run["test_metric"] <= 1  # PyG's runs too
        assert run["peak_mem_bytes"] > 0 and run["curve"]
        assert (run.get("comm_bytes", 0) > 0) == (run["world"] > 1)
        parts = sum(run.get(k, 0) for k in ("compute_s", "comm_s", "reduce_s", "sample_s"))
        assert abs(parts - run["epoch_time_s"]) < 1e-9  # one whole epoch, stacked
    bns = {r["method"]: r["comm_bytes"] for r in saved["runs"] if r["world"] == 2}
    assert bns["bns-0.1"] < 0.2 * bns["vanilla"]
    assert bns["quant-8"] < 0.3 * bns["vanilla"] and bns["quant-2"] < bns["quant-4"]
    assert bns["quant-adaptive-4"] < 1.05 * bns["quant-4"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert any(line.endswith("| test f1 |") for line in table)
    assert sum(line.startswith("| tiny |") for line in table) == len(METHODS)
    for name in PLOTS:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_keeps_the_median_repeat_whole() -> None:
    repeats = [
        {"epoch_time_s": t, "compute_s": c, "reduce_s": t - c, "curve": [t]}
        for t, c in ((3.0, 1.0), (1.0, 0.9), (2.0, 0.5))
    ]
    out = aggregate(repeats)
    assert (out["epoch_time_s"], out["compute_s"], out["reduce_s"]) == (2.0, 0.5, 1.5)
    assert (out["epoch_time_min_s"], out["epoch_time_max_s"], out["curve"]) == (1.0, 3.0, [2.0])
