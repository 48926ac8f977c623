"""Live prompt analysis (precompute/live.py) against plain torch computations, and the lab page."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.live import (
    ablate,
    analyse,
    continue_text,
    format_ablation,
    neuron_corpus_mean,
    parse_ablation,
    prompt_tokens,
)
from precompute.models import ModelError

TEXT = "Once upon a time, there was a little girl named Lily. She liked to play with her red ball."
LAB = str(Path(__file__).resolve().parent.parent / "app" / "views" / "lab.py")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, stories260k_path):
    """A random 2-layer GPT-2 (HF Conv1D weights, learned positions) with stories260K's tokenizer,
    so the GPT-2 code paths are tested before the bundled GPT-2 model exists."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from precompute.models import load_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = GPT2Config(vocab_size=512, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories260k_path).save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(params=["lm260k", "tiny_gpt2", "bundled_lm"])
def lm(request):
    """stories260K (Llama, sentencepiece), a random GPT-2 and, once it exists, the bundled GPT-2 model."""
    return request.getfixturevalue(request.param)


def plain_logits(lm, ids) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def all_hooks(lm) -> set:
    return {(id(m), k) for m in lm.model.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2 stores weights as [d_in, d_out]


# ---------------------------------------------------------------------------------------------
# tokens


def test_tokens_are_the_raw_ids_with_bos(lm):
    toks = prompt_tokens(lm, TEXT)
    raw = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert list(toks.ids) == [lm.bos_id] + list(raw)
    a = analyse(lm, TEXT)
    assert a.ids == toks.ids and a.token_strs[0] == lm.display_vocab()[lm.bos_id]
    assert not a.tokens.truncated and a.notice is None


def test_long_prompt_is_truncated_with_notice(lm):
    text = TEXT * 20
    full = lm.encode(text)
    a = analyse(lm, text, max_tokens=50)
    assert a.ids == tuple(full[:50]) and a.tokens.n_original == len(full)
    assert a.notice and str(len(full)) in a.notice and "50" in a.notice
    assert a.patterns.shape[-1] == 50 and a.top_ids.shape[0] == 50


def test_empty_prompt_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="empty"):
        analyse(lm, "")


# ---------------------------------------------------------------------------------------------
# analysis vs plain torch


def test_topk_and_loss_equal_softmax_of_plain_logits(lm):
    a = analyse(lm, TEXT, top_k=7)
    logits = plain_logits(lm, list(a.ids))
    probs = torch.softmax(logits.double(), -1)
    for p in range(a.n):
        want_p, want_i = torch.topk(probs[p], 7)
        np.testing.assert_allclose(a.top_probs[p], want_p.numpy(), rtol=1e-4, atol=1e-6)
        # the same tokens (ties aside: compare the probability of each reported id)
        np.testing.assert_allclose(probs[p, a.top_ids[p]].numpy(), want_p.numpy(), rtol=1e-4, atol=1e-6)
        assert [t.text for t in a.top(p)] == [lm.display_vocab()[int(i)] for i in a.top_ids[p]]
    ids = torch.tensor(a.ids)
    want_loss = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")
    np.testing.assert_allclose(a.losses, want_loss.numpy(), rtol=1e-4, atol=1e-5)
    assert a.loss(a.n - 1) is None and a.next_token(a.n - 1) is None
    assert math.isclose(a.loss(3), float(want_loss[3]), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(a.mean_loss, float(want_loss.mean()), rel_tol=1e-4)


def test_neuron_activations_equal_a_plain_pre_hook_on_the_mlp_output(lm):
    a = analyse(lm, TEXT)
    acts = {}
    handles = []
    for l in range(lm.n_layers):
        mod = lm.mlp_out(l)
        handles.append(mod.register_forward_pre_hook(lambda m, args, l=l: acts.__setitem__(l, args[0][0].clone())))
    try:
        plain_logits(lm, list(a.ids))
    finally:
        for h in handles:
            h.remove()
    for l in range(lm.n_layers):
        want_v, _ = torch.topk(acts[l], 5, dim=-1)
        np.testing.assert_allclose(a.neuron_acts[l], want_v.numpy(), rtol=1e-4, atol=1e-5)
        got = torch.gather(acts[l], 1, torch.from_numpy(a.neuron_ids[l]))  # the reported ids have those values
        np.testing.assert_allclose(got.numpy(), a.neuron_acts[l], rtol=1e-4, atol=1e-5)
    hits = a.neurons(4)
    last = lm.n_layers - 1
    assert len(hits) == lm.n_layers and hits[last][0].layer == last
    assert hits[last][0].act == pytest.approx(float(acts[last][4].max()), rel=1e-4)
    assert hits[last][0].neuron == int(acts[last][4].argmax())


def test_attention_patterns_equal_plain_output_attentions(lm):
    a = analyse(lm, TEXT)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([a.ids]), output_attentions=True)
    for l in range(lm.n_layers):
        np.testing.assert_allclose(a.patterns[l], out.attentions[l][0].numpy(), rtol=1e-5, atol=1e-6)
    att = a.attention_from(5)
    assert att.shape == (lm.n_layers, lm.n_heads, 6)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)  # causal: all mass on positions 0..5
    assert np.abs(a.patterns[:, :, 5, 6:]).max() < 1e-6


# ---------------------------------------------------------------------------------------------
# continuation


def test_greedy_continuation_equals_argmax_loop(lm):
    c = continue_text(lm, "Once upon a time", n_tokens=8, temperature=0.0, stop_at_eos=False)
    ids = lm.encode("Once upon a time")
    want, probs = [], []
    for _ in range(8):
        logits = plain_logits(lm, ids + want)[-1]
        want.append(int(logits.argmax()))
        probs.append(float(torch.softmax(logits, -1)[want[-1]]))
    assert list(c.new_ids) == want
    np.testing.assert_allclose(c.probs, probs, rtol=1e-4)
    assert c.text == "".join(lm.token_strs(want))


def test_sampling_is_reproducible_per_seed(lm):
    a = continue_text(lm, "Once upon a time", n_tokens=15, temperature=1.0, seed=1, stop_at_eos=False)
    b = continue_text(lm, "Once upon a time", n_tokens=15, temperature=1.0, seed=1, stop_at_eos=False)
    seeds = {continue_text(lm, "Once upon a time", 15, 1.5, s, stop_at_eos=False).new_ids for s in range(4)}
    assert a.new_ids == b.new_ids and len(a.new_ids) == 15
    assert len(seeds) > 1
    with pytest.raises(ValueError):
        continue_text(lm, "x", n_tokens=3, temperature=-1)


# ---------------------------------------------------------------------------------------------
# interventions vs plain weight edits / plain hooks


def _edit_mlp_out(lm, layer, neuron, scale_fn):
    """Zero one neuron's output direction in the weight; returns a restore function."""
    mod = lm.mlp_out(layer)
    w = mod.weight
    old = w.detach().clone()
    with torch.no_grad():
        if is_conv1d(mod):
            w[neuron, :] = 0
        else:
            w[:, neuron] = 0

    def restore():
        with torch.no_grad():
            w.copy_(old)

    return old, restore


def test_zero_ablating_a_neuron_equals_zeroing_its_weight(lm):
    layer, neuron = 1, 7
    r = ablate(lm, TEXT, "neuron", layer, neuron, "zero")
    clean = plain_logits(lm, list(r.tokens.ids))
    _, restore = _edit_mlp_out(lm, layer, neuron, None)
    try:
        edited = plain_logits(lm, list(r.tokens.ids))
    finally:
        restore()
    np.testing.assert_allclose(r.clean_logits, clean.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.ablated_logits, edited.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(r.ablated_logits - r.clean_logits).max() > 1e-4  # the neuron did something
    # the derived numbers are log-softmax differences of those logits
    lp_c = torch.log_softmax(clean.double(), -1)
    lp_a = torch.log_softmax(edited.double(), -1)
    nxt = torch.tensor(r.tokens.ids[1:])
    want = (lp_a[:-1].gather(1, nxt[:, None]) - lp_c[:-1].gather(1, nxt[:, None]))[:, 0]
    np.testing.assert_allclose(r.next_delta, want.numpy(), rtol=1e-3, atol=1e-5)
    ch = r.actual_next(3)
    assert ch.id == r.tokens.ids[4] and ch.d_logprob == pytest.approx(float(want[3]), rel=1e-3, abs=1e-5)
    assert ch.d_logit == pytest.approx(float(edited[3, ch.id] - clean[3, ch.id]), rel=1e-3, abs=1e-5)
    top = r.clean_top(3)
    assert [c.id for c in top] == torch.topk(lp_c[3], r.top_k).indices.tolist()
    up, down = r.most_changed(3, k=3)
    d = (lp_a[3].exp() - lp_c[3].exp()).numpy()  # ranked by the change of probability
    assert [c.id for c in up] == [int(t) for t in np.argsort(-d, kind="stable")[:3] if d[t] > 0]
    assert [c.id for c in down] == [int(t) for t in np.argsort(d, kind="stable")[:3] if d[t] < 0]
    assert up[0].d_prob == pytest.approx(float(d.max()), abs=1e-6) and down[0].d_prob == pytest.approx(float(d.min()), abs=1e-6)
    assert r.mean_loss_change == pytest.approx(-float(want.mean()), rel=1e-3, abs=1e-6)


def test_mean_ablating_a_neuron_equals_weight_edit_plus_constant(lm):
    layer, neuron = 0, 3
    ids = lm.encode(TEXT)
    acts = {}
    h = lm.mlp_out(layer).register_forward_pre_hook(lambda m, a: acts.__setitem__("x", a[0][0, :, neuron].clone()))
    try:
        plain_logits(lm, ids)
    finally:
        h.remove()
    prompt_mean = float(acts["x"][1:].mean())  # BOS excluded
    for given in (None, 0.37):
        r = ablate(lm, TEXT, "neuron", layer, neuron, "mean", mean_value=given)
        c = prompt_mean if given is None else given
        assert r.mean_value == pytest.approx(c, rel=1e-5)
        assert r.mean_source == ("prompt" if given is None else "corpus")
        old, restore = _edit_mlp_out(lm, layer, neuron, None)
        mod = lm.mlp_out(layer)
        direction = old[neuron, :] if is_conv1d(mod) else old[:, neuron]
        hk = mod.register_forward_hook(lambda m, a, out: out + c * direction)
        try:
            edited = plain_logits(lm, ids)
        finally:
            hk.remove()
            restore()
        np.testing.assert_allclose(r.ablated_logits, edited.numpy(), rtol=1e-4, atol=1e-4)


def test_zero_ablating_a_head_equals_zeroing_its_output_projection_columns(lm):
    layer, head = 1, 2
    r = ablate(lm, TEXT, "head", layer, head, "zero")
    mod = lm.attn_out(layer)
    d_head = lm.d_model // lm.n_heads if lm.adapter.family != "llama" else lm.config.head_dim
    sl = slice(head * d_head, (head + 1) * d_head)
    # (a) a plain pre-hook zeroing the head's slice of the o_proj input
    def zero(m, args):
        x = args[0].clone()
        x[..., sl] = 0
        return (x,)

    h = mod.register_forward_pre_hook(zero)
    try:
        hooked_logits = plain_logits(lm, list(r.tokens.ids))
    finally:
        h.remove()
    # (b) zeroing the weight rows/columns that read that slice
    w = mod.weight
    old = w.detach().clone()
    with torch.no_grad():
        if is_conv1d(mod):
            w[sl, :] = 0
        else:
            w[:, sl] = 0
    try:
        edited = plain_logits(lm, list(r.tokens.ids))
    finally:
        with torch.no_grad():
            w.copy_(old)
    np.testing.assert_allclose(r.ablated_logits, hooked_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.ablated_logits, edited.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(r.ablated_logits - r.clean_logits).max() > 1e-4


def test_mean_ablating_a_head_uses_its_mean_z_over_the_prompt(lm):
    layer, head = 0, 1
    r = ablate(lm, TEXT, "head", layer, head, "mean")
    mod = lm.attn_out(layer)
    d_head = lm.config.head_dim if lm.adapter.family == "llama" else lm.d_model // lm.n_heads
    sl = slice(head * d_head, (head + 1) * d_head)
    seen = {}
    h = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0, :, sl].clone()))
    try:
        plain_logits(lm, list(r.tokens.ids))
    finally:
        h.remove()
    mean_z = seen["z"][1:].mean(0)

    def replace(m, args):
        x = args[0].clone()
        x[..., sl] = mean_z
        return (x,)

    h = mod.register_forward_pre_hook(replace)
    try:
        want = plain_logits(lm, list(r.tokens.ids))
    finally:
        h.remove()
    np.testing.assert_allclose(r.ablated_logits, want.numpy(), rtol=1e-4, atol=1e-4)
    assert r.mean_source == "prompt" and "mean" in r.label


def test_hooks_are_removed_afterwards(lm):
    ids = lm.encode(TEXT)
    before = plain_logits(lm, ids)
    n0 = all_hooks(lm)
    analyse(lm, TEXT)
    ablate(lm, TEXT, "neuron", 0, 1, "zero")
    ablate(lm, TEXT, "head", 0, 0, "mean")
    continue_text(lm, TEXT, 3)
    with pytest.raises(ModelError):
        ablate(lm, TEXT, "head", 0, lm.n_heads, "zero")
    assert all_hooks(lm) == n0  # (transformers keeps a few hooks of its own)
    assert torch.equal(plain_logits(lm, ids), before)


def test_bad_ablation_targets_are_clear_errors(lm260k):
    with pytest.raises(ModelError, match="neuron 9999 out of range"):
        ablate(lm260k, TEXT, "neuron", 0, 9999)
    with pytest.raises(ModelError, match="layer 9 out of range"):
        ablate(lm260k, TEXT, "head", 9, 0)
    with pytest.raises(ValueError, match="mean_value applies to neurons"):
        ablate(lm260k, TEXT, "head", 0, 0, "mean", mean_value=1.0)
    with pytest.raises(ValueError, match="not of the form"):
        parse_ablation("neuron:1:2")
    with pytest.raises(ValueError, match="whole numbers"):
        parse_ablation("head:a:2:zero")
    assert parse_ablation(format_ablation("head", 1, 2, "mean")) == ("head", 1, 2, "mean")


def test_neuron_corpus_mean_reads_the_neuron_run(neurons_db, lm260k):
    from precompute.store.db import open_store
    from precompute.jobs.neurons.tables import neuron_page

    store = open_store(neurons_db, create=False)
    with store.session() as s:
        want = neuron_page(s, "stories260K", 2, 11).stats.mean
        assert neuron_corpus_mean(s, "stories260K", 2, 11) == pytest.approx(want)
        assert neuron_corpus_mean(s, "no-such-model", 2, 11) is None
    store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# the lab page (AppTest)


@pytest.fixture
def lab(neurons_db, monkeypatch):
    import app.state as state

    monkeypatch.setattr(state, "DB_URL", neurons_db)
    from streamlit.testing.v1 import AppTest

    def make(**params):
        at = AppTest.from_file(LAB, default_timeout=120)
        for k, v in params.items():
            at.query_params[k] = str(v)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


def _md(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_lab_empty_prompt_shows_a_hint(lab):
    at = lab()
    assert any("Type a prompt" in i.value for i in at.info)
    assert not at.error
    at.button[0].click().run()  # "Try an example"
    assert "Most active neurons" in _md(at)
    assert at.query_params["prompt"].startswith("Once upon a time")


def test_lab_renders_a_prompt(lab, lm260k):
    at = lab(model="stories260K", prompt="Once upon a time there was", pos=3)
    assert not at.error
    md = _md(at)
    assert "Next token after position 3" in md and "' time'" in md  # position 3 is ' a' -> actual next ' time'
    assert "neuron?model=stories260K&layer=0&neuron=" in md and "prompt=Once+upon+a+time+there+was" in md
    assert "head?model=stories260K&layer=0&head=0" in md
    assert "No n-gram index" in "\n".join(c.value for c in at.caption) or "rule" in md
    # the top-k table holds the model's probabilities at position 3
    a = analyse(lm260k, "Once upon a time there was")
    top = at.dataframe[0].value
    assert top["prob"].tolist() == pytest.approx([t.prob for t in a.top(3)], rel=1e-5)
    # picking another token updates the URL
    at.select_slider[0].set_value(5).run()
    assert at.query_params["pos"] == "5"
    assert "Next token after position 5" in _md(at)


def test_lab_out_of_range_ablation_is_a_clear_message(lab):
    at = lab(model="stories260K", prompt="Once upon a time", ablate="neuron:0:9999:zero")
    assert any("neuron 9999 out of range" in e.value for e in at.error)
    at = lab(model="stories260K", prompt="Once upon a time", ablate="head:7:0:zero")
    assert any("layer 7 out of range" in e.value for e in at.error)
    at = lab(model="stories260K", prompt="Once upon a time", ablate="nonsense")
    assert any("not of the form" in e.value for e in at.error)


def test_lab_ablation_uses_the_corpus_mean_and_shows_deltas(lab):
    at = lab(model="stories260K", prompt="Once upon a time there was", pos=3, ablate="neuron:2:11:mean")
    assert not at.error
    assert any("over the corpus" in c.value for c in at.caption)
    metrics = {m.label: m.value for m in at.metric}
    assert any(k.startswith("Δ log p(next") for k in metrics)
    assert at.query_params["ablate"] == "neuron:2:11:mean"


def test_lab_two_models_and_unknown_model(lab):
    at = lab(model="stories260K", model2="stories260K", prompt="Once upon a time", pos=2)
    assert len(at.subheader) == 2 and at.query_params["model2"] == "stories260K"
    at = lab(model="nope", prompt="Once upon a time")
    assert any("'nope' is not available" in e.value for e in at.error)


def test_concurrent_calls_do_not_leak_interventions(lm260k):
    """Two threads sharing one model (two app sessions): an ablation's hook must never touch
    the other thread's clean pass."""
    from concurrent.futures import ThreadPoolExecutor

    want_clean = plain_logits(lm260k, lm260k.encode(TEXT)).numpy()
    want_abl = {n: ablate(lm260k, TEXT, "neuron", 1, n, "zero").ablated_logits for n in range(4)}

    def job(i):
        n = i % 4
        if i % 3 == 0:
            a = analyse(lm260k, TEXT)
            return ("analyse", n, a.top_probs[:, 0].copy())
        r = ablate(lm260k, TEXT, "neuron", 1, n, "zero")
        return ("ablate", n, r)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(job, range(24)))
    top1 = torch.softmax(torch.from_numpy(want_clean).double(), -1).max(-1).values.numpy()
    for what, n, r in results:
        if what == "analyse":
            np.testing.assert_allclose(r, top1, rtol=1e-4)
        else:
            np.testing.assert_allclose(r.clean_logits, want_clean, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(r.ablated_logits, want_abl[n], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def rules_db(tmp_path_factory, stories260k_path, valid_corpus, train1097_corpus):
    """stories260K with a neuron run and a rules run (n-gram index of train-1097.txt), via the CLI."""
    from precompute.cli import main

    url = f"sqlite:///{tmp_path_factory.mktemp('rules') / 'lab.db'}"
    rc = main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url,
               "--max-tokens", "1500", "--ctx-len", "128", "--jobs", "neurons,rules",
               "--ngram-corpus", str(train1097_corpus)])
    assert rc == 0
    return url


def test_lab_shows_the_optimal_ngram_rule(rules_db, monkeypatch, lm260k, train1097_corpus):
    import app.state as state
    from streamlit.testing.v1 import AppTest

    from precompute.jobs.rules import match_prompt
    from precompute.ngrams.index import NgramIndex

    monkeypatch.setattr(state, "DB_URL", rules_db)
    text = "Once upon a time there was a little dog"
    at = AppTest.from_file(LAB, default_timeout=180)
    at.query_params.update({"model": "stories260K", "prompt": text, "pos": "3"})
    at.run()
    assert not at.exception and not at.error
    want = next(m for m in match_prompt(lm260k, NgramIndex.for_corpus(lm260k, str(train1097_corpus)), text) if m.pos == 4)
    md = _md(at)
    assert f"template `{want.optimal.template}`" in md and f"**{want.optimal.distance:.3f}**" in md
    assert f"support {want.support}" in md
    assert "No n-gram index" not in "\n".join(c.value for c in at.caption)


def test_lab_without_a_database(monkeypatch, tmp_path):
    """No database: the bundled model when it exists, else a note saying how to get a model."""
    import app.state as state
    from streamlit.testing.v1 import AppTest

    from precompute.models import DEFAULT_MODEL

    monkeypatch.setattr(state, "DB_URL", f"sqlite:///{tmp_path / 'absent.db'}")
    at = AppTest.from_file(LAB, default_timeout=120)
    at.query_params["prompt"] = "once upon a time"
    at.run()
    assert not at.exception
    if (Path(DEFAULT_MODEL) / "config.json").exists():
        assert "Most active neurons" in _md(at)
    else:
        assert any("No model to run yet" in i.value for i in at.info)
