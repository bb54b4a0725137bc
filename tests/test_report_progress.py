"""Progress lines on stderr for the steps of `report` and `detect` that take seconds (the arithmetic
behind them is tested against scikit-learn in tests/test_roc.py)."""

from __future__ import annotations

from sweeper.cli import main


def test_report_and_detect_say_what_they_are_doing_and_a_bad_input_stays_one_line(grid_sweep, tmp_path, capsys):
    storage, _ = grid_sweep
    capsys.readouterr()
    assert (
        main(["report", "grid", "--storage", str(storage), "--out", str(tmp_path / "rep"), "--no-log-to-mlflow"]) == 0
    )
    err = capsys.readouterr().err
    for step in (
        "6 trials read from mlflow",
        "eigenvector images",
        "detection over 4 completed models",
        "writing results.csv",
    ):
        assert f"report: {step}" in err, err
    assert main(["report", "nosuch", "--storage", str(storage), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists(), err
    assert main(["detect", "grid", "--storage", str(storage)]) == 2  # one seed: nothing to score
    err = capsys.readouterr().err
    assert "add seeds" in err and len(err.strip().splitlines()) == 1, err  # said before any progress line
