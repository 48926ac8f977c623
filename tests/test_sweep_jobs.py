"""Heads, embeddings and rules accumulators: sweeping the corpus as one shard or as three (fresh
accumulators per shard, pickled as a Ray worker would send them, merged in order, drained after
each shard) gives the same result, and the streamed store rows equal the in-memory run's.

Batches of one sequence, so the model's own outputs do not depend on which sequences share a
padded batch: what is compared is the accumulators' merging, not float32 batch invariance."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from precompute.sequences import Sequences
from precompute.sweep import SeqsLookup, sweep_shard

CUTS = (0, 2, 5, 9)  # three shards of 2, 3 and 4 sequences


@pytest.fixture(scope="module")
def seqs9(seqs260k) -> Sequences:
    s = seqs260k
    n = CUTS[-1]
    return Sequences(s.corpus_name, s.synthetic, s.prepend_bos, s.bos_id, s.ids[:n], s.story_ids[:n], s.offsets[:n])


def shards_of(seqs: Sequences, cuts=CUTS) -> list[Sequences]:
    lens = np.array([len(x) for x in seqs.ids])
    return [
        Sequences(seqs.corpus_name, seqs.synthetic, seqs.prepend_bos, seqs.bos_id, seqs.ids[a:b], seqs.story_ids[a:b],
                  seqs.offsets[a:b], first_seq=a, first_key=int(lens[:a].sum()), index=i)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]


def stream(lm, spec, cfg, shards: list[Sequences], lookup) -> tuple[object, list]:
    """The driver's loop: fresh accumulators per shard, pickled, merged in order, drained after each."""
    total = spec.accumulator(lm, cfg)
    chunks = []
    for shard in shards:
        (acc,) = sweep_shard(lm, shard, [spec.accumulator(lm, cfg)], batch_size=1)
        total.merge(pickle.loads(pickle.dumps(acc)))
        chunks.append(total.drain())
        total = pickle.loads(pickle.dumps(total))  # a checkpoint
    return total.finish(lm, lookup), chunks


def test_check_shards_cover_the_corpus(seqs9):
    sh = shards_of(seqs9)
    assert sum(len(s.ids) for s in sh) == len(seqs9.ids)
    assert [int(s.keys()[0]) for s in sh] == [int(seqs9.keys()[a]) for a in CUTS[:-1]]


# ---------------------------------------------------------------------------------------------
# heads


def test_heads_one_shard_equals_three(lm260k, seqs9):
    from precompute.jobs.heads import JOB, HeadsConfig, run

    cfg = HeadsConfig(batch_size=1, induction_len=10, induction_batch=2, n_examples=4, example_len=12, max_len=128)
    lookup = SeqsLookup(seqs9)
    one, c1 = stream(lm260k, JOB, cfg, [seqs9], lookup)
    three, c3 = stream(lm260k, JOB, cfg, shards_of(seqs9), lookup)
    mem = run(lm260k, seqs9, cfg)
    assert c1 == [None] and c3 == [None, None, None]
    assert JOB.sequences(three) == [0, 1, 2, 3]
    for other in (three, mem):
        assert (other.n_queries, other.n_dup_queries, other.induction_len) == (one.n_queries, one.n_dup_queries, one.induction_len)
        for A, B in zip(one.layers, other.layers):
            assert A.profile.shape == (lm260k.n_heads, max(len(s) for s in seqs9.ids))  # cut to the longest distance
            assert np.array_equal(A.profile_counts, B.profile_counts)
            assert A.labels == B.labels
            for key in ("profile", "mean_distance", "entropy", "prev_token", "first_token", "duplicate_token",
                        "induction", "distance_r2"):
                np.testing.assert_allclose(getattr(B, key), getattr(A, key), rtol=0, atol=1e-12, err_msg=key)
            for ea, eb in zip(A.examples, B.examples):
                assert [e.seq_idx for e in ea] == [e.seq_idx for e in eb] == [0, 1, 2, 3]
                assert all(np.array_equal(x.pattern, y.pattern) for x, y in zip(ea, eb))


# ---------------------------------------------------------------------------------------------
# embeddings


def _store(tmp_path, name):
    from precompute.store.db import open_store

    return open_store(f"sqlite:///{tmp_path / name}")


def _write_run(s, lm, job, seqs, params):
    from precompute.store.db import now, write_run

    return write_run(s, lm, job, seqs, params, now())


def test_embeddings_one_shard_equals_three_and_the_store(lm260k, seqs9, tmp_path):
    from sqlalchemy import select

    from precompute.jobs.embeddings import JOB, EmbeddingsConfig, run
    from precompute.jobs.embeddings.tables import EmbeddingChunkRow, load_embeddings
    from precompute.models import model_name

    cfg = EmbeddingsConfig(window=16, min_tokens=4, batch_size=1)
    lookup = SeqsLookup(seqs9)
    one, c1 = stream(lm260k, JOB, cfg, [seqs9], lookup)
    three, c3 = stream(lm260k, JOB, cfg, shards_of(seqs9), lookup)
    mem = run(lm260k, seqs9, cfg)
    assert JOB.sequences(three) is None
    assert one.n_windows == three.n_windows == mem.n_windows == len(mem.windows) > 9
    assert len(three.vectors) == len(three.windows) == 0  # everything was drained
    assert np.array_equal(one.centre, three.centre) and np.array_equal(one.centre, mem.centre)
    for chunks in (c1, c3):
        assert [c.first_row for c in chunks] == list(np.cumsum([0] + [len(c.windows) for c in chunks[:-1]]))
        assert np.array_equal(np.concatenate([c.windows for c in chunks]), mem.windows)
        assert np.array_equal(np.concatenate([c.raw for c in chunks]), np.concatenate([x.raw for x in c1]))
    # the stored rows of the streamed run equal the in-memory result's
    store = _store(tmp_path, "e.db")
    name = model_name(lm260k.model_id)
    with store.session.begin() as s:
        run_mem = _write_run(s, lm260k, "embeddings", seqs9, cfg.params())
        JOB.write(s, run_mem.id, mem)
        run_str = _write_run(s, lm260k, "embeddings", seqs9, cfg.params())
        for c in c3[:2]:
            JOB.write_chunk(s, run_str.id, c)
        JOB.discard_chunks(s, run_str.id, CUTS[1])  # a resume from the second shard
        for c in c3[1:]:
            JOB.write_chunk(s, run_str.id, c)
        assert not any(s.scalars(select(EmbeddingChunkRow.normalised).where(EmbeddingChunkRow.run_id == run_str.id)))
        JOB.write(s, run_str.id, three)
    with store.session() as s:
        a = load_embeddings(s, name, run_mem.id)
        b = load_embeddings(s, name, run_str.id)
        assert np.array_equal(a.vectors, mem.vectors) and np.array_equal(a.windows, mem.windows)
        assert np.array_equal(b.vectors, mem.vectors) and np.array_equal(b.windows, mem.windows)
        assert np.array_equal(b.centre, mem.centre)
    store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# rules


@pytest.fixture(scope="module")
def ngram_text(train1097_corpus, tmp_path_factory):
    from precompute.corpus import read_text_corpus

    stories = read_text_corpus(train1097_corpus).stories[:200]
    p = tmp_path_factory.mktemp("ngram") / "train-slice.txt"
    p.write_text("\n".join(s.replace("\n\n", " ").replace("\n", " ") for s in stories) + "\n")
    return p


def _same_matches(a, b) -> None:
    for f in a.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if f == "templates":
            assert x == y
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f


def test_rules_one_shard_equals_three_and_the_store(lm260k, seqs9, ngram_text, tmp_path):
    from sqlalchemy import select

    from precompute.jobs.rules import JOB, RulesConfig, aggregates, run
    from precompute.jobs.rules.tables import RulesSequenceRow

    cfg = RulesConfig(ngram_corpus=str(ngram_text), rule_set="subgram", cache_dir=str(tmp_path / "c"), batch_size=1, chunk=100)
    lookup = SeqsLookup(seqs9)
    one, c1 = stream(lm260k, JOB, cfg, [seqs9], lookup)
    three, c3 = stream(lm260k, JOB, cfg, shards_of(seqs9), lookup)
    mem = run(lm260k, seqs9, cfg)
    assert JOB.sequences(three) is None
    assert one.aggregates == three.aggregates == mem.aggregates
    assert len(three.seq) == 0 and len(three.matches) == 0  # everything was drained
    a = mem.aggregates
    assert a["n_predictions"] == sum(len(s) - 1 for s in seqs9.ids) == len(mem.seq)
    # the sums give the means of all tokens at once
    d = mem.matches.defined
    assert a["agreement"] == pytest.approx(mem.matches.agree[d].mean(), abs=1e-11)
    assert a["mean_distance"] == pytest.approx(mem.matches.dist[d].mean(), abs=1e-11)
    assert a["agreement_vs_n"] == pytest.approx([mem.matches.agree_upto[d, n].mean() for n in range(7)], abs=1e-11)
    assert aggregates(mem) == a
    for chunks in (c1, c3):
        assert np.array_equal(np.concatenate([c.seq for c in chunks]), mem.seq)
        assert np.array_equal(np.concatenate([c.pos for c in chunks]), mem.pos)
        assert np.array_equal(np.concatenate([c.target for c in chunks]), mem.target)
        assert np.array_equal(np.concatenate([c.ctx_len for c in chunks]), mem.ctx_len)
    assert [sorted(set(c.seq.tolist())) for c in c3] == [list(range(a, b)) for a, b in zip(CUTS[:-1], CUTS[1:])]
    from precompute.jobs.rules.job import _concat_matches

    merged = _concat_matches([c.matches for c in c3], mem.templates, slice(None))
    _same_matches(merged, mem.matches)
    # streamed store rows (with a resume from the third shard) equal the in-memory run's
    store = _store(tmp_path, "r.db")
    with store.session.begin() as s:
        run_mem = _write_run(s, lm260k, "rules", seqs9, cfg.params())
        JOB.write(s, run_mem.id, mem)
        run_str = _write_run(s, lm260k, "rules", seqs9, cfg.params())
        for c in c3:
            JOB.write_chunk(s, run_str.id, c)
        JOB.discard_chunks(s, run_str.id, CUTS[2])
        JOB.write_chunk(s, run_str.id, c3[2])
        JOB.write(s, run_str.id, three)
    with store.session() as s:
        rows = {
            r: s.execute(select(RulesSequenceRow.seq_idx, RulesSequenceRow.n_defined, RulesSequenceRow.mean_dist,
                                RulesSequenceRow.agreement, RulesSequenceRow.data)
                         .where(RulesSequenceRow.run_id == r).order_by(RulesSequenceRow.seq_idx)).all()
            for r in (run_mem.id, run_str.id)
        }
        assert len(rows[run_mem.id]) == len(seqs9.ids) and rows[run_mem.id] == rows[run_str.id]
    store.engine.dispose()
    # pickling drops the matcher (the n-gram index) and an unpickled accumulator still merges
    acc = JOB.accumulator(lm260k, cfg)
    sweep_shard(lm260k, shards_of(seqs9)[0], [acc], batch_size=1)
    assert acc._matcher is not None
    back = pickle.loads(pickle.dumps(acc))
    assert back._matcher is None and back._lm is None and not back.pending
