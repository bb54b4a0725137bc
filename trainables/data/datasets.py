"""The dataset registry: each dataset's image shape, classes, training size and loader.

One :class:`DatasetEntry` per dataset is all that validation (``dataset`` must be a registered
name; the trigger, window and target ranges follow its shape and classes), ``sweeper plan``'s cost
model (its training size and pixels), the data check before Ray starts and every trial read. The
loader owns its files' checksums (``trainables.data.images``'s tables for the built-in ones). This module
imports no torch: the names are cheap to read (``sweeper --help``); a loader imports what it needs.

A plugin registers its own with :func:`register_dataset`; its loader returns a
:class:`trainables.data.images.ImageData` (CPU tensors in [0, 1], ``(N, C, H, W)``, int64 labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.errors import SweeperError
from trainables.plugins import load_plugins


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset in the registry."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W) of its images; H == W
    classes: int
    train_size: int  # training images (before any train_subset)
    load: Callable[..., Any]  # (root folder, verify checksums, download, **params) -> ImageData on the CPU
    summary: str = ""  # for help: where it comes from
    params: dict[str, Any] = field(default_factory=dict)  # its own fields, each fields.field(...); load gets them
    # (root folder, verify checksums, **params) -> None, raising SweeperError: the check before Ray starts, when it
    # can be made without loading (None: it loads, as a trial does)
    check: Callable[..., None] | None = None

    @property
    def pixels(self) -> int:
        """Values per image, C*H*W (the cost model's input size)."""
        c, h, w = self.shape
        return c * h * w


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    """Add a dataset: validation, the trigger/window/target ranges, ``plan``'s costs and every trial read it."""
    c, h, w = entry.shape
    if h != w or min(entry.shape) < 1 or entry.classes < 2 or entry.train_size < 1:
        raise SweeperError(f"dataset {entry.name!r}: shape {entry.shape} must be (C, H, H) with 2+ classes")
    if entry.params:  # they become fields of the network trial, passed to its loader
        from trainables.fields import register_fields

        register_fields(f"dataset {entry.name}", entry.params, group="data")
    DATASETS[entry.name] = entry
    return entry


def dataset_entry(name: str) -> DatasetEntry:
    """The registered dataset ``name`` (plugins loaded first), or a one-line error naming the valid ones."""
    load_plugins()
    if name not in DATASETS:
        raise SweeperError(f"dataset={name!r} is invalid: must be one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(
    name: str,
    data_dir: str | Path = "~/.cache/sweeper/data",
    verify: bool = True,
    download: bool = False,
    params: dict[str, Any] | None = None,
):
    """Load a registered dataset by name onto the CPU (a :class:`trainables.data.images.ImageData`);
    ``params`` are its own declared fields' values."""
    return dataset_entry(name).load(Path(data_dir).expanduser(), verify, download, **(params or {}))


def check_dataset(
    name: str, data_dir: str | Path = "~/.cache/sweeper/data", verify: bool = True, params: dict[str, Any] | None = None
) -> None:
    """Raise the loader's one-line :class:`SweeperError` if a trial could not read dataset ``name``: its own
    check when it declares one, else a full load."""
    entry = dataset_entry(name)
    if entry.check is None:
        load_dataset(name, data_dir, verify, params=params)
    else:
        entry.check(Path(data_dir).expanduser(), verify, **(params or {}))


def dataset_params(cfg: Any) -> dict[str, Any]:
    """The values of the fields ``cfg``'s dataset declared (empty for the built-in ones)."""
    return {name: getattr(cfg, name) for name in dataset_entry(cfg.dataset).params}


def _digits(root: Path, verify: bool, download: bool):
    from trainables.data.images import load_digits

    return load_digits()


def _embedded(root: Path, verify: bool) -> None:
    """Nothing to find: the data ships with a dependency (the check before Ray then imports no torch, 1.3 s)."""


def _mnist(name: str):
    def load(root: Path, verify: bool, download: bool):
        from trainables.data.images import load_mnist

        return load_mnist(root, name, verify, download)

    return load


def _cifar(name: str):
    def load(root: Path, verify: bool, download: bool):
        from trainables.data.images import load_cifar

        return load_cifar(root, name, verify, download)

    return load


register_dataset(
    DatasetEntry("digits", (1, 8, 8), 10, 1437, _digits, "scikit-learn's 8x8 digits, embedded", check=_embedded)
)
register_dataset(DatasetEntry("mnist", (1, 28, 28), 10, 60000, _mnist("mnist"), "IDX files in data_dir/mnist"))
register_dataset(
    DatasetEntry(
        "fashion-mnist", (1, 28, 28), 10, 60000, _mnist("fashion-mnist"), "IDX files in data_dir/fashion-mnist"
    )
)
register_dataset(DatasetEntry("cifar10", (3, 32, 32), 10, 50000, _cifar("cifar10"), "python pickles"))
register_dataset(DatasetEntry("cifar100", (3, 32, 32), 100, 50000, _cifar("cifar100"), "python pickles"))
