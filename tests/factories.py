"""Model and data factories for recipe tests (imported by recipes as ``factories:NAME``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hawqtool import zoo
from hawqtool.types import DataSplits


def not_a_module() -> str:
    return "a string"


class NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def no_layers() -> nn.Module:
    return NoLayers()


def nan_weights() -> nn.Module:
    m = zoo.MLP()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    return m


class _OnceReLU(torch.autograd.Function):
    """A ReLU whose backward cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class OnceMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_OnceReLU.apply(self.fc1(x.flatten(1))))


def once_differentiable_mlp() -> nn.Module:
    torch.manual_seed(0)
    return OnceMLP()


def empty_calibration() -> DataSplits:
    d = zoo.digits()
    return DataSplits(calibration=[], evaluation=d.evaluation, test=d.test)


def nan_data() -> DataSplits:
    d = zoo.digits()
    x, y = d.calibration[0]
    return DataSplits(
        calibration=[(torch.full_like(x, float("nan")), y)], evaluation=d.evaluation, test=d.test
    )


def as_dict(batch_size: int = 128) -> dict:
    d = zoo.digits(batch_size=batch_size)
    return {"calibration": d.calibration, "evaluation": d.evaluation, "test": d.test}


def raising_model() -> nn.Module:
    raise ValueError("no checkpoint for this model")


def raising_data(batch_size: int = 128) -> DataSplits:
    raise RuntimeError("the data server is unreachable")


def type_error_inside() -> nn.Module:
    # A TypeError from the factory's own code, not from a kwargs mismatch.
    return nn.Linear(4, "two")  # type: ignore[arg-type]
