"""Page state <-> URL: every view a user sees can be reopened from its link.

Widgets are created without keys and with the URL's value as their default; when the user
changes one, ``sync`` writes the new value into the URL (a default value is removed, so links
stay short). A widget's identity includes its default, so the next run picks up the URL value.
"""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st


def get_str(name: str, default: str = "") -> str:
    v = st.query_params.get(name)
    return default if v is None else str(v)


def get_choice(name: str, choices, default):
    """A URL parameter that must be one of ``choices`` (anything else -> ``default``)."""
    v = st.query_params.get(name)
    return v if v in choices else default


def sync(name: str, value, default=None) -> None:
    """Put ``value`` in the URL (remove it when it equals ``default``)."""
    if value is None or value == default or value == "":
        if name in st.query_params:
            del st.query_params[name]
    else:
        s = str(int(value)) if isinstance(value, bool) else str(value)
        if st.query_params.get(name) != s:
            st.query_params[name] = s


def neuron_params(model: str, layer: int, neuron: int, **extra) -> dict[str, str]:
    out = {"model": model, "layer": str(int(layer)), "neuron": str(int(neuron))}
    out.update({k: str(v) for k, v in extra.items() if v not in (None, "")})
    return out


def neuron_link(model: str, layer: int, neuron: int, **extra) -> str:
    """Relative link to a neuron page (works wherever the app is served)."""
    return "neuron?" + urlencode(neuron_params(model, layer, neuron, **extra))


def full_url(page_path: str | None = None) -> str:
    """The absolute URL of the current view (for copying), from the browser's address."""
    try:
        here = st.context.url or ""
    except Exception:  # noqa: BLE001 - outside a browser session (tests)
        here = ""
    base = here.split("?", 1)[0] if here else "http://localhost:8501/"
    if page_path is not None:
        base = base.rsplit("/", 1)[0] + "/" + page_path
    first = [k for k in ("model", "layer", "head", "neuron") if k in st.query_params]
    keys = first + sorted(k for k in st.query_params if k not in first)
    query = urlencode({k: st.query_params.get(k) for k in keys})
    return base + ("?" + query if query else "")


def new_selection(key: str, value):
    """``value`` when it differs from the one seen on the previous run under ``key`` (else None).

    Chart/table selections persist across reruns; acting only on a change stops a page from
    jumping again every time it reruns with the old selection still set."""
    seen = f"_seen_{key}"
    if st.session_state.get(seen) == value:
        return None
    st.session_state[seen] = value
    return None if value is None or (isinstance(value, (list, tuple, dict)) and not value) else value
