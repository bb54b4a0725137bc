import math

import torch

from trainables.spectrum.geometry import feature_geometry, geometry_summary


def test_geometry_rows_against_hand_computed_means():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [12.0, 0.0], [0.0, 10.0], [0.0, 12.0]])
    trig = clean.clone()
    trig[labels == 1] = torch.tensor([[2.0, 0.0], [4.0, 0.0]])  # class 1 pulled towards the target
    rows = feature_geometry(clean, trig, labels, target=0, num_classes=4)
    assert [r["class"] for r in rows] == [0, 1, 2]  # absent class 3 is skipped
    r1 = rows[1]
    assert r1["d_clean"] == 10.0 and r1["d_trig"] == 2.0 and r1["d_ratio"] == 0.2
    assert r1["sigma_norm"] == 1.0 and r1["sigma_ratio"] == 1.0
    assert math.isnan(rows[0]["d_ratio"])  # the target itself
    assert rows[2]["d_ratio"] == 1.0
    s = geometry_summary(rows, 0)
    assert s["geom_d_ratio"] == 0.6
