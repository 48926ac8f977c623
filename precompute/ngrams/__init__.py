"""N-gram rules after Nguyen, "Understanding Transformers via N-gram Statistics" (NeurIPS 2024):
rule templates (templates.py), a training-corpus n-gram index (index.py), the vectorised matcher
(matcher.py) and the per-token views pages show (views.py)."""
