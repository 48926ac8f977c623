"""The on-disk suffix-array index (precompute/ngrams/suffix.py) and the training text it is built
from (precompute/ngrams/training.py).

Independent computations: brute-force counting (bench/ngram_reference.py), tokengrams' own
``count_next`` on the same files, and today's in-memory tables (precompute/ngrams/index.py) on
stories260K with train-1097.txt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.ngram_reference import ReferenceIndex
from precompute.ngrams.index import NgramIndex
from precompute.ngrams.matcher import Matcher, Matches, contexts_of
from precompute.ngrams.suffix import SuffixIndex, build_suffix_index
from precompute.ngrams.templates import rule_set
from precompute.ngrams.training import memory_index, open_index, resolve_split, split_texts, suffix_index

V = 12


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 random stories over 12 tokens (many repeats, stories of 1-40 tokens) and both indexes."""
    rng = np.random.default_rng(0)
    stories = [[int(x) for x in rng.integers(0, V, rng.integers(1, 40))] for _ in range(300)]
    folder = tmp_path_factory.mktemp("sa")
    sa = build_suffix_index(folder, [stories[:100], stories[100:]], V, "random", "story", progress=False)
    return stories, sa, NgramIndex.from_stories(stories, V)


def _contexts(rng, stories, n):
    """Contexts cut from the stories (so most queries occur), a fifth with one token changed."""
    flat = [t for s in stories for t in s]
    out = []
    for _ in range(n):
        i = int(rng.integers(1, len(flat)))
        c = flat[max(0, i - 7) : i]
        if rng.random() < 0.2:
            c[int(rng.integers(len(c)))] = int(rng.integers(V))
        out.append(c)
    return out


def test_counts_equal_brute_force_and_tokengrams(small):
    import tokengrams

    stories, sa, _ = small
    templates = rule_set("subgram")
    ref = ReferenceIndex(stories, templates)
    tg = tokengrams.MemmapIndex(str(sa.folder / "tokens.bin"), str(sa.folder / "table.bin"), vocab=V + 1)
    rng = np.random.default_rng(1)
    n_nonempty = 0
    for ctx in _contexts(rng, stories, 1500):
        fits = [t for t in templates if len(t) <= len(ctx)]
        t = fits[int(rng.integers(len(fits)))]
        got = sa.counts(t, ctx)
        assert got == dict(ref.counts(t, ctx)), (t, ctx)
        # tokengrams' own answer for the query (kept tokens, oldest first), the separator dropped
        q = [c for c, s in zip(ctx[-len(t):], t) if s == "+"]
        nxt = tg.count_next(q)[:V]
        assert got == {k: int(v) for k, v in enumerate(nxt) if v}, (t, ctx)
        n_nonempty += bool(got)
    assert n_nonempty > 500


def test_story_boundaries_and_story_ends(tmp_path):
    sa = build_suffix_index(tmp_path, [[[1, 2, 3], [4, 5, 6], [2, 3]]], 8, "x", "story", progress=False)
    assert sa.counts("+", [3]) == {}  # 3 ends both stories: no next token, not a separator
    assert sa.counts("++", [3, 4]) == {}  # never across a story start
    assert sa.counts("+", [2]) == {3: 2}
    assert sa.counts("++", [1, 2]) == {3: 1}
    assert sa.counts("+-", [4, 9]) == {5: 1}  # the dropped token closes up
    assert len(sa) == 8 and sa.info.n_stories == 3
    assert sa.nbytes() == (8 + 3) * (2 + 8) + (tmp_path / "first.npy").stat().st_size  # uint16 tokens and separators, uint64 array
    with pytest.raises(ValueError, match="marginalised"):
        sa.counts("+*", [1, 2])
    with pytest.raises(ValueError, match="outside"):
        build_suffix_index(tmp_path / "bad", [[[1, 8]]], 8, "x", "story", progress=False)  # 8: the separator's id
    with pytest.raises(ValueError, match="no tokens"):
        build_suffix_index(tmp_path / "empty", [[[]]], 8, "x", "story", progress=False)


def _assert_same(a: Matches, b: Matches):
    for f in a.__dataclass_fields__:
        if f != "templates":
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("chunk", [400, 1500])
def test_matcher_same_as_in_memory_tables(small, chunk):
    """Every field of every prediction equals the in-memory tables', in chunks of any size."""
    stories, sa, mem = small
    rng = np.random.default_rng(2)
    N = 1500
    P = rng.dirichlet(np.full(V, 0.3), N)
    ctx = np.full((N, 7), -1)
    cl = rng.integers(0, 8, N)
    for j, c in enumerate(_contexts(rng, stories, N)):
        c = c[-cl[j]:] if cl[j] else []
        cl[j] = len(c)
        ctx[j, 7 - len(c):] = c
    for rs in ("subgram", "suffix"):
        for distance in ("variational", "linf"):
            want = Matcher(mem, rule_set(rs), distance).match(P, ctx, cl, rng.integers(0, V, N), chunk=chunk)
            got = Matcher(sa, rule_set(rs), distance).match(P, ctx, cl, want.model_argmax, chunk=chunk)
            want = Matcher(mem, rule_set(rs), distance).match(P, ctx, cl, want.model_argmax, chunk=chunk)
            _assert_same(want, got)
            assert want.defined.mean() > 0.5
    with pytest.raises(ValueError, match="R_all"):
        Matcher(sa, rule_set("all"))


# ---------------------------------------------------------------------------------------------
# training text: split, cache, R_all bound


def test_split_and_model_card(tmp_path):
    assert list(split_texts(iter(["A b.\n\nC d.\n \nE.", "F"]), "paragraph")) == ["A b.", "C d.", "E.", "F"]
    assert list(split_texts(iter(["A b.\n\nC d."]), "story")) == ["A b.\n\nC d."]
    assert resolve_split("paragraph", None).split == "paragraph"
    with pytest.raises(ValueError, match="split"):
        resolve_split("lines", None)
    m = tmp_path / "m"
    m.mkdir()
    assert resolve_split("auto", str(m)).split == "story" and "does not say" in resolve_split("auto", str(m)).source
    (m / "training.json").write_text(json.dumps({"config": {"corpus": "x.txt"}}))
    assert resolve_split("auto", str(m)) .split == "story" and "training.json" in resolve_split("auto", str(m)).source
    (m / "README.md").write_text("| training text split | paragraphs |\n")
    assert resolve_split("auto", str(m)).split == "paragraph" and resolve_split("auto", str(m)).source == "model card"
    assert resolve_split("story", str(m)).split == "story"


class _Tok:
    """A word tokenizer: each distinct word (and the newline) gets an id, in order of first sight."""

    vocab = {"\n": 0}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        ids = []
        for t in texts:
            ids.append([self.vocab.setdefault(w, len(self.vocab)) for w in t.replace("\n", " \n ").split(" ") if w])
        return {"input_ids": ids}

    def get_vocab(self):
        return {"fixed": 0}


def test_paragraph_split_index_and_cache(tmp_path, monkeypatch):
    corpus = tmp_path / "train.txt"
    corpus.write_text("a b\n\nc d\nc d a b\n")  # two stories (single newline); the first has two paragraphs
    tok = _Tok()
    sa_story = suffix_index(tok, 16, str(corpus), "story", cache_root=tmp_path / "c", progress=False)
    sa_par = suffix_index(tok, 16, str(corpus), "paragraph", cache_root=tmp_path / "c", progress=False)
    a, b, c, d, nl = (tok.vocab[w] for w in "a b c d \n".split(" "))
    assert sa_story.folder != sa_par.folder
    assert sa_story.counts("+", [b]) == {nl: 1}  # "b \n \n c": the paragraph break is inside the story
    assert sa_par.counts("+", [b]) == {}  # paragraphs: "b" ends both of its pieces
    assert sa_par.counts("++", [c, d]) == {a: 1} and sa_par.info.n_stories == 3
    # the second call reads the files: nothing is rebuilt
    monkeypatch.setattr("precompute.ngrams.training.build_suffix_index", lambda *a, **k: pytest.fail("rebuilt"))
    again = suffix_index(tok, 16, str(corpus), "paragraph", cache_root=tmp_path / "c", progress=False)
    assert again.folder == sa_par.folder and again.counts("++", [c, d]) == {a: 1}
    # R_all: exact in-memory tables from the same tokens, refused above the limit with one line
    mem = memory_index(sa_story)
    assert mem.counts("+*", [c, 0]) == {a: 1}  # "c d a" (the first story's "c d" ends it)
    with pytest.raises(ValueError) as e:
        memory_index(sa_story, max_tokens=5)
    msg = str(e.value)
    assert "\n" not in msg and "at most 5 training tokens" in msg and "--rule-set subgram" in msg


# ---------------------------------------------------------------------------------------------
# stories260K on train-1097.txt: the suffix array gives today's results on every prediction


def test_stories260k_suffix_array_equals_in_memory_tables(lm260k, seqs260k, train1097_corpus, tmp_path):
    import torch

    from precompute.jobs.rules import model_probs

    sa = open_index(lm260k, str(train1097_corpus), "subgram", "auto", cache_root=tmp_path, progress=False)
    assert isinstance(sa, SuffixIndex) and sa.info.split == "story"
    mem = NgramIndex.for_corpus(lm260k, str(train1097_corpus), cache=False)  # today's tables, whole stories
    assert len(mem) == len(sa)
    np.testing.assert_array_equal(mem.tokens, np.asarray(sa.tokens)[np.asarray(sa.tokens) != sa.sep])
    P, C, L, T = [], [], [], []
    for ids in seqs260k.ids[:40]:
        ids = np.asarray(ids, dtype=np.int64)
        probs = model_probs(lm260k, torch.from_numpy(ids)[None])[0].numpy()
        ctx, clen = contexts_of(ids, lm260k.bos_id, first=1)
        t = np.arange(1, len(ids))
        P.append(probs[t - 1]); C.append(ctx[t]); L.append(clen[t]); T.append(ids[t])  # noqa: E702
    P, C, L, T = (np.concatenate(x) for x in (P, C, L, T))
    assert len(P) > 1500
    templates = rule_set("subgram")
    want = Matcher(mem, templates).match(P, C, L, T, chunk=512)
    got = Matcher(sa, templates).match(P, C, L, T, chunk=512)
    assert want.defined.mean() > 0.9
    _assert_same(want, got)  # same optimal rule and agreement (and everything else) on every prediction


# ---------------------------------------------------------------------------------------------
# the CLI: the split is recorded in the run and shown; R_all above its limit is one line


def test_cli_records_the_split_and_bounds_r_all(stories260k_path, valid_corpus, train1097_corpus, tmp_path, monkeypatch, capsys):
    import precompute.ngrams.training as training
    from precompute.cli import main
    from precompute.jobs.rules.tables import rules_overview
    from precompute.store.db import open_store

    url = f"sqlite:///{tmp_path / 'r.db'}"
    common = ["run", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url, "--max-tokens", "300",
              "--ctx-len", "64", "--jobs", "rules", "--ngram-corpus", str(train1097_corpus)]
    assert main(common + ["--ngram-split", "paragraph"]) == 0
    store = open_store(url, create=False)
    with store.session() as s:
        ov = rules_overview(s, "stories260K")
    store.engine.dispose()
    assert ov.split == "paragraph" and ov.split_source == "asked for" and ov.n_predictions > 250
    # paragraphs: more pieces than the 1,097 stories, fewer tokens (no paragraph-break newlines)
    sa = open_index_for(stories260k_path, train1097_corpus, "paragraph")
    assert sa.info.n_stories > 1097 and ov.index_tokens == len(sa)
    # the pages: the overview says the split; the live story view matches from the same index
    import app.state as state
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("TINYSCOPE_DB", url)
    monkeypatch.setattr(state, "DB_URL", url)
    main_py = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
    for page, params, want in (("views/rules.py", {}, "split into **paragraphs** (asked for)"),
                               ("views/story.py", {"prompt": "Once upon a time, there was a little dog."}, "split into paragraphs")):
        at = AppTest.from_file(main_py, default_timeout=180)
        at.query_params.update({"model": "stories260K", **params})
        at.run()
        at.switch_page(page)
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception]
        assert any(want in c.value for c in at.caption), page
    monkeypatch.setattr(training, "R_ALL_MAX_TOKENS", 100_000)
    capsys.readouterr()
    assert main(common + ["--rule-set", "all"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (progress bars before it)
    assert "Traceback" not in err and "at most 100,000 training tokens" in last and "--rule-set subgram" in last


def open_index_for(model_path, corpus, split):
    from precompute.models import load_model

    return open_index(load_model(str(model_path)), str(corpus), "subgram", split, progress=False)


def test_wide_vocabulary_and_failed_builds_leave_nothing(tmp_path):
    """Above 65,535 tokens the file holds uint32; a build that fails leaves no files behind."""
    big = 70_000
    sa = build_suffix_index(tmp_path / "wide", [[[69_999, 5, 69_999, 5, 7]]], big, "x", "story", progress=False)
    assert sa.tokens.dtype == np.uint32 and sa.counts("+", [69_999]) == {5: 2} and sa.counts("++", [69_999, 5]) == {69_999: 1, 7: 1}
    with pytest.raises(ValueError, match="outside"):
        build_suffix_index(tmp_path / "bad", [[[1, 2]], [[3, 9]]], 8, "x", "story", progress=False)
    assert list((tmp_path / "bad").iterdir()) == []


def test_concurrent_opens_build_once(tmp_path, monkeypatch):
    """Two openers at once (sweep workers, app sessions): one builds, the other reads its files."""
    import threading

    import precompute.ngrams.training as training

    corpus = tmp_path / "train.txt"
    corpus.write_text("a b c\nc b a b\n")
    calls = []
    real = training.build_suffix_index

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(training, "build_suffix_index", counting)
    out = []
    threads = [threading.Thread(target=lambda: out.append(suffix_index(_Tok(), 16, str(corpus), "story", cache_root=tmp_path / "c",
                                                                      progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3 and len({o.folder for o in out}) == 1 and all(len(o) == 7 for o in out)
