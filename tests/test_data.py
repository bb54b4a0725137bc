import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.data.datasets import load_dataset
from trainables.data.images import (
    DataError,
    load_digits,
    md5_file,
    read_cifar_batch,
    read_idx,
)


def test_digits_is_a_fixed_stratified_split_in_unit_range():
    a, b = load_digits(), load_digits()
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.train_y, b.train_y)
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified


def test_digits_cache_holds_scikit_learns_split_and_a_broken_one_is_rebuilt(tmp_path, monkeypatch):
    """Trials read digits from a cache (no scikit-learn import in each trial's process): the same tensors
    as scikit-learn's split; a cache cut short is rebuilt, an unwritable one skipped."""
    from trainables.data import images

    monkeypatch.setattr(images, "DIGITS_CACHE", tmp_path / "cache")
    first = load_digits()  # scikit-learn's split, then written
    (cache,) = (tmp_path / "cache").glob("digits-*.npz")
    again = load_digits()  # from the cache
    for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
        assert torch.equal(getattr(first, k), getattr(again, k)), k
    cache.write_bytes(cache.read_bytes()[:100])  # cut short by a kill
    assert torch.equal(load_digits().train_x, first.train_x)
    assert cache.stat().st_size > 1000  # rebuilt
    monkeypatch.setattr(images, "DIGITS_CACHE", Path("/proc/no-such-cache"))
    assert torch.equal(load_digits().test_y, first.test_y)


def test_mnist_reader_parses_real_idx_files(mnist_dir):
    data = load_dataset("mnist", mnist_dir, verify=False)
    assert data.train_x.shape == (200, 1, 28, 28) and data.test_x.shape == (60, 1, 28, 28)
    raw = read_idx(mnist_dir / "mnist" / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(data.train_x[:, 0], torch.from_numpy(raw / 255.0).float())
    assert data.train_y.dtype == torch.int64 and int(data.train_y.max()) <= 9
    # normalization stats come from the clean training images
    torch.testing.assert_close(data.mean, data.train_x.mean(dim=(0, 2, 3)))


def test_torchvision_layout_is_accepted(tmp_path):
    from conftest import make_mnist_files

    make_mnist_files(tmp_path / "MNIST" / "raw")
    assert load_dataset("mnist", tmp_path, verify=False).train_x.shape[0] == 200


def test_md5_is_checked_against_the_published_value(mnist_dir):
    with pytest.raises(
        DataError, match=r"corrupt dataset file .*train-images-idx3-ubyte.gz: md5 \w+, expected f68b3c2d"
    ):
        load_dataset("mnist", mnist_dir, verify=True)


def test_corrupted_idx_file_is_rejected(mnist_dir):
    path = mnist_dir / "mnist" / "train-images-idx3-ubyte.gz"
    good_md5 = md5_file(path)
    read_idx(path, good_md5)  # passes with its own checksum
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="corrupt dataset file"):
        read_idx(path, good_md5)
    # truncated content is caught by the header/size check even without checksums
    path.write_bytes(gzip.compress(bytes(raw[:-10])))
    with pytest.raises(DataError, match=r"header declares shape \(200, 28, 28\)"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable IDX file"):
        read_idx(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing dataset file .*mnist/train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_cifar_reader_parses_real_pickle_batches(cifar_dir):
    data = load_dataset("cifar10", cifar_dir, verify=False)
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    x, y = read_cifar_batch(cifar_dir / "cifar-10-batches-py" / "data_batch_1")
    torch.testing.assert_close(data.train_x[:20], torch.from_numpy(x / 255.0).float())
    with pytest.raises(DataError, match="corrupt dataset file .*data_batch_1: md5"):
        load_dataset("cifar10", cifar_dir, verify=True)


def test_cifar100_uses_fine_labels(tmp_path):
    from trainables.data.images import write_cifar_batch

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        write_cifar_batch(
            folder / name, rng.integers(0, 256, (30, 3, 32, 32)), rng.integers(0, 100, 30), label_key="fine_labels"
        )
    data = load_dataset("cifar100", tmp_path, verify=False)
    assert data.num_classes == 100 and data.train_x.shape == (30, 3, 32, 32)


def test_corrupted_and_malicious_cifar_batches_are_rejected(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="malformed CIFAR batch .*data_batch_2"):
        read_cifar_batch(path)

    class Evil:
        def __reduce__(self):  # len, not print: Ray replaces builtins.print once a sweep ran in this process
            return (len, ("pwned",))

    path.write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="forbidden global builtins.len"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}))
    with pytest.raises(DataError, match=r"data shape \(3, 100\)"):
        read_cifar_batch(path)


def test_mnist_verifies_decompressed_content_so_recompressed_or_raw_copies_pass(tmp_path):
    """A re-compressed copy (another .gz md5, same content) or an uncompressed one is accepted by the
    content md5; the same bytes changed by one value are not."""
    import hashlib

    from conftest import make_mnist_files

    import trainables.data.images as d

    folder = make_mnist_files(tmp_path / "mnist")
    saved = dict(d.MNIST_CONTENT)
    try:
        for f in list(d.MNIST_CONTENT):  # this tiny set's own content sums stand in for the official ones
            d.MNIST_CONTENT[f] = hashlib.md5(gzip.decompress((folder / f"{f}.gz").read_bytes())).hexdigest()
        assert load_dataset("mnist", tmp_path, verify=True).train_x.shape[0] == 200  # .gz md5s differ: content decides
        raw = folder / "t10k-labels-idx1-ubyte"
        raw.write_bytes(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        assert load_dataset("mnist", tmp_path, verify=True).test_y.shape[0] == 60  # uncompressed copy
        data = bytearray(raw.read_bytes())
        data[-1] = (data[-1] + 1) % 10
        raw.write_bytes(bytes(data))
        with pytest.raises(DataError, match="decompressed content md5"):
            load_dataset("mnist", tmp_path, verify=True)
    finally:
        d.MNIST_CONTENT.update(saved)


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist").is_dir(),
    reason="real MNIST is not beside the checkout (../shared/data/mnist)",
)
def test_real_mnist_copy_verifies_by_its_content():
    data = load_dataset("mnist", Path(__file__).resolve().parents[2] / "shared" / "data", verify=True)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)


def test_train_subset_is_stratified_seeded_and_keeps_the_test_set():
    data = load_dataset("digits")
    sub = data.train_subset(500)
    assert len(sub.train_y) == 500 and torch.equal(sub.test_y, data.test_y) and torch.equal(sub.mean, data.mean)
    counts = torch.bincount(sub.train_y, minlength=10).float()
    full = torch.bincount(data.train_y, minlength=10).float() * 500 / len(data.train_y)
    assert (counts - full).abs().max() <= 1.0  # stratified: every class at its share, to one image
    assert torch.equal(sub.train_x, data.train_subset(500).train_x)  # the same subset every time
    assert data.train_subset(0) is data and data.train_subset(10_000) is data
