"""N-gram rules: templates, index, matcher, job, store and CLI.

Hand-built corpora where the answer is known, and the straightforward dict-of-Counters matcher in
bench/ngram_reference.py as the independent computation on stories260K."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.ngram_reference import ReferenceIndex, match_position
from precompute.ngrams.index import NgramIndex
from precompute.ngrams.matcher import Matcher, contexts_of
from precompute.ngrams.templates import canonical, pattern, query, render_rule, rule_set

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# templates


def test_rule_set_sizes_and_order():
    assert rule_set("suffix") == ("+", "++", "+++", "++++", "+++++", "++++++", "+++++++")
    sub = rule_set("subgram")
    assert len(sub) == 127 and len(set(sub)) == 127 and all(set(t) <= {"+", "-"} and t[0] == "+" for t in sub)
    allr = rule_set("all")
    assert len(allr) == 609
    assert set(sub) <= set(allr)
    assert [len(t) for t in allr] == sorted(len(t) for t in allr)
    with pytest.raises(ValueError):
        rule_set("bogus")


def test_all_dedup_is_exactly_query_equivalence():
    """Brute force: two templates are the same rule iff they give the same query on a context of
    distinct tokens; R_all keeps one template per class."""
    ctx = list(range(100, 107))
    strings = ["+" + "".join(r) for n in range(1, 8) for r in itertools.product("+-*", repeat=n - 1)]
    assert len(strings) == 1093
    classes: dict[tuple, set] = {}
    for t in strings:
        classes.setdefault(query(t, ctx), set()).add(t)
    assert len(classes) == 609
    allr = set(rule_set("all"))
    for q, members in classes.items():
        assert len(members & allr) == 1
        assert {canonical(t) for t in members} == members & allr
    assert canonical("+*-+") == canonical("+-*+") == "+-*+"
    assert canonical("+*-*") == "+-**"


def test_pattern_query_render():
    p = pattern("+-*+")
    assert p.offsets == (3, 1) and p.ctx_pos == (4, 1)
    assert query("+-*+", ["there", "was", "a", "big"]) == ("there", None, "big")
    assert render_rule("+*+", [" there", " was", " a"]) == "there * a ->"
    txt = render_rule("+-+", [" there", " was", " a"])
    assert txt.startswith("there ") and "w\u0336a\u0336s\u0336" in txt
    assert "<del>was</del>" in render_rule("+-+", ["there", "was", "a"], html_out=True)
    with pytest.raises(ValueError):
        pattern("-+")


# ---------------------------------------------------------------------------------------------
# hand-built corpora

LION, TIGER, BEAR = 20, 21, 22
V = 32
CTX7 = [1, 2, 3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def animals():
    """The paper's example: the 7-token context is always followed by "bear"; its 3-token suffix
    (5 6 7) by lion, tiger and bear once each."""
    stories = [
        CTX7 + [BEAR],
        [9, 9, 9, 9, 5, 6, 7, LION],
        [10, 11, 12, 13, 5, 6, 7, TIGER, 8],
        [14, 15],
    ]
    return stories, NgramIndex.from_stories(stories, V)


def onehot(t, eps=0.0):
    p = np.full(V, eps)
    p[t] = 1.0
    return p / p.sum()


def test_animals_rule_predictions(animals):
    _, idx = animals
    assert idx.counts("+++++++", CTX7) == {BEAR: 1}
    assert idx.counts("++++", CTX7) == {BEAR: 1}
    assert idx.counts("+++", CTX7) == {LION: 1, TIGER: 1, BEAR: 1}
    assert idx.counts("+", CTX7) == {LION: 1, TIGER: 1, BEAR: 1}
    assert idx.counts("+-", CTX7) == {7: 3}  # token 6 is always followed by 7
    assert idx.counts("+*+", CTX7) == {LION: 1, TIGER: 1, BEAR: 1}  # (5, *, 7)
    assert idx.counts("+**", CTX7) == {LION: 1, TIGER: 1, BEAR: 1}  # (5, *, *)
    assert idx.counts("+******", CTX7) == {BEAR: 1}  # (1, *, *, *, *, *, *)
    assert idx.counts("+-+", [5, 99, 7]) == {}  # (5, 7) never adjacent


def _match(idx, templates, p, ctx, distance="variational", target=None):
    ctx_arr = np.full((1, 7), -1)
    ctx_arr[0, 7 - len(ctx):] = ctx
    tg = None if target is None else np.array([target])
    return Matcher(idx, templates, distance).match(np.array([p]), ctx_arr, np.array([len(ctx)]), tg)


def test_animals_optimal_rule(animals):
    _, idx = animals
    sub = rule_set("subgram")
    # model sure of "bear": the shortest rule that is sure of it too is the 4-gram
    m = _match(idx, sub, onehot(BEAR), CTX7, target=BEAR)
    assert sub[m.rule[0]] == "++++" and m.dist[0] == pytest.approx(0.0, abs=1e-12)
    assert m.support[0] == 1 and m.agree[0] == 1.0 and m.model_correct[0]
    assert m.backoff_n[0] == 7 and m.backoff_agree[0] == 1.0
    # best of each length: lengths 1-3 can only say lion/tiger/bear uniformly (distance 2/3)
    np.testing.assert_allclose(m.best_dist[0], [2 / 3, 2 / 3, 2 / 3, 0, 0, 0, 0], atol=1e-12)
    assert [sub[r] for r in m.best_rule[0][:4]] == ["+", "++", "+++", "++++"]
    np.testing.assert_allclose(m.agree_upto[0], [1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1])
    assert list(m.rule_top_ids[0][:2]) == [BEAR, -1]
    # model uniform over the three animals: the unigram rule fits exactly; the argmax is shared 3 ways
    p = np.zeros(V)
    p[[LION, TIGER, BEAR]] = 1 / 3
    m = _match(idx, sub, p, CTX7)
    assert sub[m.rule[0]] == "+" and m.dist[0] == pytest.approx(0.0, abs=1e-12)
    assert m.agree[0] == pytest.approx(1 / 3) and m.support[0] == 3
    assert sorted(m.rule_top_ids[0][:3]) == [LION, TIGER, BEAR]
    np.testing.assert_allclose(m.rule_top_q[0][:3], [1 / 3] * 3, rtol=1e-6)
    # R_all has the same answers here; L-infinity too
    m = _match(idx, rule_set("all"), onehot(BEAR), CTX7, distance="linf")
    assert rule_set("all")[m.rule[0]] == "++++" and m.dist[0] == pytest.approx(0.0, abs=1e-12)
    assert m.best_dist[0][0] == pytest.approx(2 / 3)  # max |p - q| = |1 - 1/3|


def test_distance_edge_cases(animals):
    _, idx = animals
    sub = rule_set("subgram")
    # disjoint supports: the model only predicts token 30, which never follows anything: distance 1
    m = _match(idx, sub, onehot(30), CTX7)
    assert m.dist[0] == pytest.approx(1.0) and np.allclose(m.best_dist[0], 1.0)
    assert sub[m.rule[0]] == "+" and m.agree[0] == 0.0  # ties go to the first rule
    m = _match(idx, sub, onehot(30), CTX7, distance="linf")
    assert m.dist[0] == pytest.approx(1.0)
    # L-infinity against a uniform rule: max(|p_lion - 1/3|, p outside the support)
    p = np.zeros(V)
    p[LION], p[30] = 0.5, 0.5
    m = _match(idx, ["+"], p, [7], distance="linf")
    assert m.dist[0] == pytest.approx(0.5)
    m = _match(idx, ["+"], p, [7], distance="variational")
    assert m.dist[0] == pytest.approx(0.5 * (abs(0.5 - 1 / 3) + 1 / 3 + 1 / 3 + 0.5))


def test_undefined_rules(animals):
    _, idx = animals
    sub = rule_set("subgram")
    # nothing in the context was ever seen: no rule at all
    m = _match(idx, sub, onehot(BEAR), [25, 26, 27])
    assert m.rule[0] == -1 and np.isnan(m.dist[0]) and m.support[0] == 0 and m.agree[0] == 0.0
    assert np.isnan(m.best_dist[0]).all() and m.backoff_n[0] == 0
    # only the last token is known: the rules that keep an unknown token are undefined
    m = _match(idx, sub, onehot(LION), [25, 26, 7])
    assert sub[m.rule[0]] == "+" and m.support[0] == 3
    assert not np.isnan(m.best_dist[0][0]) and np.isnan(m.best_dist[0][1:]).all()
    assert list(m.best_rule[0][1:]) == [-1] * 6
    assert m.backoff_n[0] == 1


def test_story_start_never_crossed():
    idx = NgramIndex.from_stories([[1, 2, 3], [4, 5, 6]], 8)
    assert idx.counts("+", [3]) == {}  # 3 ends a story: 4 starts the next one
    assert idx.counts("++", [3, 4]) == {}
    assert idx.counts("++", [4, 5]) == {6: 1}
    assert idx.counts("+*", [4, 0]) == {6: 1}
    assert idx.counts("+**", [3, 0, 0]) == {}
    ref = ReferenceIndex([[1, 2, 3], [4, 5, 6]], rule_set("all"))
    assert dict(ref.counts("++", [3, 4])) == {}
    # contexts of a sequence never include BOS (0 here) nor anything before it
    ctx, clen = contexts_of(np.array([0, 1, 2, 0, 3, 4]), bos_id=0, first=1)
    assert list(clen) == [0, 0, 1, 2, 0, 1]  # (predicting the BOS at 3 from 1 2 is fine)
    assert list(ctx[5]) == [-1] * 6 + [3]
    ctx, clen = contexts_of(np.arange(1, 12), bos_id=None)
    assert clen[10] == 7 and list(ctx[10]) == [4, 5, 6, 7, 8, 9, 10]


# ---------------------------------------------------------------------------------------------
# stories260K against the reference matcher


@pytest.fixture(scope="module")
def slice_path(train1097_corpus, tmp_path_factory):
    """The first ~200 stories of train-1097.txt (about 20k tokens)."""
    from precompute.corpus import read_text_corpus

    stories = read_text_corpus(train1097_corpus).stories[:200]
    p = tmp_path_factory.mktemp("ngram") / "train-slice.txt"
    p.write_text("\n".join(s.replace("\n\n", " ").replace("\n", " ") for s in stories) + "\n")
    return p


@pytest.fixture(scope="module")
def slice_tokens(lm260k, slice_path):
    from precompute.corpus import read_text_corpus

    stories = read_text_corpus(slice_path, "newline").stories
    return [list(x) for x in lm260k.tokenizer(list(stories), add_special_tokens=False)["input_ids"]]


def test_index_counts_equal_reference(lm260k, slice_tokens, tmp_path):
    templates = rule_set("all")
    idx = NgramIndex.from_stories(slice_tokens, lm260k.vocab_size, cache_dir=tmp_path)
    ref = ReferenceIndex(slice_tokens, [t for t in templates if len(t) <= 5] + ["+++++++", "+*-*+-+", "+******"])
    flat = np.concatenate([np.asarray(s) for s in slice_tokens])
    rng = np.random.default_rng(0)
    n_nonempty = 0
    for _ in range(400):
        t = templates[rng.integers(len(templates))]
        if len(t) > 5:
            t = ["+++++++", "+*-*+-+", "+******"][rng.integers(3)]
        i = int(rng.integers(8, len(flat)))
        ctx = [int(x) for x in flat[i - 7 : i]]
        if rng.random() < 0.2:
            ctx[int(rng.integers(7))] = int(rng.integers(lm260k.vocab_size))
        got = idx.counts(t, ctx)
        assert got == dict(ref.counts(t, ctx)), (t, ctx)
        n_nonempty += bool(got)
    assert n_nonempty > 100
    # a cached reload gives the same tables
    again = NgramIndex(idx.tokens, idx.depth, idx.vocab_size, cache_dir=tmp_path)
    assert again.counts("+++", ctx) == idx.counts("+++", ctx)


def _probs(lm, ids) -> np.ndarray:
    """Plain torch: softmax of the HF model's logits, renormalised in float64."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0]
    p = torch.softmax(logits.float(), -1).double().numpy()
    return p / p.sum(1, keepdims=True)


def _compare(res_rules, res_dist, res_support, res_agree, res_best, ref, templates, p, context):
    r, d, sup, ag, per_len = match_position(ref, templates, p, context)
    assert r == res_rules
    if r < 0:
        assert np.isnan(res_dist)
        return 0
    assert res_dist == pytest.approx(d, abs=1e-9)
    assert res_support == sup and res_agree == pytest.approx(ag)
    np.testing.assert_allclose(res_best, per_len, atol=1e-9)
    return 1


def test_job_matches_reference_per_token(lm260k, seqs260k, slice_path, slice_tokens, tmp_path):
    from precompute.jobs.rules import RulesConfig, run
    from precompute.sequences import Sequences

    seqs = Sequences(seqs260k.corpus_name, False, seqs260k.prepend_bos, seqs260k.bos_id, seqs260k.ids[:4],
                     seqs260k.story_ids[:4], seqs260k.offsets[:4])
    cfg = RulesConfig(ngram_corpus=str(slice_path), rule_set="subgram", cache_dir=str(tmp_path), batch_size=1, chunk=128)  # unpadded: the same p as _probs
    res = run(lm260k, seqs, cfg)
    templates = rule_set("subgram")
    ref = ReferenceIndex(slice_tokens, templates)
    n = 0
    assert len(res.pos) == sum(len(s) - 1 for s in seqs.ids)
    for k, ids in enumerate(seqs.ids):
        assert ids[0] == lm260k.bos_id
        P = _probs(lm260k, ids)
        rows = np.nonzero(res.seq == k)[0]
        assert list(res.pos[rows]) == list(range(1, len(ids)))
        for i in rows:
            t = int(res.pos[i])
            assert res.target[i] == ids[t]
            context = [int(x) for x in ids[max(1, t - 7) : t]]  # never the BOS at 0
            assert res.ctx_len[i] == len(context)
            m = res.matches
            n += _compare(m.rule[i], m.dist[i], m.support[i], m.agree[i], m.best_dist[i], ref, templates, P[t - 1], context)
            assert m.model_correct[i] == (int(np.argmax(P[t - 1])) == ids[t])
    assert n > 150
    a = res.aggregates
    d = res.matches.rule >= 0
    assert a["agreement"] == pytest.approx(res.matches.agree[d].mean())
    assert a["agreement_vs_n"][-1] == pytest.approx(a["agreement"])
    assert sum(x["count"] for x in a["by_rule"]) == a["n_defined"] == int(d.sum())


def test_r_all_matches_reference(lm260k, slice_tokens):
    templates = rule_set("all")
    small = slice_tokens[:60]
    idx = NgramIndex.from_stories(small, lm260k.vocab_size)
    ref = ReferenceIndex(small, templates)
    ids = np.asarray(lm260k.encode("Once upon a time, there was a little girl named Lily. She loved to play outside."))
    P = _probs(lm260k, ids)
    ctx, clen = contexts_of(ids, lm260k.bos_id, first=1)
    t = np.arange(1, len(ids))
    for distance in ("variational", "linf"):
        m = Matcher(idx, templates, distance).match(P[t - 1], ctx[t], clen[t], ids[t])
        for j, tt in enumerate(t):
            context = [int(x) for x in ids[max(1, tt - 7) : tt]]
            r, d, sup, ag, per_len = match_position(ref, templates, P[tt - 1], context, distance)
            assert r == m.rule[j]
            if r >= 0:
                assert m.dist[j] == pytest.approx(d, abs=1e-9) and m.support[j] == sup and m.agree[j] == pytest.approx(ag)
                np.testing.assert_allclose(m.best_dist[j], per_len, atol=1e-9)


def test_match_prompt(lm260k, slice_tokens):
    from precompute.jobs.rules import match_prompt

    idx = NgramIndex.from_stories(slice_tokens, lm260k.vocab_size)
    text = "Once upon a time, there was a little dog."
    out = match_prompt(lm260k, idx, text, "subgram")
    ids = lm260k.encode(text)
    assert [m.pos for m in out] == list(range(1, len(ids)))
    assert [m.token_id for m in out] == ids[1:]
    assert out[0].context == () and out[0].optimal is None  # predicting the first token: only BOS before
    last = out[-1]
    assert len(last.context_ids) == 7 and last.context_ids == tuple(ids[-8:-1])
    assert last.optimal is not None and last.support > 0
    assert last.best_by_length[len(last.optimal.template) - 1].distance == pytest.approx(last.optimal.distance)
    assert abs(sum(q for _, _, q in last.rule_top) - 1) < 1e-5 or len(last.rule_top) == 10
    with pytest.raises(ValueError):
        match_prompt(lm260k, idx, "  ", "subgram")


# ---------------------------------------------------------------------------------------------
# store and CLI


def test_store_and_cli(lm260k, seqs260k, slice_path, tmp_path):
    from precompute.jobs import JOBS
    from precompute.jobs.rules import RulesConfig, run
    from precompute.sequences import Sequences
    from precompute.store.db import open_store, now, write_run
    from precompute.jobs.rules.tables import rules_overview, rules_story

    seqs = Sequences(seqs260k.corpus_name, False, seqs260k.prepend_bos, seqs260k.bos_id, seqs260k.ids[:3],
                     seqs260k.story_ids[:3], seqs260k.offsets[:3])
    spec = JOBS["rules"]()
    cfg = RulesConfig(ngram_corpus=str(slice_path), rule_set="all", cache_dir=str(tmp_path / "c"))
    res = run(lm260k, seqs, cfg)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = open_store(url)
    with store.session.begin() as s:
        run = write_run(s, lm260k, "rules", seqs, cfg.params(), now(), spec.summary(res))
        spec.write(s, run.id, res)
    with store.session() as s:
        ov = rules_overview(s, "stories260K")
        assert ov.n_rules == 609 and ov.agreement == pytest.approx(res.aggregates["agreement"])
        assert ov.n_predictions == len(res.pos) and len(ov.sequences) == 3
        st = rules_story(s, "stories260K", 1)
        assert [t.id for t in st.tokens] == list(seqs.ids[1]) and st.tokens[0].special
        rows = np.nonzero(res.seq == 1)[0]
        assert [m.pos for m in st.matches] == list(res.pos[rows])
        for m, i in zip(st.matches, rows):
            if res.matches.rule[i] >= 0:
                assert m.optimal.template == res.templates[res.matches.rule[i]]
                assert m.optimal.distance == pytest.approx(res.matches.dist[i], abs=1e-6)
                assert m.support == res.matches.support[i]
                assert m.model_top[0][0] == res.matches.model_argmax[i]
            else:
                assert m.optimal is None
    store.engine.dispose()
    env_cmd = [sys.executable, "-m", "precompute.cli"]
    out = subprocess.run(env_cmd + ["show", "rules", "--model", "stories260K", "--db", url, "--json", "--story", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["seq_idx"] == 0 and len(data["matches"]) == len(seqs.ids[0]) - 1
    out = subprocess.run(env_cmd + ["show", "rules", "--model", "stories260K", "--db", url, "--json", "--story", "99"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "out of range" in out.stderr and "Traceback" not in out.stderr


def test_config_errors(tmp_path):
    from precompute.jobs.rules import RulesConfig

    with pytest.raises(ValueError, match="--ngram-corpus"):
        RulesConfig()
    with pytest.raises(ValueError, match="not found"):
        RulesConfig(ngram_corpus=str(tmp_path / "nope.txt"))
    f = tmp_path / "c.txt"
    f.write_text("a story\n")
    with pytest.raises(ValueError, match="rule set"):
        RulesConfig(ngram_corpus=str(f), rule_set="bogus")
    with pytest.raises(ValueError, match="distance"):
        RulesConfig(ngram_corpus=str(f), distance="l2")
