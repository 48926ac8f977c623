"""`precompute train` on a tiny recipe, story splitting, and the sampled fallback corpus."""

from __future__ import annotations

import json

import pytest
import torch

from precompute.cli import main
from precompute.corpus import CorpusError, load_corpus, sample_corpus, split_stories
from precompute.models import load_model
from precompute.sequences import tokenize


def test_split_stories_separators():
    assert split_stories("a b.\nc d.\n\ne f.\ng h.") == ["a b.", "c d.\n\ne f.", "g h."]  # newline between stories
    assert split_stories("a b.\n\nc d.\n\ne f.") == ["a b.", "c d.", "e f."]  # blank line between stories
    assert split_stories("one\n\ntwo<|endoftext|>three") == ["one\n\ntwo", "three"]
    assert split_stories("a\nb\nc", separator="blank") == ["a\nb\nc"]


def test_shared_files_split_as_documented(train1097_corpus, valid_corpus):
    assert len(load_corpus(str(train1097_corpus)).stories) == 1097
    assert len(load_corpus(str(valid_corpus)).stories) > 4000  # paragraphs: the file marks both alike


def test_a_run_records_the_corpus_file_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("a b.\nc d.\n")
    monkeypatch.chdir(tmp_path)
    assert load_corpus("c.txt").name == str(tmp_path / "c.txt")  # the app may run from another folder


def test_hf_dataset_without_network_is_one_line():
    with pytest.raises(CorpusError) as e:
        load_corpus("hf:roneneldan/TinyStories:validation", max_stories=2)
    assert "\n" not in str(e.value)


def test_train_tiny_model_loads_and_has_card(tmp_path, valid_corpus):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(valid_corpus.read_text().split("\n\n")[:300]).replace("\n\n", " "))
    out = tmp_path / "tiny"
    rc = main(["train", "--corpus", str(corpus), "--val-corpus", str(valid_corpus), "--out", str(out), "--layers", "1",
               "--d-model", "32", "--heads", "2", "--n-ctx", "64", "--vocab-size", "400", "--steps", "30",
               "--batch-size", "8", "--lr", "3e-3"])
    assert rc == 0
    info = json.loads((out / "training.json").read_text())
    hist = info["result"]["history"]
    assert info["result"]["steps"] == 30 and hist[-1]["step"] == 30
    assert info["result"]["val_loss"] < 6.0 < 5.99 + torch.log(torch.tensor(400.0)).item()  # better than uniform
    card = (out / "README.md").read_text()
    assert "validation loss" in card and f"{info['result']['val_loss']:.3f}" in card
    lm = load_model(str(out))
    assert lm.n_layers == 1 and lm.d_mlp == 128 and lm.adapter.family == "gpt2"
    ids = lm.encode("once upon a time")
    assert ids[0] == lm.bos_id and lm.token_strs(ids)[0] == "<|endoftext|>"
    assert "".join(lm.token_strs(ids[1:])) == "once upon a time"
    # the tokenizer lowercases
    assert lm.encode("ONCE") == lm.encode("once")


def test_sampled_corpus_is_seeded_and_marked(lm260k):
    a = sample_corpus(lm260k, n_stories=4, max_new_tokens=30, seed=3)
    b = sample_corpus(lm260k, n_stories=4, max_new_tokens=30, seed=3)
    assert a.stories == b.stories and a.synthetic and a.name.startswith("sampled:stories260K")
    seqs = tokenize(lm260k, a)
    assert seqs.synthetic and all(s[0] == 1 for s in seqs.ids)


def test_run_without_corpus_records_sampled_corpus(tmp_path, stories260k_path):
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs

    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", "--model", str(stories260k_path), "--db", url, "--sample-stories", "6", "--max-tokens", "600"]) == 0
    with open_store(url, create=False).session() as s:
        (run,) = list_runs(s)
    assert run.corpus_synthetic and run.corpus.startswith("sampled:") and run.prepend_bos


def test_no_bos_run_scores_every_position(lm260k, valid_corpus):
    from precompute.corpus import read_text_corpus

    c = read_text_corpus(valid_corpus, max_stories=5)
    with_bos = tokenize(lm260k, c, max_tokens=300)
    without = tokenize(lm260k, c, max_tokens=300, prepend_bos=False)
    assert with_bos.prepend_bos and not without.prepend_bos
    assert with_bos.n_scored == with_bos.n_tokens - len(with_bos.ids)
    assert without.n_scored == without.n_tokens and without.ids[0][0] != 1
