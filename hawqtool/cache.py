"""Where hawqtool caches stage results, and the fingerprints that key them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """hawqtool's cache folder: ``$HAWQTOOL_CACHE``, else ``~/.cache/hawqtool``."""
    return Path(os.environ.get("HAWQTOOL_CACHE") or Path.home() / ".cache" / "hawqtool")


def settings_key(*parts: Any) -> str:
    """A short sha256 of JSON-serializable parts (settings, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
