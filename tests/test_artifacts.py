"""A trial's artifacts from the embedded store's files, its Ray checkpoints and MLflow, from a real sweep."""

import shutil

from analysis.artifacts import load_eigenvectors
from analysis.results import load_results


def test_eigenvectors_from_mlflow_and_from_checkpoints(grid_sweep):
    storage, _ = grid_sweep
    df = load_results("grid", storage)
    row = df[df.status == "completed"].iloc[0]
    v = load_eigenvectors(row, storage)
    assert v.shape == (3, 1, 8, 8)
    no_run = row.copy()
    no_run["run_id"] = None  # forces the Ray checkpoint path
    assert (load_eigenvectors(no_run, storage) == v).all()


def test_artifacts_come_from_files_and_checkpoints_and_a_dead_server_is_asked_once(grid_sweep, tmp_path):

    from analysis import schema
    from analysis.artifacts import Artifacts

    storage, _ = grid_sweep
    df = load_results("grid", storage)
    row = df[df.status == "completed"].iloc[0]
    stored = Artifacts("grid", storage)
    assert stored.local(row["run_id"], "eigenvectors.npy") is not None  # the embedded store's own file
    v = stored.eigenvectors(row)
    assert v.shape == (3, 1, 8, 8) and stored.why is None

    copy = tmp_path / "copy"  # the Ray folder alone, its tracking server gone
    shutil.copytree(storage / "grid", copy / "grid")
    meta = schema.read_meta(copy, "grid")
    meta.mlflow_uri = "http://127.0.0.1:9"
    schema.write_meta(copy, "grid", meta)
    arts = Artifacts("grid", copy)
    assert (arts.eigenvectors(row) == v).all()  # from the trial's last checkpoint: MLflow never asked
    assert arts.why is None
    assert arts.fetch(row["run_id"], "localisation.png", tmp_path) is None  # only MLflow has it: checked, refused
    assert "unreachable" in arts.why and arts.skipped == 1
    for ckpt in (copy / "grid").glob("trial_*/checkpoint_*"):
        shutil.rmtree(ckpt)
    assert arts.eigenvectors(row) is None and arts.missing == 1 and arts.skipped == 2
    # skipped, not downloaded: MLflow's minutes of HTTP retries are never entered
    assert load_eigenvectors(row, copy) is None
