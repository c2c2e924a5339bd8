"""Where the inferlet sources live: the checkout's `inferlets/` (or the copy installed beside `pie`)."""

from __future__ import annotations

from pathlib import Path


def inferlets_dir() -> Path:
    pkg = Path(__file__).resolve().parent.parent  # .../pie
    for candidate in (pkg.parent / "inferlets", pkg / "inferlets"):
        if (candidate / "wit" / "inferlet.wit").exists():
            return candidate
    raise FileNotFoundError(f"the inferlets folder (wit/, sdk/, examples/) is missing beside {pkg}")


def wit_dir() -> Path:
    return inferlets_dir() / "wit"


def examples_dir() -> Path:
    return inferlets_dir() / "examples"
