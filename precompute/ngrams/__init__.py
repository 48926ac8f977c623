"""N-gram rules after Nguyen, "Understanding Transformers via N-gram Statistics" (NeurIPS 2024):
rule templates (templates.py), the training text and which index answers a rule set
(training.py), the on-disk suffix-array index for R_suffix/R_subgram (suffix.py), exact in-memory
tables for R_all (index.py), the vectorised matcher (matcher.py) and the per-token views pages
show (views.py)."""
