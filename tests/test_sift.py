"""Issue 7: embeddings job, vector index, SIFT vs nearest neighbours, diverse examples, sandbox.

Values are checked against independent computations: a hand-built set where the answer is
known, plain numpy matrix inverses, and HF ``output_hidden_states``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.retrieval.index import VectorIndex
from precompute.retrieval.sift import select, sift_candidates, variance_path
from precompute.retrieval.support import diverse_order


def _unit(*xs):
    v = np.array(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def _inv_variance(q, picked, lam):
    """sigma^2(x*) = k(x*,x*) - k^T (K + lam I)^-1 k with a plain matrix inverse."""
    P = np.asarray(picked, dtype=np.float64)
    K = P @ P.T
    k = P @ q
    return float(q @ q - k @ np.linalg.inv(K + lam * np.eye(len(P))) @ k)


# ---------------------------------------------------------------------------------------------
# hand-built: two near-duplicates of fact A, one example of fact B, a prompt touching both


@pytest.fixture()
def facts():
    a1 = _unit(1.0, 0.0, 0.0)
    a2 = _unit(0.999, 0.045, 0.0)  # near-duplicate of a1
    b = _unit(0.0, 1.0, 0.0)  # the other fact
    noise = _unit(0.0, 0.0, 1.0)  # unrelated
    q = _unit(1.0, 0.8, 0.0)  # about both facts, closer to A
    return np.stack([a1, a2, b, noise]).astype(np.float32), q


def test_nn_picks_duplicates_sift_picks_both_facts(facts):
    vecs, q = facts
    idx = VectorIndex(vecs, backend="numpy")
    nn = select(idx, q, 2, "nn", lam=0.1)
    sift = select(idx, q, 2, "sift", lam=0.1)
    assert sorted(nn.rows) == [0, 1]  # the two near-duplicates
    assert sorted(sift.rows) == [1, 2]  # one of each fact
    assert sift.rows[0] == nn.rows[0]  # SIFT's first pick is the nearest neighbour
    assert sift.picks[-1].variance < nn.picks[-1].variance
    # relevance and redundancy of each pick
    assert sift.picks[0].redundancy == 0.0
    assert sift.picks[1].relevance == pytest.approx(float(vecs[2] @ q), abs=1e-6)
    assert sift.picks[1].redundancy == pytest.approx(float(vecs[1] @ vecs[2]), abs=1e-6)
    assert nn.picks[1].redundancy == pytest.approx(float(vecs[0] @ vecs[1]), abs=1e-6)


def test_variance_matches_matrix_inverse_and_greedy_is_argmin():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(60, 8))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = _unit(*rng.normal(size=8))
    lam = 0.05
    sel = select(VectorIndex(vecs.astype(np.float32)), q, 12, "sift", lam=lam, m=60)
    V = vecs.astype(np.float32).astype(np.float64)  # what the index holds
    chosen = []
    for p in sel.picks:
        # every candidate's variance if added now, by plain inverse; the pick is the argmin
        options = [_inv_variance(q, V[chosen + [c]], lam) for c in range(len(V))]
        assert options[p.row] == pytest.approx(min(options), abs=1e-9)
        chosen.append(p.row)
        assert p.variance == pytest.approx(_inv_variance(q, V[chosen], lam), abs=1e-9)
        assert p.repeat == (p.row in chosen[:-1])
    # nearest-neighbour variances too, and the independent path function
    nn = select(VectorIndex(vecs.astype(np.float32)), q, 5, "nn", lam=lam)
    for i, p in enumerate(nn.picks):
        assert p.variance == pytest.approx(_inv_variance(q, V[nn.rows[: i + 1]], lam), abs=1e-9)
    assert variance_path(q, V[sel.rows], lam) == pytest.approx(sel.variances, abs=1e-12)
    # variance never increases, starts at or below the prior 1
    assert all(b <= a + 1e-12 for a, b in zip([1.0] + sel.variances, sel.variances))


def test_repeats_allowed_when_lambda_is_large():
    vecs = np.stack([_unit(1, 0.1, 0), _unit(0, 1, 0), _unit(0, 0, 1)])
    sel = sift_candidates(_unit(1, 0.05, 0), vecs, 3, lam=5.0)
    assert sel.rows[:2] == [0, 0] and sel.picks[1].repeat and sel.picks[1].redundancy == pytest.approx(1.0)
    no_rep = sift_candidates(_unit(1, 0.05, 0), vecs, 5, lam=5.0, allow_repeats=False)
    assert sorted(no_rep.rows) == [0, 1, 2]


def test_index_search_exact():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    sims, rows = VectorIndex(vecs, backend="numpy").search(q, 7)
    full = q @ vecs.T
    for i in range(3):
        assert list(rows[i]) == list(np.argsort(-full[i], kind="stable")[:7])
        assert np.allclose(sims[i], full[i, rows[i]])
    s1, r1 = VectorIndex(vecs).search(q[0], 1000)  # k beyond the corpus is cut
    assert len(r1) == 300 and s1.ndim == 1


def test_bad_input_is_one_line():
    idx = VectorIndex(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="method"):
        select(idx, np.ones(3), 2, "bogus")
    with pytest.raises(ValueError, match="lambda"):
        select(idx, np.ones(3), 2, "sift", lam=0)
    with pytest.raises(ValueError, match="dimension"):
        idx.search(np.ones(4), 2)
    with pytest.raises(ValueError, match="faiss|backend"):
        VectorIndex(np.eye(3), backend="annoy")


def test_diverse_order_prefers_other_meaning():
    # three near-identical strong examples and one weaker, different one
    v = np.stack([_unit(1, 0, 0), _unit(1, 0.02, 0), _unit(1, 0, 0.02), _unit(0.2, 1, 0)])
    acts = np.array([5.0, 4.9, 4.8, 3.0])
    sel = diverse_order(v, acts, 2, lam=0.1)
    assert 3 in sel.rows and len(set(sel.rows)) == 2
    assert sorted(diverse_order(v, acts, lam=0.1).rows) == [0, 1, 2, 3]  # a permutation when n is None


# ---------------------------------------------------------------------------------------------
# embeddings job on stories260K


@pytest.fixture(scope="module")
def emb260k(lm260k, seqs260k):
    from precompute.jobs.embeddings import EmbeddingsConfig, run

    return run(lm260k, seqs260k, EmbeddingsConfig(window=32, min_tokens=8))


def test_windows_cover_every_scored_token_once(emb260k, seqs260k):
    w = emb260k.windows
    for k, ids in enumerate(seqs260k.ids):
        spans = sorted((int(a), int(b)) for s, a, b in w if s == k)
        covered = [p for a, b in spans for p in range(a, b)]
        assert covered == list(range(1, len(ids)))  # BOS (position 0) never pooled
        assert all(b - a <= 32 + 8 for a, b in spans)


def test_embeddings_match_output_hidden_states(emb260k, lm260k, seqs260k):
    """Independent: HF hidden_states[-1] (after the final norm), mean over the window, centre, normalise."""
    w = emb260k.windows
    raw = np.zeros((len(w), lm260k.d_model))
    with torch.no_grad():
        for k, ids in enumerate(seqs260k.ids):
            hs = lm260k.model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))[None], output_hidden_states=True).hidden_states[-1][0]
            for r in np.nonzero(w["seq"] == k)[0]:
                raw[r] = hs[w["start"][r] : w["end"][r]].double().mean(0).numpy()
    centre = raw.mean(0)
    assert np.allclose(emb260k.centre, centre, atol=1e-4)
    want = (raw - centre) / np.linalg.norm(raw - centre, axis=1, keepdims=True)
    assert emb260k.vectors.dtype == np.float16
    assert np.abs(emb260k.vectors.astype(np.float64) - want).max() < 2e-3
    # a prompt embedded through the same path equals its window embedding when the tokens match
    from precompute.jobs.embeddings import embed_ids

    k = int(w["seq"][0])
    ids = seqs260k.ids[k][: int(w["end"][0])]
    q = embed_ids(lm260k, ids, centre=emb260k.centre)[0]
    assert np.abs(q - want[0]).max() < 1e-4


def test_store_roundtrip_and_window_tokens(tmp_path, capsys, lm260k, seqs260k, emb260k):
    from precompute.jobs import JOBS
    from precompute.models import model_name
    from precompute.store.db import now, open_store, write_run
    from precompute.jobs.embeddings.tables import embedding_centre, load_embeddings, window_views

    store = open_store(f"sqlite:///{tmp_path / 'e.db'}")
    spec = JOBS["embeddings"]()
    with store.session.begin() as s:
        run = write_run(s, lm260k, "embeddings", seqs260k, emb260k.config.params(), now(), spec.summary(emb260k))
        spec.write(s, run.id, emb260k)
    name = model_name(lm260k.model_id)
    with store.session() as s:
        e = load_embeddings(s, name)
        assert np.array_equal(e.vectors, emb260k.vectors) and np.array_equal(e.windows, emb260k.windows)
        assert np.array_equal(embedding_centre(s, name), emb260k.centre)
        views = window_views(s, name, e.run.id, e.windows, [0, 5, len(e.windows) - 1])
        for v in views:
            assert list(v.token_ids) == [int(t) for t in seqs260k.ids[v.seq_idx][v.start : v.end]]
            assert [t.text for t in v.tokens] == lm260k.token_strs(v.token_ids)
    store.engine.dispose()
    # `precompute show retrieval` prints the same picks as a direct selection
    import json

    from precompute.cli import main
    from precompute.jobs.embeddings import embed_text

    rc = main(["show", "retrieval", "--model", name, "--prompt", "The dog ran", "--n", "3", "--db", str(store.url)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    q = embed_text(lm260k, "The dog ran", emb260k.centre)
    for meth in ("nn", "sift"):
        want = select(VectorIndex(emb260k.vectors), q, 3, meth).rows
        assert [p["row"] for p in out["selections"][meth]["picks"]] == want
    assert main(["show", "retrieval", "--model", "nope", "--prompt", "x", "--db", str(store.url)]) == 2


# ---------------------------------------------------------------------------------------------
# sandbox


def _sift_examples(lm, seqs, emb, prompt, n=4):
    from precompute.jobs.embeddings import embed_text

    sel = select(VectorIndex(emb.vectors), embed_text(lm, prompt, emb.centre), n, "sift")
    w = emb.windows
    return [[int(t) for t in seqs.ids[w["seq"][r]][w["start"][r] : w["end"][r]]] for r in sel.rows]


def test_sandbox_leaves_model_unchanged(lm260k, seqs260k, emb260k):
    from precompute.ttt import SandboxConfig, run_sandbox

    before = {k: v.detach().clone() for k, v in lm260k.model.state_dict().items()}
    ex = _sift_examples(lm260k, seqs260k, emb260k, "The little girl went to the park")
    res = run_sandbox(lm260k, "The little girl went to the park", " to play.", ex, SandboxConfig(steps=3, lr=1e-2))
    assert res.loss_after != res.loss_before  # the copy did change
    after = lm260k.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not any(p.requires_grad for p in lm260k.model.parameters())
    assert not lm260k.model.training


@pytest.mark.parametrize("which", ["stories260k", "bundled"])
def test_finetune_lowers_loss_on_selected_data(which, request, seqs260k, emb260k):
    from precompute.ttt import SandboxConfig, run_sandbox

    if which == "stories260k":
        lm, seqs, emb = request.getfixturevalue("lm260k"), seqs260k, emb260k
    else:
        from precompute.corpus import read_text_corpus
        from precompute.jobs.embeddings import EmbeddingsConfig, run
        from precompute.sequences import tokenize

        lm = request.getfixturevalue("bundled_lm")
        seqs = tokenize(lm, read_text_corpus(request.getfixturevalue("valid_corpus"), max_stories=300),
                        ctx_len=128, max_tokens=3000)
        emb = run(lm, seqs, EmbeddingsConfig(window=32, min_tokens=8))
    prompt = "One day, a boy found a ball"
    ex = _sift_examples(lm, seqs, emb, prompt, n=4)
    res = run_sandbox(lm, prompt, " in the garden.", ex, SandboxConfig(steps=10, lr=1e-3))
    assert len(res.train_losses) == 11
    assert res.train_losses[-1] < 0.9 * res.train_losses[0]
    # the example loss is recomputed independently on the same batch by the first value
    from precompute.ttt import _lm_loss, _training_batch

    ids, labels = _training_batch(lm, ex)
    with torch.no_grad():
        assert float(_lm_loss(lm.model, ids, labels)) == pytest.approx(res.train_losses[0], rel=1e-4)


def test_in_context_mode_matches_concatenated_prompt(lm260k, seqs260k, emb260k):
    from precompute.ttt import SandboxConfig, run_sandbox

    prompt, cont = "The cat sat on the mat", " and slept."
    ex = _sift_examples(lm260k, seqs260k, emb260k, prompt, n=2)
    res = run_sandbox(lm260k, prompt, cont, ex, SandboxConfig(mode="in_context"))
    p = lm260k.encode(prompt)
    c = lm260k.encode(cont, prepend_bos=False)
    ids = p[:1] + [t for e in ex for t in e] + p[1:] + c
    assert res.context_len == sum(len(e) for e in ex)
    with torch.no_grad():
        logp = torch.log_softmax(lm260k.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    n = len(c)
    want = -np.mean([float(logp[len(ids) - n - 1 + i, c[i]]) for i in range(n)])
    assert res.loss_after == pytest.approx(want, abs=1e-4)
    assert res.train_losses == () and res.steps == 0
    assert all(0 <= h.context_mass <= 1 + 1e-6 and h.change >= h.context_mass - 1e-6 for h in res.heads)


def test_sandbox_bad_input(lm260k):
    from precompute.ttt import SandboxConfig, run_sandbox

    with pytest.raises(ValueError, match="steps"):
        SandboxConfig(steps=-1)
    with pytest.raises(ValueError, match="learning rate"):
        SandboxConfig(lr=0)
    with pytest.raises(ValueError, match="examples"):
        run_sandbox(lm260k, "hello", "", [], SandboxConfig())


def test_diverse_examples_from_neuron_run(neurons_db, lm260k):
    from precompute.models import model_name
    from precompute.retrieval.support import diverse_examples
    from precompute.store.db import open_store

    store = open_store(neurons_db, create=False)
    with store.session() as s:
        d = diverse_examples(s, lm260k, model_name(lm260k.model_id), 1, 3)
    assert sorted((e.seq_idx, e.pos) for e in d.diverse) == sorted((e.seq_idx, e.pos) for e in d.plain)
    sim = np.array(d.similarity)
    assert np.allclose(np.diag(sim), 1.0, atol=1e-5)
    store.engine.dispose()


def test_sandbox_ngram_rules_match_match_prompt(lm260k, seqs260k):
    """The sandbox's per-token rules for the unchanged model equal the rules job's match_prompt."""
    from precompute.jobs.rules import match_prompt
    from precompute.ngrams.index import NgramIndex
    from precompute.ttt import SandboxConfig, ngram_rule_fn, run_sandbox

    index = NgramIndex.from_stories([s[1:] for s in seqs260k.ids], lm260k.vocab_size)
    prompt = "Once upon a time, there was a little girl"
    res = run_sandbox(lm260k, prompt, "", [], SandboxConfig(steps=0), ngram_rule_fn(index, top_k=10))
    want = match_prompt(lm260k, index, prompt)
    assert len(res.rules_before) == len(want) == len(lm260k.encode(prompt)) - 1
    for a, b, c in zip(res.rules_before, want, res.rules_after):
        assert a.pos == b.pos and a.token_id == b.token_id
        assert (a.optimal is None) == (b.optimal is None)
        if a.optimal is not None:
            assert a.optimal.template == b.optimal.template
            assert a.optimal.distance == pytest.approx(b.optimal.distance, abs=1e-5)
            assert c.optimal.template == a.optimal.template  # zero steps: nothing changed
