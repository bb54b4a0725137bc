"""Datasets as whole tensors on the device.

Every dataset is held as ``(N, C, H, W)`` float tensors in ``[0, 1]`` plus integer labels,
so poisoning and augmentation are tensor surgery on whole batches. The standard files
are read here directly (MNIST IDX, CIFAR python pickles) with md5 checks against the
published values, so the project needs no torchvision.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.errors import SweeperError


class DataError(SweeperError):
    """A dataset file is missing, corrupt or malformed: the message names the file."""


# Published md5 checksums (the same values torchvision verifies).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# md5 of the decompressed content (the official uncompressed files): a re-compressed copy, like the one
# in ../shared/data/mnist, or an uncompressed one is the same data though its .gz md5 differs
MNIST_CONTENT = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR100_FILES = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
ARCHIVES = {  # name -> (folder inside data_dir, url, archive md5)
    "cifar10": (
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


@dataclass
class ImageData:
    """A dataset held as tensors; images are float in [0, 1], normalization kept apart."""

    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) float32 in [0, 1]
    test_y: torch.Tensor  # (M,) int64
    mean: torch.Tensor  # (C,) per-channel mean of the clean training images
    std: torch.Tensor  # (C,) per-channel std of the clean training images
    num_classes: int

    @classmethod
    def from_arrays(cls, name: str, train_x, train_y, test_x, test_y, num_classes: int) -> ImageData:
        """From ``(N, C, H, W)`` images in [0, 1] and integer labels (arrays or tensors): labels checked
        against ``num_classes``, normalization statistics from the training images. A dataset
        plugin's loader returns this."""
        return _bundle(name, train_x, train_y, test_x, test_y, num_classes)

    def to(self, device: torch.device | str) -> ImageData:
        """The same data on another device."""
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return ImageData(name=self.name, num_classes=self.num_classes, **moved)

    def train_subset(self, n: int, seed: int = 0) -> ImageData:
        """The same data with a class-stratified, seeded subset of ``n`` training images (the test set
        and the normalization statistics are kept: models of one population see the same data)."""
        if n <= 0 or n >= len(self.train_y):
            return self
        g = torch.Generator().manual_seed(seed)
        y = self.train_y.cpu()
        order = torch.randperm(len(y), generator=g)
        # stratified: rank every image within its class, then take the n lowest relative ranks
        rank = torch.empty(len(y), dtype=torch.float64)
        for c in range(self.num_classes):
            idx = order[y[order] == c]
            rank[idx] = torch.arange(len(idx), dtype=torch.float64) / max(len(idx), 1)
        keep = torch.sort(torch.argsort(rank + torch.arange(len(y)) * 1e-12)[:n]).values.to(self.train_y.device)
        return ImageData(
            name=self.name,
            train_x=self.train_x[keep],
            train_y=self.train_y[keep],
            test_x=self.test_x,
            test_y=self.test_y,
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel standardization, applied after triggers (Listing 3)."""
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def md5_file(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, md5: str | None) -> None:
    if not path.is_file():
        raise DataError(
            f"missing dataset file {path}: expected it there "
            f"(pass --download with internet access, or copy the official file)"
        )
    if md5 is not None:
        got = md5_file(path)
        if got != md5:
            raise DataError(
                f"corrupt dataset file {path}: md5 {got}, expected {md5} "
                f"(re-download it, or pass --no-verify-checksums for a custom subset)"
            )


# ----------------------------------------------------------------------------- readers
def read_idx(path: Path, md5: str | None = None, content_md5: str | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) as a uint8 array of its declared shape.

    With ``content_md5`` the file is accepted when either its own md5 is ``md5`` (the official
    ``.gz``) or its decompressed content's md5 is ``content_md5`` (a re-compressed or raw copy).
    """
    path = Path(path)
    _check_file(path, None if content_md5 is not None else md5)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"unreadable IDX file {path}: {e}") from None
    if (
        content_md5 is not None
        and hashlib.md5(raw).hexdigest() != content_md5
        and not (md5 is not None and md5_file(path) == md5)
    ):
        got = f"md5 {md5_file(path)}, expected {md5} (the official .gz) or " if md5 else ""
        raise DataError(
            f"corrupt dataset file {path}: {got}decompressed content md5 {content_md5}, "
            f"found {hashlib.md5(raw).hexdigest()} (re-download it, or pass --no-verify-checksums "
            f"for a custom subset)"
        )
    if len(raw) < 4:
        raise DataError(f"malformed IDX file {path}: {len(raw)} bytes, shorter than the header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"malformed IDX file {path}: magic {raw[:4].hex()}, expected 000008 then 01-04 (uint8)")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"malformed IDX file {path}: header declares shape {shape} "
            f"({expected} bytes) but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


class _CifarUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain (dicts, bytes, lists, numpy arrays): no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def read_cifar_batch(path: Path, md5: str | None = None, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: uint8 images (N, 3, 32, 32) and int64 labels."""
    path = Path(path)
    _check_file(path, md5)
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"malformed CIFAR batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"malformed CIFAR batch {path}: expected keys 'data' and '{label_key}', found {keys}")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"malformed CIFAR batch {path}: data shape {data.shape} with {labels.shape[0]} labels, "
            f"expected (N, 3072) and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


# ----------------------------------------------------------------------------- downloads
def _fetch(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 (fixed https/http URLs)
        shutil.copyfileobj(r, f)
    tmp.replace(dest)


def _download_idx(name: str, folder: Path, files: dict[str, str]) -> None:
    # Untested here: this machine has no internet. Verified by md5 after download.
    for fname, md5 in files.items():
        path = folder / fname
        if path.is_file() and md5_file(path) == md5:
            continue
        errors = []
        for mirror in MIRRORS[name]:
            try:
                _fetch(mirror + fname, path)
                break
            except OSError as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise DataError(f"could not download {fname}: " + "; ".join(errors))
        _check_file(path, md5)


def _download_archive(name: str, root: Path) -> None:
    # Untested here: this machine has no internet. Verified by md5 before extraction.
    folder, url, md5 = ARCHIVES[name]
    archive = root / url.rsplit("/", 1)[1]
    if not (archive.is_file() and md5_file(archive) == md5):
        try:
            _fetch(url, archive)
        except OSError as e:
            raise DataError(f"could not download {url}: {e}") from None
    _check_file(archive, md5)
    _extract(archive, root)


def _extract(archive: Path, root: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")


# ----------------------------------------------------------------------------- loaders
def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean, std


def _bundle(name: str, train_x, train_y, test_x, test_y, num_classes: int) -> ImageData:
    train_x = torch.as_tensor(train_x, dtype=torch.float32)
    test_x = torch.as_tensor(test_x, dtype=torch.float32)
    train_y = torch.as_tensor(np.array(train_y), dtype=torch.int64)
    test_y = torch.as_tensor(np.array(test_y), dtype=torch.int64)
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"{name} {split} labels span [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]"
            )
    mean, std = _stats(train_x)
    return ImageData(name, train_x, train_y, test_x, test_y, mean, std, num_classes)


DIGITS_CACHE = Path("~/.cache/sweeper")  # digits-v1-<scikit-learn version>.npz: the split, as arrays
DIGITS_FORMAT = 1  # raise when the split or the scaling below changes: old caches are then never read


def load_digits() -> ImageData:
    """scikit-learn's 8x8 handwritten digits with a fixed stratified 80/20 split.

    The split arrays are kept in ``~/.cache/sweeper/digits-v1-<scikit-learn version>.npz`` after the first
    load: importing scikit-learn takes about a second, and every trial of a sweep runs in a fresh
    process. The cache is keyed by its format and scikit-learn's version (its split decides the numbers) and rebuilt
    when unreadable; a cache that cannot be written is skipped.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        cache = DIGITS_CACHE.expanduser() / f"digits-v{DIGITS_FORMAT}-{version('scikit-learn')}.npz"
    except PackageNotFoundError:
        cache = None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                return _bundle("digits", z["train_x"], z["train_y"], z["test_x"], z["test_y"], 10)
        except Exception:  # cut short (a BadZipFile), foreign or unreadable: rebuilt below
            pass
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    arrays = {"train_x": x[tr], "train_y": d.target[tr], "test_x": x[te], "test_y": d.target[te]}
    if cache is not None:
        _write_cache(cache, arrays)
    return _bundle("digits", arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], 10)


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` into ``path`` atomically (concurrent trials may write it at once); errors are ignored."""
    import contextlib
    import os
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    except OSError:  # no cache folder here: the next load computes the split again
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _mnist_folder(root: Path, name: str) -> Path:
    # Accept our layout (<root>/mnist) and torchvision's (<root>/MNIST/raw).
    tv = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for cand in (root / name, root / tv / "raw"):
        if cand.is_dir():
            return cand
    return root / name


def load_mnist(root: Path, name: str = "mnist", verify: bool = True, download: bool = False) -> ImageData:
    """MNIST or Fashion-MNIST from the four IDX gz files in ``root/<name>/``."""
    files = MNIST_FILES if name == "mnist" else FASHION_MNIST_FILES
    folder = _mnist_folder(Path(root), name)
    if download:
        _download_idx(name, folder, files)
    content = MNIST_CONTENT if name == "mnist" else {}
    arrays = {}
    for f in files:
        path = folder / f
        if not path.is_file() and (folder / f.removesuffix(".gz")).is_file():
            path = folder / f.removesuffix(".gz")  # an uncompressed copy
        arrays[f] = read_idx(
            path,
            files[f] if verify and path.suffix == ".gz" else None,
            content.get(f.removesuffix(".gz")) if verify else None,
        )
        if verify and path.suffix != ".gz" and f.removesuffix(".gz") not in content:
            raise DataError(
                f"dataset file {path}: no published md5 of the uncompressed {name} file; "
                f"use the official .gz or pass --no-verify-checksums"
            )
    tr_x, tr_y = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    te_x, te_y = arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]
    for x, y, split in ((tr_x, tr_y, "train"), (te_x, te_y, "t10k")):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{name} {split} files disagree: images {x.shape}, labels {y.shape}; expected (N, 28, 28) and (N,)"
            )
    return _bundle(name, tr_x[:, None] / 255.0, tr_y, te_x[:, None] / 255.0, te_y, 10)


def load_cifar(root: Path, name: str = "cifar10", verify: bool = True, download: bool = False) -> ImageData:
    """CIFAR-10 / CIFAR-100 from the python pickle batches in ``root/cifar-10(0)-...``."""
    root = Path(root)
    folder_name, _, archive_md5 = ARCHIVES[name]
    folder = root / folder_name
    if download and not folder.is_dir():
        _download_archive(name, root)
    elif not folder.is_dir():
        archive = root / ARCHIVES[name][1].rsplit("/", 1)[1]
        if archive.is_file():  # the official archive was copied in but not extracted
            _check_file(archive, archive_md5 if verify else None)
            _extract(archive, root)
    files = CIFAR10_FILES if name == "cifar10" else CIFAR100_FILES
    key = "labels" if name == "cifar10" else "fine_labels"
    md5 = (lambda f: files[f]) if verify else (lambda f: None)
    train_names = [f for f in files if f not in ("test_batch", "test")]
    test_name = "test_batch" if name == "cifar10" else "test"
    parts = [read_cifar_batch(folder / f, md5(f), key) for f in train_names]
    tr_x = np.concatenate([p[0] for p in parts])
    tr_y = np.concatenate([p[1] for p in parts])
    te_x, te_y = read_cifar_batch(folder / test_name, md5(test_name), key)
    classes = 10 if name == "cifar10" else 100
    return _bundle(name, tr_x / 255.0, tr_y, te_x / 255.0, te_y, classes)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (the MNIST format); used to make test data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str = "labels") -> None:
    """Write uint8 images (N, 3, 32, 32) as a CIFAR python batch; used to make test data."""
    entry = {
        "batch_label": "sweeper test batch",
        label_key: [int(v) for v in labels],
        "data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1),
        "filenames": [f"{i}.png" for i in range(len(images))],
    }
    buf = io.BytesIO()
    pickle.dump(entry, buf, protocol=2)
    Path(path).write_bytes(buf.getvalue())
