"""Where hawqtool caches stage results, and the fingerprints that key them."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def cache_dir() -> Path:
    """hawqtool's cache folder: ``$HAWQTOOL_CACHE``, else ``~/.cache/hawqtool``."""
    return Path(os.environ.get("HAWQTOOL_CACHE") or Path.home() / ".cache" / "hawqtool")


def settings_key(*parts: Any) -> str:
    """A short sha256 of JSON-serializable parts (settings, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def hash_tensor(h: Any, name: str, t: Any) -> None:
    """Feed a tensor's name, dtype, shape and bytes to the hashlib object ``h`` (a copy to the CPU
    first if it lives elsewhere)."""
    import torch  # lazy: this module stays importable without torch

    t = torch.as_tensor(t).detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def qualified_name(fn: Any) -> str:
    """A stable name of a callable for cache keys: ``module.qualname``, partials spelled out."""
    if isinstance(fn, functools.partial):
        return f"partial({qualified_name(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"


def load_cached(
    path: Path | None, fingerprint: str, from_dict: Callable[[Mapping[str, Any]], T], *, what: str
) -> T | None:
    """A cached artifact whose ``fingerprint`` matches, or ``None`` (no file, unreadable, or
    stale: each of the last two logged, so the stage recomputes)."""
    if path is None or not path.is_file():
        return None
    try:
        artifact = from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable %s cache %s (%s); recomputing", what, path, e)
        return None
    if getattr(artifact, "fingerprint", None) != fingerprint:
        log.warning("ignoring %s cache %s: its fingerprint does not match; recomputing", what, path)
        return None
    log.info("%s loaded from cache %s", what, path)
    return artifact
