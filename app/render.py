"""Token rendering shared by every page: a run of tokens, each with its background coloured by a value.

``tokens_html`` returns an HTML string (inline styles only, so it survives ``st.html``'s sanitiser);
``show_tokens`` puts it on the page. Positive values are orange, negative values blue, the
strength proportional to ``|value| / vmax``. Whitespace and control characters are made visible
(``⏎`` for a newline, ``·`` for a space-only token, ``\\x00`` for a control byte); special tokens
(``<s>``, ``<|endoftext|>``) get a grey dashed box; one token can be outlined (the max, or the
selected one). Hovering a token shows its text and value.
"""

from __future__ import annotations

import html
import math

POS_RGB = (255, 118, 0)  # orange: the neuron/head fires
NEG_RGB = (40, 110, 255)  # blue: negative values
SPECIAL_STYLE = "border:1px dashed #888;color:#555;font-family:monospace;font-size:0.85em;padding:0 2px;"
HIGHLIGHT_STYLE = "outline:2px solid #111;outline-offset:0px;font-weight:600;"
WHITESPACE_STYLE = "color:#999;"
_VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥", " ": "·", "\xa0": "⍽", "\u200a": "·"}


def visible_text(token: str) -> tuple[str, bool]:
    """The token with whitespace/control characters made visible; the flag says whether any were.

    Ordinary spaces inside a token are kept (``" dog"`` reads as `` dog``); a token that is only
    whitespace shows a symbol per character, and a newline always shows ``⏎``.
    """
    only_ws = token != "" and token.strip() == ""
    out, changed = [], False
    for ch in token:
        if ch == "\n" or (only_ws and ch in _VISIBLE):
            out.append(_VISIBLE.get(ch, ch))
            changed = True
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
            changed = True
        else:
            out.append(ch)
    if token == "":
        return "∅", True
    return "".join(out), changed


def color(value: float | None, vmax: float) -> str:
    """CSS background for a value (transparent for None/NaN/zero)."""
    if value is None or not math.isfinite(value) or vmax <= 0 or value == 0:
        return "transparent"
    a = min(1.0, abs(value) / vmax)
    r, g, b = POS_RGB if value > 0 else NEG_RGB
    return f"rgba({r},{g},{b},{a * 0.85:.3f})"


def fmt(value: float) -> str:
    return f"{value:+.3f}" if abs(value) < 1000 else f"{value:+.3g}"


def tokens_html(
    tokens: list[str],
    values: list[float] | None = None,
    *,
    special: list[bool] | None = None,
    vmax: float | None = None,
    highlight: int | None = None,
    titles: list[str] | None = None,
) -> str:
    """HTML for ``tokens`` coloured by ``values`` (same length), ``highlight`` outlined.

    ``vmax``: the value that gets full colour (default: the largest ``|value|``). ``titles``
    replace the hover text per token (default: the token and its value). Newline tokens also
    break the line, so a story keeps its shape.
    """
    n = len(tokens)
    if values is not None and len(values) != n:
        raise ValueError(f"{n} tokens but {len(values)} values")
    if special is not None and len(special) != n:
        raise ValueError(f"{n} tokens but {len(special)} special flags")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{n} tokens but {len(titles)} titles")
    if vmax is None:
        finite = [abs(v) for v in (values or []) if v is not None and math.isfinite(v)]
        vmax = max(finite, default=0.0)
    parts = []
    for i, tok in enumerate(tokens):
        v = None if values is None else values[i]
        text, ws = visible_text(tok)
        is_special = bool(special[i]) if special is not None else False
        style = f"background:{color(v, vmax)};border-radius:2px;padding:1px 0;"
        if is_special:
            style += SPECIAL_STYLE
        elif ws:
            style += WHITESPACE_STYLE
        if highlight is not None and i == highlight:
            style += HIGHLIGHT_STYLE
        if titles is not None:
            title = titles[i]
        else:
            title = repr(tok) + ("" if v is None else f"  {fmt(v)}") + (f"  (position {i})" if values is None else "")
        cls = "tok" + (" tok-max" if highlight is not None and i == highlight else "") + (" tok-special" if is_special else "")
        parts.append(
            f'<span class="{cls}" style="{style}" title="{html.escape(title, quote=True)}">{html.escape(text)}</span>'
        )
        if "\n" in tok:
            parts.append("<br>")
    return (
        '<div class="tokens" style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9em;'
        'line-height:1.9;white-space:pre-wrap;word-break:break-word;">' + "".join(parts) + "</div>"
    )


def legend_html(vmax: float, label: str = "activation") -> str:
    """A small key: what full orange / full blue mean."""
    return (
        f'<div style="font-size:0.8em;color:#555;">{html.escape(label)}: '
        f'<span style="background:{color(vmax, vmax)};padding:0 4px;">{fmt(vmax)}</span> '
        f'<span style="background:{color(vmax / 2, vmax)};padding:0 4px;">{fmt(vmax / 2)}</span> '
        f'<span style="padding:0 4px;">0</span> '
        f'<span style="background:{color(-vmax, vmax)};padding:0 4px;">{fmt(-vmax)}</span> '
        f'· <span style="{SPECIAL_STYLE}">&lt;s&gt;</span> special token · '
        f'<span style="{HIGHLIGHT_STYLE}">max</span> outlined · hover a token for its value</div>'
    )


def show_tokens(*args, **kwargs) -> None:
    """``tokens_html`` put on the current Streamlit page."""
    import streamlit as st

    st.html(tokens_html(*args, **kwargs))


def context_html(context: str, token: str) -> str:
    """A spectrum sample's context ("before[[token]]after") with the token outlined and
    newlines made visible."""
    marker = f"[[{token}]]"
    i = context.rfind(marker)
    if i < 0:
        before, after = context, ""
    else:
        before, after = context[:i], context[i + len(marker) :]

    def esc(t: str) -> str:
        return html.escape(t.replace("\n", "⏎"))

    text, _ = visible_text(token)
    return (
        f'<span style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9em;white-space:pre-wrap;">'
        f'{esc(before)}<span style="{HIGHLIGHT_STYLE}background:rgba(255,118,0,0.35);">{html.escape(text)}</span>'
        f"{esc(after)}</span>"
    )
