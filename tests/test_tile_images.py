"""A trial's image tiles (sweeper/tile_images.py): matplotlib's colours without matplotlib."""

from __future__ import annotations

import numpy as np
import torch

from sweeper.tile_images import colours, tiles_png


def test_colours_are_matplotlibs_rdbu_r():
    import matplotlib

    fine = matplotlib.colormaps["RdBu_r"].resampled(2**16)  # the default 256-entry table rounds by 1/256
    t = np.linspace(-1.0, 1.0, 2001)
    ours = colours(t, 1.0)
    np.testing.assert_allclose(ours, fine((t + 1) / 2)[:, :3], atol=1e-4, rtol=0)
    # the comparison can fail: the unreversed map puts red where this puts blue
    assert np.abs(ours - matplotlib.colormaps["RdBu"]((t + 1) / 2)[:, :3]).max() > 0.5
    assert np.allclose(colours(np.array([0.0]), 3.0), 247 / 255)  # zero is white on every scale
    np.testing.assert_allclose(colours(np.array([-9.0, 9.0]), 3.0), colours(np.array([-1.0, 1.0]), 1.0))  # clipped


def test_a_row_of_tiles_is_a_png_with_a_tile_per_vector(tmp_path):
    from PIL import Image

    v = torch.zeros(3, 1, 8, 8)
    v[0, 0, 0, 0], v[1, 0, 0, 0] = 1.0, -1.0  # a positive and a negative pixel in the top-left corner
    path = tiles_png(v, ["v1  λ=1\ncos²=0.5", "v2", "v3"], tmp_path / "t.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == 3 * (8 * 14 + 8) + 8  # three 112-pixel tiles and their margins
    head = img.shape[0] - 8 * 14 - 16  # the tiles start below the titles
    red, blue, white = img[head + 8 + 2, 8 + 2], img[head + 8 + 2, 8 + 120 + 2], img[head + 8 + 2, 8 + 240 + 2]
    assert red[0] > 90 and red[2] < 40 and blue[2] > 90 and blue[0] < 10 and (white == 247).all()
    assert tiles_png(torch.randn(2, 3, 5, 7), [], tmp_path / "c.png").is_file()  # colour, no titles


def test_nan_and_infinite_pixels_are_grey_and_the_rest_keeps_its_scale(tmp_path):
    from PIL import Image

    v = torch.zeros(1, 1, 4, 4)
    v[0, 0, 0, 0], v[0, 0, 0, 1], v[0, 0, 0, 2], v[0, 0, 0, 3] = float("nan"), float("inf"), 2.0, -1.0
    img = np.asarray(Image.open(tiles_png(v, ["a NaN"], tmp_path / "n.png")).convert("RGB"))
    head = img.shape[0] - 4 * 28 - 16
    row = [img[head + 8 + 5, 8 + 28 * j + 5] for j in range(4)]
    assert (row[0] == 128).all() and (row[1] == 128).all()  # grey, not a crash
    assert row[2][0] == 103 and row[3][2] > 150  # 2.0 is the finite maximum: darkest red; -1.0 half-way blue
    assert (tiles_png(torch.full((1, 1, 3, 3), float("nan")), [], tmp_path / "all.png")).is_file()


def test_trial_artifacts_draw_no_matplotlib(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, torch; from pathlib import Path; from sweeper.tracking import eigenvector_image; "
        "eigenvector_image(torch.randn(5, 1, 8, 8), [1.0] * 5, [0.5] * 5, Path(sys.argv[1])); "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e.png")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and (tmp_path / "e.png").is_file()
