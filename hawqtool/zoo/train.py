"""Deterministic training of the zoo models, cached on disk so a second run does not retrain."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hawqtool.cache import cache_dir
from hawqtool.files import write_bytes_atomic
from hawqtool.zoo.data import Dataset

log = logging.getLogger(__name__)


def train_classifier(
    build: Callable[[], nn.Module],
    data: Dataset,
    *,
    name: str,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``build()`` on ``data.train`` with Adam and a cosine schedule, or load the cached result.

    The cache key covers the architecture (its state-dict layout), the data set and the settings.
    """
    torch.manual_seed(seed)
    model = build()
    layout = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    key = hashlib.sha256(f"{name}|{layout}|{data.name}|{epochs}|{lr}|{batch_size}|{seed}".encode())
    path = cache_dir() / "zoo" / f"{name}-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    log.info("training zoo model %s (%d epochs); cached at %s", name, epochs, path)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(data.train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    train_idx = torch.from_numpy(data.train)
    model.train()
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_bytes_atomic(path, buf.getvalue())
    return model
