"""Shared fixtures: one cache folder per test session, trained zoo models and real digits data."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning workers made
# a forward+backward 100x slower (measured while other jobs ran). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def hawqtool_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point hawqtool's cache at a per-session temporary folder."""
    old = os.environ.get("HAWQTOOL_CACHE")
    path = tmp_path_factory.mktemp("hawqtool-cache")
    os.environ["HAWQTOOL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HAWQTOOL_CACHE", None)
    else:
        os.environ["HAWQTOOL_CACHE"] = old


@pytest.fixture(scope="session")
def digits_splits(hawqtool_cache):
    from hawqtool import zoo

    return zoo.digits(batch_size=128)


@pytest.fixture(scope="session")
def mlp_digits(hawqtool_cache):
    from hawqtool import zoo

    return zoo.mlp_digits()


@pytest.fixture(scope="session")
def small_cnn_digits(hawqtool_cache):
    from hawqtool import zoo

    return zoo.small_cnn_digits()


@pytest.fixture(scope="session")
def resnet20_digits(hawqtool_cache):
    from hawqtool import zoo

    return zoo.resnet20_digits()
