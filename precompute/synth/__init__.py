"""A seeded story generator with planted structure (grammar.py), per-token labels of what was
planted (labels.py), and the planted-fact measurements the Ground truth page and tests share
(facts.py)."""

from .grammar import LABELS, PHRASES, Story, SynthConfig, generate, write_corpus  # noqa: F401
