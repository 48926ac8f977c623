"""Heads job: a hand-built GPT-2 whose attention is known exactly, and stories260K checked against
an independent plain-torch/numpy computation (one unpadded sequence at a time, explicit loops)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from precompute.jobs.heads import HeadsConfig, head_pattern, induction_tokens, label_for, run
from precompute.sequences import Sequences

# ---------------------------------------------------------------------------------------------
# a hand-built one-layer GPT-2: positions one-hot in the first N_POS embedding dims, tokens add nothing.
# head 0 attends to d = 1 only, head 1 to d = SHIFT only, head 2 uniformly over keys 0..q.

N_POS = 32
N_HEAD = 3
D_HEAD = 32
SHIFT = 7  # head 1's distance; with induction_len = SHIFT + 1 it is a perfect "induction" head
BOS = 0


def _hand_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from precompute.models import ADAPTERS, LoadedModel

    d = N_HEAD * D_HEAD
    cfg = GPT2Config(vocab_size=50, n_positions=N_POS, n_embd=d, n_layer=1, n_head=N_HEAD, bos_token_id=BOS, eos_token_id=BOS)
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        wpe = torch.zeros(N_POS, d)
        wpe[torch.arange(N_POS), torch.arange(N_POS)] = 1.0  # position p -> e_p
        model.transformer.wpe.weight.copy_(wpe)
        blk = model.transformer.h[0]
        blk.ln_1.weight.fill_(1.0)
        blk.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        W = torch.zeros(d, 3 * d)  # Conv1D: x @ W, columns [q | k | v], each split into heads
        C = 4.0
        for h, shift in enumerate([1, SHIFT, None]):
            qcols = slice(h * D_HEAD, h * D_HEAD + N_POS)
            kcols = slice(d + h * D_HEAD, d + h * D_HEAD + N_POS)
            W[:N_POS, kcols] = torch.eye(N_POS)  # key of position j: e_j
            if shift is not None:  # query of position p: C * e_{p - shift}
                W[shift:N_POS, qcols] = C * torch.eye(N_POS)[: N_POS - shift]
        blk.attn.c_attn.weight.copy_(W)
    model.eval()
    tok = SimpleNamespace(bos_token_id=BOS, eos_token_id=BOS, all_special_ids=[BOS])
    return LoadedModel(model_id="hand", model=model, tokenizer=tok, adapter=ADAPTERS["GPT2LMHeadModel"], architecture="GPT2LMHeadModel")


def _seqs(rows: list[list[int]], prepend_bos: bool = True) -> Sequences:
    return Sequences(
        corpus_name="hand", synthetic=False, prepend_bos=prepend_bos, bos_id=BOS,
        ids=tuple(np.asarray(r, np.int32) for r in rows), story_ids=tuple(range(len(rows))), offsets=(0,) * len(rows),
    )


@pytest.fixture(scope="module")
def hand():
    lm = _hand_model()
    rng = np.random.default_rng(0)
    rows = [[BOS] + list(rng.integers(1, 6, n - 1)) for n in (32, 20, 11, 25)]  # small vocab: many repeats
    seqs = _seqs(rows)
    res = run(lm, seqs, HeadsConfig(batch_size=3, induction_len=SHIFT + 1, induction_batch=4, n_examples=2, example_len=12))
    return lm, seqs, res


def test_hand_built_patterns_are_what_was_built(hand):
    lm, seqs, _ = hand
    pat = head_pattern(lm, list(seqs.ids[0]), 0, 0)
    q = np.arange(1, N_POS)
    assert pat[q, q - 1].min() > 0.999  # head 0: previous token
    pat1 = head_pattern(lm, list(seqs.ids[0]), 0, 1)
    q = np.arange(SHIFT, N_POS)
    assert pat1[q, q - SHIFT].min() > 0.999  # head 1: SHIFT back
    pat2 = head_pattern(lm, list(seqs.ids[0]), 0, 2)
    np.testing.assert_allclose(pat2, np.tril(np.ones((N_POS, N_POS))) / np.arange(1, N_POS + 1)[:, None], atol=1e-6)


def test_previous_token_head_is_a_distance_head(hand):
    _, _, res = hand
    L = res.layers[0]
    assert L.prev_token[0] > 0.999
    assert L.distance_r2[0] > 0.99 and L.labels[0] == "distance"
    assert abs(L.mean_distance[0] - 1.0) < 1e-3
    assert L.entropy[0] < 0.01
    assert L.profile[0, 1] > 0.999 and L.profile[0, 0] < 1e-3 and L.profile[0, 2:].max() < 1e-3
    assert L.induction[0] < 1e-3  # previous-token head: no weight 7 tokens back
    # head 1 attends exactly SHIFT back, which on [BOS] + r + r with |r| = SHIFT + 1 is the token after the copy
    assert L.induction[1] > 0.999
    assert L.labels[1] == "distance"


def test_uniform_head_matches_formulas(hand):
    """Head 2 attends uniformly over keys 0..q: every score has a closed form."""
    _, seqs, res = hand
    L = res.layers[0]
    qs = [q for s in seqs.ids for q in range(1, len(s))]  # scored queries (BOS query skipped)
    n_q = len(qs)
    assert res.n_queries == n_q
    assert L.prev_token[2] == pytest.approx(np.mean([1 / (q + 1) for q in qs]), abs=1e-6)
    assert L.first_token[2] == pytest.approx(np.mean([1 / (q + 1) for q in qs]), abs=1e-6)
    assert L.entropy[2] == pytest.approx(np.mean([math.log(q + 1) for q in qs]), abs=1e-5)
    assert L.mean_distance[2] == pytest.approx(np.mean([q / 2 for q in qs]), abs=1e-5)
    for d in (0, 1, 5, 19, 31):
        seen = [q for q in qs if q >= d]
        assert L.profile_counts[d] == len(seen)
        assert L.profile[2, d] == pytest.approx(np.mean([1 / (q + 1) for q in seen]), abs=1e-6)
    # duplicate-token: the share of earlier positions holding the same id
    dup = [
        sum(1 for k in range(q) if s[k] == s[q]) / (q + 1)
        for s in seqs.ids for q in range(1, len(s)) if any(s[k] == s[q] for k in range(q))
    ]
    assert res.n_dup_queries == len(dup)
    assert L.duplicate_token[2] == pytest.approx(np.mean(dup), abs=1e-6)
    # induction on [BOS] + r + r, |r| = 8: second-half positions q = 9..16, weight 1/(q+1)
    half = SHIFT + 1
    assert L.induction[2] == pytest.approx(np.mean([1 / (q + 1) for q in range(1 + half, 1 + 2 * half)]), abs=1e-6)
    # R^2 over pairs (q, k), k >= 1 (BOS key left out), predicted by the per-distance mean
    pairs = [(q - k, 1 / (q + 1)) for q in qs for k in range(1, q + 1)]
    dd = np.array([p[0] for p in pairs])
    w = np.array([p[1] for p in pairs])
    pred = np.array([w[dd == x].mean() for x in dd])
    r2 = 1 - ((w - pred) ** 2).sum() / ((w - w.mean()) ** 2).sum()
    assert L.distance_r2[2] == pytest.approx(r2, abs=1e-6)
    assert L.labels[2] == label_for(r2)


def test_profiles_sum_to_the_number_of_scored_queries(hand):
    _, _, res = hand
    for L in res.layers:
        for h in range(N_HEAD):
            assert (L.profile[h] * L.profile_counts).sum() == pytest.approx(res.n_queries, rel=1e-6)  # float32 rows sum to 1 +- 1e-7


def test_examples_are_the_first_tokens_of_the_first_sequences(hand):
    lm, seqs, res = hand
    ex = res.layers[0].examples[0]
    assert [e.seq_idx for e in ex] == [0, 1]
    for e in ex:
        ids = list(seqs.ids[e.seq_idx])
        full = head_pattern(lm, ids, 0, 0)
        n = min(12, len(ids))
        assert e.pattern.shape == (n, n) and e.pattern.dtype == np.float16
        np.testing.assert_allclose(e.pattern.astype(np.float32), full[:n, :n], atol=1e-3)


def test_induction_tokens_repeat_distinct_random_tokens(hand):
    lm, _, _ = hand
    ids = induction_tokens(lm, 8, 3, seed=0)
    assert ids.shape == (3, 17) and (ids[:, 0] == BOS).all()
    assert torch.equal(ids[:, 1:9], ids[:, 9:])
    for r in ids[:, 1:9]:
        assert len(set(r.tolist())) == 8 and BOS not in r.tolist()
    assert torch.equal(ids, induction_tokens(lm, 8, 3, seed=0))  # fixed seed


def test_config_is_checked():
    with pytest.raises(ValueError, match="batch_size"):
        HeadsConfig(batch_size=0)
    with pytest.raises(ValueError, match="induction_len"):
        HeadsConfig(induction_len=1)


# ---------------------------------------------------------------------------------------------
# stories260K against an independent computation


def _independent(lm, seqs, layer: int, skip_bos_key: bool):
    """All scores for one layer, one unpadded sequence at a time, with explicit loops."""
    H = lm.n_heads
    max_len = max(len(s) for s in seqs.ids)
    w_sum = np.zeros((H, max_len)); cnt = np.zeros(max_len)
    ent = np.zeros(H); first = np.zeros(H); dup = np.zeros(H); n_q = 0; n_dup = 0; md = np.zeros(H)
    pairs_d, pairs_w = [], []
    for s in seqs.ids:
        with torch.no_grad():
            A = lm.model(input_ids=torch.tensor([s.tolist()]), output_attentions=True).attentions[layer][0].double().numpy()
        for q in range(1, len(s)):
            n_q += 1
            row = A[:, q, : q + 1]
            for k in range(q + 1):
                w_sum[:, q - k] += row[:, k]
                cnt[q - k] += 1
                md += row[:, k] * (q - k)
                if k >= (1 if skip_bos_key else 0):
                    pairs_d.append(q - k)
                    pairs_w.append(row[:, k])
            ent += -(row * np.log(np.where(row > 0, row, 1))).sum(1)
            first += row[:, 0]
            copies = [k for k in range(q) if s[k] == s[q]]
            if copies:
                n_dup += 1
                dup += row[:, copies].sum(1)
    d = np.array(pairs_d); w = np.array(pairs_w)  # [pairs], [pairs, H]
    means = {x: w[d == x].mean(0) for x in np.unique(d)}
    pred = np.stack([means[x] for x in d])
    r2 = 1 - ((w - pred) ** 2).sum(0) / ((w - w.mean(0)) ** 2).sum(0)
    profile = w_sum / np.maximum(cnt, 1)
    return dict(profile=profile, counts=cnt, prev_token=profile[:, 1], first_token=first / n_q, entropy=ent / n_q,
                mean_distance=md / n_q, duplicate_token=dup / n_dup, distance_r2=r2)


@pytest.mark.parametrize("backend", ["numba", "torch"])  # the compiled CPU kernel, and the torch ops a GPU runs
def test_stories260k_matches_plain_torch(lm260k, seqs260k, backend):
    # six sequences of different lengths, batches of 4: padding is exercised
    idx = sorted(range(len(seqs260k.ids)), key=lambda i: len(seqs260k.ids[i]))
    pick = [idx[0], idx[len(idx) // 3], idx[len(idx) // 2], idx[-1], idx[-2], idx[1]]
    seqs = Sequences(
        corpus_name="t", synthetic=False, prepend_bos=True, bos_id=lm260k.bos_id,
        ids=tuple(seqs260k.ids[i] for i in pick), story_ids=tuple(range(6)), offsets=(0,) * 6,
    )
    assert len({len(s) for s in seqs.ids}) > 3
    res = run(lm260k, seqs, HeadsConfig(batch_size=4, induction_len=20, induction_batch=3, layers=(0, 4), backend=backend))
    assert [L.layer for L in res.layers] == [0, 4]
    for L in res.layers:
        ref = _independent(lm260k, seqs, L.layer, skip_bos_key=True)
        np.testing.assert_allclose(L.profile_counts, ref["counts"])
        np.testing.assert_allclose(L.profile, ref["profile"], atol=1e-4)
        for key in ("prev_token", "first_token", "entropy", "mean_distance", "duplicate_token", "distance_r2"):
            np.testing.assert_allclose(getattr(L, key), ref[key], atol=1e-4, err_msg=key)
        assert (L.profile * L.profile_counts).sum(1) == pytest.approx(np.full(lm260k.n_heads, res.n_queries), rel=1e-6)
    # induction: attention from second-half token q to position q - 19, read off a plain forward pass
    ids = induction_tokens(lm260k, 20, 3, 0)
    with torch.no_grad():
        att = lm260k.model(input_ids=ids, output_attentions=True).attentions
    for L in res.layers:
        a = att[L.layer].double().numpy()
        ref = np.mean([[a[b, :, q, q - 19] for q in range(21, 41)] for b in range(3)], axis=(0, 1))
        np.testing.assert_allclose(L.induction, ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# store, queries and the CLI


@pytest.fixture(scope="module")
def heads_db(tmp_path_factory, stories260k_path, valid_corpus):
    """A database with one heads run of stories260K over ~600 tokens, built by the CLI."""
    from precompute.cli import main

    url = f"sqlite:///{tmp_path_factory.mktemp('heads') / 'heads.db'}"
    rc = main(["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url, "--jobs", "heads",
               "--max-tokens", "600", "--ctx-len", "64", "--batch-size", "8", "--induction-len", "20"])
    assert rc == 0
    return url


def test_head_page_round_trips(heads_db, lm260k):
    from precompute.store.db import open_store
    from precompute.jobs.heads.tables import head_page, heads_overview
    from precompute.store.queries import sequence_tokens

    with open_store(heads_db, create=False).session() as s:
        ov = heads_overview(s, "stories260K")
        assert (ov.n_layers, ov.n_heads, len(ov.heads)) == (5, 8, 40)
        assert ov.induction_len == 20
        p = head_page(s, "stories260K", 2, 5)
        assert p.summary == ov.heads[2 * 8 + 5]
        assert sum(w * c for w, c in zip(p.profile, p.profile_counts)) == pytest.approx(ov.run.n_tokens, rel=1e-6)
        assert len(p.examples) == 3
        e = p.examples[0]
        raw = sequence_tokens(s, ov.run.id, [e.seq_idx])[e.seq_idx]
        assert [t.id for t in e.tokens] == raw[: len(e.tokens)].tolist()
        assert e.tokens[0].text == "<s>" and e.tokens[0].special
        # the stored pattern is the head's pattern on those tokens
        live = head_pattern(lm260k, raw.tolist(), 2, 5)
        n = len(e.tokens)
        np.testing.assert_allclose(np.array(e.pattern), live[:n, :n], atol=2e-3)


def test_show_head_prints_json(heads_db, capsys):
    import json

    from precompute.cli import main

    assert main(["show", "head", "--model", "stories260K", "--layer", "1", "--head", "3", "--db", heads_db, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["layer"] == 1 and data["summary"]["head"] == 3
    assert data["summary"]["label"] in ("distance", "mixed", "semantic")


@pytest.mark.parametrize("layer,head,msg", [(1, 8, "head 8 out of range"), (5, 0, "layer 5 out of range")])
def test_show_head_out_of_range_is_one_line(heads_db, layer, head, msg):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "precompute.cli", "show", "head", "--model", "stories260K", "--layer", str(layer),
         "--head", str(head), "--db", heads_db, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_backends_agree_without_bos(hand):
    """No BOS prepended (key 0 is an ordinary token), uneven lengths: the kernel and torch ops agree."""
    lm, seqs, _ = hand
    plain = _seqs([list(s[1:]) for s in seqs.ids], prepend_bos=False)
    out = [run(lm, plain, HeadsConfig(batch_size=3, induction_len=SHIFT + 1, induction_batch=2, backend=b))
           for b in ("numba", "torch")]
    a, b = out[0].layers[0], out[1].layers[0]
    assert out[0].n_queries == out[1].n_queries == sum(len(s) for s in plain.ids)
    np.testing.assert_array_equal(a.profile_counts, b.profile_counts)
    for key in ("profile", "entropy", "mean_distance", "first_token", "duplicate_token", "distance_r2"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-7, err_msg=key)
