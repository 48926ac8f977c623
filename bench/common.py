"""Shared by the benchmarks: which models and corpora exist here, and a peak-memory reading."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
VALID = SHARED / "corpora" / "tinystories" / "valid-head.txt"
MODELS = {
    "stories260K": SHARED / "models" / "stories260K",
    "tinystories-4l (bundled)": ROOT / "data" / "models" / "tinystories-4l",
}


def available_models() -> dict[str, Path]:
    out = {k: v for k, v in MODELS.items() if (v / "config.json").exists() and any(v.glob("*.safetensors"))}
    if not out:
        sys.exit("no models found (../shared/models/stories260K or data/models/tinystories-4l)")
    return out


def need_corpus() -> Path:
    if not VALID.exists():
        sys.exit(f"{VALID} is absent: benchmarks read the shared TinyStories text beside the repo")
    return VALID


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
