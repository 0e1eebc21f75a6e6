"""scripts/error_ratio_sweep.py without a GPU: its arguments and its summary of error ratios."""

from __future__ import annotations


def test_error_ratio_sweep_summarises_ratios_against_the_tests_bound(load_script):
    sweep = load_script("error_ratio_sweep")
    assert sweep.parse_args(["--shape", "1,2,1,129,7"]).shape == (1, 2, 1, 129, 7)
    draws = [{"out": (1e-3, 1e-3), "dq": (3e-3, 1e-3), "dk": (0.0, 0.0), "dv": (1e-3, 2e-3)}] * 4
    draws.append({"out": (1e-3, 1e-3), "dq": (1e-3, 1e-3), "dk": (1e-6, 0.0), "dv": (1e-3, 2e-3)})
    rows = {r["tensor"]: r for r in sweep.summarize(draws)}
    assert rows["dq"]["over bound"] == 4 and rows["dq"]["median"] == 3.0 and rows["dq"]["max"] == 3.0
    assert rows["dk"]["max"] == float("inf") and rows["dk"]["over bound"] == 0  # within the 1e-5 slack
    assert rows["dv"]["median"] == 0.5 and rows["out"]["over bound"] == 0
    assert sweep.format_rows(sweep.summarize(draws)).count("\n") == 5
