"""Shared by the benchmarks: which models and corpora exist here, a peak-memory reading, and one
part of a benchmark run in a fresh process."""

from __future__ import annotations

import json
import resource
import subprocess
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


def available_models(only: str | None = None) -> dict[str, Path]:
    """The models present here; ``only``: a comma-separated list of name parts to keep."""
    out = {k: v for k, v in MODELS.items() if (v / "config.json").exists() and any(v.glob("*.safetensors"))}
    if only:
        out = {k: v for k, v in out.items() if any(m.strip() and m.strip() in k for m in only.split(","))}
    if not out:
        sys.exit("no models found (../shared/models/stories260K or data/models/tinystories-4l)")
    return out


def need_corpus() -> Path:
    if not VALID.exists():
        sys.exit(f"{VALID} is absent: benchmarks read the shared TinyStories text beside the repo")
    return VALID


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_part(script: str, args: list[str]) -> dict:
    """Run ``python script *args`` in a fresh process (its own peak memory) and return the JSON
    object it prints on its last line of output."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
