"""What the neuron pages compute, checked independently: token rendering, the hypothesis share
of the spectrum, token search, and the live neuron test."""

from __future__ import annotations

import html as htmllib
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.hypothesis import Hypothesis, bin_shares, explained_share
from app.render import tokens_html, visible_text
from precompute.jobs.neurons.tables import match_tokens

# ----------------------------------------------------------------------------- rendering


def spans(h: str) -> list[tuple[str, str, str]]:
    """(class, style, title) and text of every token span."""
    return re.findall(r'<span class="([^"]*)" style="([^"]*)" title="([^"]*)">([^<]*)</span>', h)


def test_tokens_html_colours_escapes_and_marks():
    toks = ["<s>", " dog", "\n", " ", "<b>&", "x"]
    h = tokens_html(toks, [0.0, 2.0, -1.0, None, 0.5, 0.0], special=[True, False, False, False, False, False], highlight=1)
    s = spans(h)
    assert len(s) == len(toks)
    assert "<b>&" not in h and "&lt;b&gt;&amp;" in h  # escaped
    assert "tok-special" in s[0][0] and s[0][3] == "&lt;s&gt;"
    assert "tok-max" in s[1][0] and "outline" in s[1][1] and sum("tok-max" in x[0] for x in s) == 1
    assert "rgba(255,118,0,0.850)" in s[1][1]  # full orange at vmax = max |value|
    assert "rgba(40,110,255,0.425)" in s[2][1]  # negative: blue, half strength
    assert s[2][3] == "⏎" and "<br>" in h  # newline visible and still breaks the line
    assert s[3][3] == "·" and "transparent" in s[3][1]
    assert htmllib.unescape(s[1][2]) == "' dog'  +2.000"  # hover: token and value


def test_tokens_html_vmax_and_titles():
    s = spans(tokens_html(["a", "b"], [1.0, 3.0], vmax=4.0, titles=["one", "two"]))
    assert "0.212" in s[0][1] and "0.637" in s[1][1]  # 0.85 * 1/4, 0.85 * 3/4
    assert [x[2] for x in s] == ["one", "two"]
    with pytest.raises(ValueError):
        tokens_html(["a"], [1.0, 2.0])


def test_visible_text():
    assert visible_text(" the") == (" the", False)
    assert visible_text("\t") == ("⇥", True)
    assert visible_text("\x00") == ("\\x00", True)
    assert visible_text("a\nb") == ("a⏎b", True)


# ----------------------------------------------------------------------------- hypothesis


def fake_page(counts, samples):
    """A NeuronPage stand-in: histogram on [0, n_bins) with unit bins; samples = [(bin, token)]."""
    edges = tuple(float(i) for i in range(len(counts) + 1))
    spectrum = tuple(SimpleNamespace(bin=b, token=SimpleNamespace(text=t), act=b + 0.5) for b, t in samples)
    return SimpleNamespace(histogram=SimpleNamespace(edges=edges, counts=tuple(counts)), spectrum=spectrum)


def test_bin_shares_scale_the_sample_to_the_bin_count():
    # bin 3 holds 100 tokens, 4 sampled, 1 matches -> 25 estimated; bin 4: 2 tokens, both sampled, both match
    page = fake_page([50, 0, 0, 100, 2], [(0, " a"), (0, " b"), (3, " dog"), (3, " cat"), (3, " x"), (3, " y"), (4, "Dog"), (4, " dog ")])
    rows = bin_shares(page, Hypothesis("dog", "list"))
    assert [r.est_matching for r in rows] == [0.0, 0.0, 0.0, 25.0, 2.0]
    assert [r.n_sampled for r in rows] == [2, 0, 0, 4, 2]
    # top 40% of [0, 5): bins whose lower edge >= 3 -> bins 3 and 4: (25 + 2) / 102
    ex = explained_share(page, Hypothesis("dog", "list"), 0.4)
    assert ex.share == pytest.approx(27 / 102) and ex.n_tokens == 102 and ex.threshold == pytest.approx(3.0)
    # regex on the raw text (leading space included), case-sensitive
    ex = explained_share(page, Hypothesis(r"^ [dc]", "regex"), 0.4)
    assert ex.share == pytest.approx((100 * 2 / 4 + 2 * 1 / 2) / 102)


def test_hypothesis_errors():
    with pytest.raises(ValueError, match="regular expression"):
        Hypothesis("([", "regex")
    with pytest.raises(ValueError, match="mode"):
        Hypothesis("x", "glob")
    assert not Hypothesis(" , ", "list").matches(" ")


def test_explained_share_on_stored_spectrum(neurons_db):
    """On real data: the estimate equals a direct count wherever every bin was fully sampled."""
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    with open_store(neurons_db, create=False).session() as s:
        p = neuron_page(s, "stories260K", 0, 0)
    counts = np.array(p.histogram.counts)
    per_bin = np.bincount([x.bin for x in p.spectrum], minlength=len(counts))
    assert (per_bin == np.minimum(counts, 10)).all()  # the sample covers every bin
    hyp = Hypothesis(p.spectrum[-1].token.text.strip() or "x", "list")
    rows = bin_shares(p, hyp)
    for r in rows:
        if r.count <= 10:  # fully sampled: exact count
            assert r.est_matching == sum(1 for x in p.spectrum if x.bin == r.bin and hyp.matches(x.token.text))


# ----------------------------------------------------------------------------- token search


def test_match_tokens():
    voc = ["<s>", "dog", " dog", " Dog", "dogs", " cat"]
    assert match_tokens(voc, "dog") == [1, 2]
    assert match_tokens(voc, " dog ") == [1, 2]
    assert match_tokens(voc, "CAT") == [5]  # case ignored only when nothing matches exactly
    assert match_tokens(voc, "") == []


def test_neurons_for_tokens_against_brute_force(neurons_db):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import NeuronStatsRow, neurons_for_tokens
    from precompute.store.queries import vocab
    from sqlalchemy import select

    with open_store(neurons_db, create=False).session() as s:
        voc = vocab(s, "stories260K")
        ids = match_tokens(voc, "the")
        hits = neurons_for_tokens(s, "stories260K", ids, limit=10_000)
        rows = s.execute(select(NeuronStatsRow.layer, NeuronStatsRow.neuron, NeuronStatsRow.top_tokens)).all()
    want = {}
    for l, n, tt in rows:
        ms = [m for t, m, _ in tt if t in ids]
        if ms:
            want[(l, n)] = max(ms)
    assert want and {(h[0].layer, h[0].neuron): h[1] for h in hits} == want
    assert [h[1] for h in hits] == sorted(want.values(), reverse=True)


# ----------------------------------------------------------------------------- live


def manual_neuron(lm, ids, layer, neuron):
    """act_fn(gate(x)) * up(x) from the MLP's input, by hand from the weights (Llama MLP)."""
    mlp = lm.model.model.layers[layer].mlp
    grab = {}
    h = mlp.register_forward_pre_hook(lambda m, a: grab.__setitem__("x", a[0]))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ids]))
    h.remove()
    x = grab["x"][0]
    g = x @ mlp.gate_proj.weight[neuron]
    u = x @ mlp.up_proj.weight[neuron]
    return (torch.nn.functional.silu(g) * u).tolist()


def test_live_matches_a_hand_computation(lm260k):
    from app.live import neuron_on_text

    r = neuron_on_text(lm260k, "Once upon a time, there was a little dog.", 2, 40, prepend_bos=True)
    assert r.ids[0] == 1 and r.special[0] and r.tokens[0] == "<s>"
    assert list(r.ids) == lm260k.encode("Once upon a time, there was a little dog.", prepend_bos=True)
    np.testing.assert_allclose(r.acts, manual_neuron(lm260k, list(r.ids), 2, 40), rtol=1e-4, atol=1e-5)
    assert r.acts[r.max_pos] == max(r.acts) and not r.truncated


def test_live_matches_the_stored_examples(lm260k, neurons_db):
    """Running a stored example's sequence live gives the activations the job stored."""
    from app.live import neuron_on_ids
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page
    from precompute.store.queries import sequence_tokens

    with open_store(neurons_db, create=False).session() as s:
        p = neuron_page(s, "stories260K", 4, 17)
        e = p.examples[0]
        ids = sequence_tokens(s, p.run.id, [e.seq_idx])[e.seq_idx]
    acts = neuron_on_ids(lm260k, [int(t) for t in ids], 4, 17)
    np.testing.assert_allclose(acts[e.win_start : e.win_start + len(e.acts)], e.acts, rtol=1e-4, atol=1e-4)
    assert acts[e.pos] == pytest.approx(e.act, rel=1e-4, abs=1e-4)


def test_live_truncates_to_the_context(lm260k):
    from app.live import neuron_on_text

    r = neuron_on_text(lm260k, "the dog ran. " * 300, 0, 0, prepend_bos=True)
    assert r.truncated and len(r.ids) == lm260k.n_ctx == len(r.acts) and r.n_prompt_tokens > lm260k.n_ctx
    assert neuron_on_text(lm260k, "", 0, 0, prepend_bos=False).acts == ()
