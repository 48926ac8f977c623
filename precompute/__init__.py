"""tinyscope precompute: load models, run jobs over a corpus, cache results in SQLite."""

__version__ = "0.1.0"
