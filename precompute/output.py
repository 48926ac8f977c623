"""JSON output of `precompute show`: the same dataclasses the pages get, as JSON on stdout."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime


def _json_default(o):
    if isinstance(o, datetime):
        return o.isoformat(timespec="seconds")
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def print_json(obj) -> None:
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    print(json.dumps(data, default=_json_default, indent=1))
