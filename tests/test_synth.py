"""The synth story generator: deterministic, fast, and its labels say what the text holds
(checked by counting in the text itself, not by trusting the spans)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from itertools import islice

import pytest

from precompute.cli import main
from precompute.synth import PHRASES, SynthConfig, generate
from precompute.synth.grammar import N_NAMES, N_SECRET, NAMES, SECRET_REPEATS


def _digest(seed: int, tokens: int) -> str:
    h = hashlib.sha256()
    for s in generate(SynthConfig(seed=seed, tokens=tokens)):
        h.update(s.text.encode() + b"\n" + json.dumps(s.spans).encode())
    return h.hexdigest()


def test_same_seed_same_stories_and_a_million_units_in_under_a_minute():
    t0 = time.perf_counter()
    n = sum(s.n_units() for s in generate(SynthConfig(seed=7, tokens=1_000_000)))
    seconds = time.perf_counter() - t0
    assert n >= 1_000_000 and seconds < 60, f"{n} units in {seconds:.1f} s"
    assert _digest(3, 20_000) == _digest(3, 20_000)
    assert _digest(3, 20_000) != _digest(4, 20_000)


def test_labels_agree_with_the_text():
    stories = list(islice(generate(SynthConfig(seed=0)), 2000))
    assert N_NAMES > 10_000 and len(set(NAMES)) == N_NAMES
    repeated = sum(s.name in s.text[s.text.index(".") :] for s in stories)
    assert repeated > 0.97 * len(stories)  # the subject is the name or a pronoun at random
    names = {s.name for s in stories}
    assert len(names) > 1800  # a large pool: nearly every story has its own name
    offsets = defaultdict(int)
    for s in stories:
        spans = defaultdict(list)
        for a, b, label in s.spans:
            spans[label].append(s.text[a:b])
        assert spans["name_first"] == [s.name, s.friend]
        assert s.text.index(s.friend) < s.text.index(".", s.text.index(".") + 1)  # both in the first two sentences
        # every later occurrence of either name as a word is labelled name_later (secret words are drawn
        # from the same pool: a secret word spelled like a name is a secret word)
        secret_at = {a for a, _b, label in s.spans if label.startswith("secret_")}
        later = [m.group() for m in re.finditer(rf"\b(?:{s.name}|{s.friend})\b", s.text) if m.start() not in secret_at][2:]
        assert later == spans["name_later"]
        want = {"she", "her"} if s.gender == "girl" else {"he", "his"}
        assert set(spans["pronoun"]) <= want and set(re.findall(r"\b(she|he|her|his)\b", s.text)) <= want
        assert s.text.count('"') % 2 == 0  # every quote closes
        inside = re.findall(r'"([^"]*)"', s.text)
        assert " ".join(inside).split() == spans["quote"]
        # the secret words: distinct made-up words, each repeat a rotation of the first telling
        first, later = spans["secret_first"], spans["secret_later"]
        assert len(first) == len(set(first)) == N_SECRET and set(first) <= set(NAMES)
        assert len(later) == SECRET_REPEATS * N_SECRET
        for i in range(SECRET_REPEATS):
            rep = later[i * N_SECRET : (i + 1) * N_SECRET]
            j = first.index(rep[0])
            assert rep == first[j:] + first[:j]
            offsets[j] += 1
    # a repeat starts at each word of the list alike: copying, not counting from the start, continues it
    assert sorted(offsets) == list(range(N_SECRET)) and min(offsets.values()) > 0.8 * max(offsets.values())


def test_phrase_ends_need_exactly_k_words():
    """Over the whole corpus (every word, not only labelled ones): the k words before a labelled
    phrase end always continue the same way; the k - 1 words before it do not."""
    stories = list(islice(generate(SynthConfig(seed=1)), 3000))
    nexts: dict[tuple, set] = defaultdict(set)
    ends = []
    for s in stories:
        words = re.findall(r"[a-z]+|[.,\"]", s.text)
        for n in range(1, 8):
            for i in range(n, len(words)):
                nexts[tuple(words[i - n : i])].add(words[i])
        starts = [m.start() for m in re.finditer(r"[a-z]+|[.,\"]", s.text)]
        for a, _b, label in s.spans:
            if label.startswith("phrase_end_k"):
                i = starts.index(a)
                ends.append((int(label.removeprefix("phrase_end_k")), words[i - 8 : i]))
    assert {k for k, _ in ends} == set(PHRASES)
    for k, ctx in ends:
        assert len(nexts[tuple(ctx[-k:])]) == 1
        assert len(nexts[tuple(ctx[-(k - 1):])]) > 1


def test_cli_writes_corpus_and_labels(tmp_path, capsys):
    out, lab = tmp_path / "s.txt", tmp_path / "s.jsonl"
    assert main(["corpus", "synth", "--seed", "5", "--tokens", "3000", "--out", str(out), "--labels", str(lab)]) == 0
    lines = out.read_text().splitlines()
    rows = [json.loads(x) for x in lab.read_text().splitlines()]
    first = next(generate(SynthConfig(seed=5)))
    assert lines[0] == first.text and len(lines) == len(rows)
    assert [tuple(x) for x in rows[0]["spans"]] == first.spans
    assert main(["corpus", "synth", "--tokens", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --tokens must be at least 1"
