"""Declarative base, schema version and array <-> blob encoding shared by every table module."""

from __future__ import annotations

import numpy as np
from sqlalchemy.orm import DeclarativeBase

# Bump when a table changes shape; a database written with another version is refused on open.
SCHEMA_VERSION = 4  # 4: neuron and explanation rows say their unit (sae_id)


class Base(DeclarativeBase):
    pass


def to_blob(a: np.ndarray) -> bytes:
    """Arrays are stored as raw little-endian bytes; the reader knows the dtype."""
    return np.ascontiguousarray(a).tobytes()


def from_blob(b: bytes, dtype) -> np.ndarray:
    return np.frombuffer(b, dtype=dtype)

