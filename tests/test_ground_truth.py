"""The bundled synth model (data/models/synth-2l) against what was planted in its training
stories, each value checked by an independent plain computation: attention read from the raw
Hugging Face model, a head removed by zeroing its value weights (not by the pre-hook the tool
uses), n-gram counts over the regenerated training text, neuron activations from a hook on the
MLP's activation function."""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.models import load_model
from precompute.synth import PHRASES
from precompute.synth.facts import eval_stories, ground_truth, phase_change, training_corpus
from precompute.synth.grammar import NAMES
from precompute.synth.labels import batch_of, token_losses

MODEL = Path(__file__).resolve().parents[1] / "data/models/synth-2l"
N_STORIES = 150


@pytest.fixture(scope="module")
def lm():
    return load_model(str(MODEL))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="module")
def gt(lm, cache):
    return ground_truth(lm, MODEL, eval_seed=1000, n_stories=N_STORIES, cache_dir=cache)


@pytest.fixture(scope="module")
def batch(lm):
    return batch_of(lm.tokenizer, eval_stories(1000, N_STORIES), lm.n_ctx)


def _attentions(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, output_attentions=True).attentions  # per layer [batch, head, q, k]


def test_model_card_names_the_corpus_seed_and_planted_facts():
    info = json.loads((MODEL / "training.json").read_text())
    assert Path(info["config"]["corpus"]).name == "synth-0-2000000.txt"
    card = (MODEL / "README.md").read_text()
    for words in ("seed 0", "2,000,000", "name", "phrase", "quote", "6 **secret words**", "repeated 3 times",
                  "**Phase change**: the loss on the repeated secret words sat at 3.39 nats/token until step 1,900"):
        assert words in card
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < 3_000_000


IND, PREV = (1, 0), (0, 3)  # the copying head and the previous-token head before it, measured


def test_loss_on_later_names_and_secret_words_drops_in_a_phase_change():
    hist = [h for h in json.loads((MODEL / "training.json").read_text())["result"]["history"] if "probe" in h]
    by_step = {h["step"]: h["probe"] for h in hist}
    names = [h["probe"]["name_later"] for h in hist]
    first = [h["probe"]["name_first"] for h in hist]
    assert names[0] > 5 and names[-1] < 0.1 * names[0]  # copying formed
    assert first[-1] > 3.5  # a first mention stays unpredictable: 19,595 names
    # a plateau, then a sudden drop: in the 200 steps to 2,100 the loss on the repeated secret words
    # falls by more than it did in the 1,800 steps before, and so does the loss on later names
    pc = phase_change(hist)
    assert pc.formed and pc.steepest == 2100 and pc.start == 1900
    secret = {s: by_step[s]["secret_later"] for s in (100, 1900, 2100)}
    assert secret[1900] - secret[2100] > 1.5 > secret[100] - secret[1900]
    assert by_step[1900]["name_later"] - by_step[2100]["name_later"] > 1.2
    assert pc.final < 0.5 and pc.before > 3.3


def test_the_induction_score_misses_the_copying_head_by_a_plain_computation(lm, gt):
    """The copying head attends to the token after the earlier copy inside stories (below), yet on
    repeated random tokens no head does: the tool's score and a plain computation on other random
    tokens stay under 0.05 (the hand-set circuit below scores > 0.99). On repeated lists of made-up
    words alone (no story around them) the copying head is the one that attends there most."""
    gen = torch.Generator().manual_seed(123)  # not the job's seed
    half = 40
    rows = [torch.randperm(lm.vocab_size - 1, generator=gen)[:half] + 1 for _ in range(8)]  # id 0 is BOS
    ids = torch.stack([torch.cat([torch.tensor([lm.bos_id]), r, r]) for r in rows])
    att = _attentions(lm, ids)
    q = torch.arange(1 + half, 1 + 2 * half)
    plain = {(l, h): float(a[:, h, q, q - half + 1].mean()) for l, a in enumerate(att) for h in range(a.shape[1])}
    assert max(plain.values()) < 0.05
    assert max(h.induction for h in gt.heads) < 0.05
    assert gt.label_loss["secret_later"] < 0.6  # yet the repeated secret words are copied
    rng = random.Random(5)
    half = 24
    rows = [lm.tokenizer(" " + " ".join(rng.sample(NAMES, 12)))["input_ids"][:half] for _ in range(16)]
    ids = torch.tensor([[lm.bos_id] + r + r for r in rows])
    att = _attentions(lm, ids)
    q = torch.arange(1 + half, 1 + 2 * half)
    names = {(l, h): float(a[:, h, q, q - half + 1].mean()) for l, a in enumerate(att) for h in range(a.shape[1])}
    assert max(names, key=names.get) == IND and names[IND] > 0.1


def test_previous_token_scores_match_a_plain_computation(lm, gt, batch):
    ids, real, _ = batch
    att = _attentions(lm, ids)
    for l in range(lm.n_layers):
        for h in range(lm.n_heads):
            a = att[l][:, h]
            w = [float(a[r, p, p - 1]) for r in range(len(ids)) for p in range(1, len(ids[0])) if real[r, p]]
            assert float(np.mean(w)) == pytest.approx(gt.head(l, h).prev_token, abs=1e-4)
    assert gt.previous_token_head(IND[0]) == gt.head(*PREV) and gt.head(*PREV).prev_token > 0.65
    assert sorted(h.prev_token for h in gt.heads)[-2] < 0.15  # one previous-token head, in layer 0


def test_the_copying_head_shows_induction_on_names(lm, gt, batch):
    """On the planted names L1H0 attends to the token after the earlier copy more than any head."""
    ids, real, masks = batch
    att = _attentions(lm, ids)
    plain = {}
    for l in range(lm.n_layers):
        for h in range(lm.n_heads):
            w = []
            for r in range(len(ids)):
                toks = ids[r].tolist()
                for q in range(len(toks)):
                    if masks["name_later"][r, q] and real[r, q]:
                        earlier = [k for k in range(1, q) if toks[k] == toks[q]]
                        if earlier:
                            w.append(float(att[l][r, h, q, earlier[0] + 1]))
            plain[(l, h)] = float(np.mean(w))
            assert plain[(l, h)] == pytest.approx(gt.head(l, h).name_induction, abs=1e-5)
    assert max(plain, key=plain.get) == IND and plain[IND] > 0.3


def test_zeroing_the_copying_head_costs_the_most(lm, gt, batch):
    """Later names and the repeated secret words are copied by L1H0 with the previous-token head
    L0H3 before it: zeroing either costs the most on both, L1H0 > 4 nats/token. Measured here by
    zeroing the head's value weights."""
    ids, real, masks = batch
    base = token_losses(lm.model, ids)
    d_head = lm.d_model // lm.n_heads
    rises = {"name_later": {}, "secret_later": {}}
    for l in range(lm.n_layers):
        for h in range(lm.n_heads):
            m = copy.deepcopy(lm.model)
            with torch.no_grad():  # the head's values are zero, so is its output
                v = slice(2 * lm.d_model + h * d_head, 2 * lm.d_model + (h + 1) * d_head)
                m.transformer.h[l].attn.c_attn.weight[:, v] = 0
                m.transformer.h[l].attn.c_attn.bias[v] = 0
            ab = token_losses(m, ids)
            for label, r in rises.items():
                sel = masks[label] & real
                r[(l, h)] = ab[sel].mean() - base[sel].mean()
            assert rises["name_later"][(l, h)] == pytest.approx(gt.head(l, h).name_loss_rise, abs=1e-4)
            assert rises["secret_later"][(l, h)] == pytest.approx(gt.head(l, h).secret_loss_rise, abs=1e-4)
    for label, r in rises.items():
        top = sorted(r, key=r.get, reverse=True)
        assert top[:2] == [IND, PREV], (label, top)
        assert r[IND] > 4 and r[PREV] > 1.5
    assert gt.most_harmful() == gt.most_harmful_secret() == gt.head(*IND)
    assert base[masks["name_later"] & real].mean() < 0.5


def test_optimal_rule_inside_phrases_has_the_planted_length(lm, gt, cache):
    """The planted k holds at the token level in the regenerated training text (counted here),
    and the rules job's optimal rule there has length k and agrees with the model."""
    text = training_corpus(MODEL, cache).read_text().splitlines()[:3000]
    nexts = defaultdict(set)
    for line in text:
        t = [lm.bos_id] + lm.tokenizer(line)["input_ids"]
        for n in range(1, 8):
            for i in range(n, len(t)):
                nexts[tuple(t[i - n : i])].add(t[i])
    for k, family in PHRASES.items():
        for words in family:
            t = lm.tokenizer(" " + " ".join(words))["input_ids"]
            assert len(t) == len(words)  # one token per phrase word
            assert len(nexts[tuple(t[-1 - k : -1])]) == 1 and len(nexts[tuple(t[-k:-1])]) > 1
    assert [r.k for r in gt.rules] == sorted(PHRASES)
    for r in gt.rules:
        assert r.n_tokens >= 20
        assert r.share_length_k > 0.9 and r.agreement > 0.9 and r.model_correct > 0.9, r


def _hand_induction_model(V: int = 40, N: int = 48, C: float = 4.0):
    """A hand-set 2-layer attention-only GPT-2 (one head per layer): layer 0 attends to the
    previous position and writes that token into a 'previous token' subspace; layer 1's query is
    the current token, its key the previous-token subspace, so it attends to the token right after
    an earlier copy of the current one: previous-token + induction, exactly."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from precompute.models import ADAPTERS, LoadedModel

    d = 2 * V + N
    T, P, Q = 0, V, V + N  # token, position and previous-token dims start here
    cfg = GPT2Config(vocab_size=V, n_positions=N, n_embd=d, n_layer=2, n_head=1, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight[torch.arange(V), T + torch.arange(V)] = 1.0
        model.transformer.wpe.weight[torch.arange(N), P + torch.arange(N)] = 1.0
        for blk in model.transformer.h:
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
            blk.attn.c_proj.weight.copy_(torch.eye(d))
        model.transformer.ln_f.weight.fill_(1.0)
        w0 = model.transformer.h[0].attn.c_attn.weight  # Conv1D [d, 3d]: columns q | k | v
        w0[P + torch.arange(1, N), P + torch.arange(N - 1)] = C  # query of position p: position p - 1
        w0[P + torch.arange(N), d + P + torch.arange(N)] = 1.0  # key of position j: position j
        w0[T + torch.arange(V), 2 * d + Q + torch.arange(V)] = 1.0  # value: the token, into the previous-token dims
        w1 = model.transformer.h[1].attn.c_attn.weight
        w1[T + torch.arange(V), Q + torch.arange(V)] = 10 * C  # query: the current token (the key is weaker after ln_1)
        w1[Q + torch.arange(V), d + Q + torch.arange(V)] = 1.0  # key: the previous token
    model.eval()
    tok = SimpleNamespace(bos_token_id=0, eos_token_id=0, all_special_ids=[0])
    return LoadedModel(model_id="hand-induction", model=model, tokenizer=tok, adapter=ADAPTERS["GPT2LMHeadModel"],
                       architecture="GPT2LMHeadModel")


def test_hand_set_previous_token_plus_induction_scores_near_one():
    from precompute.jobs.heads import induction_scores

    lm = _hand_induction_model()
    scores = induction_scores(lm, half=20, batch=8, seed=0)
    assert scores[1][0] > 0.99  # the induction head
    assert scores[0][0] < 0.05  # the previous-token head attends one back, not to the copy
    ids = torch.tensor([[0, 5, 9, 3, 5, 9, 3]])
    with torch.no_grad():
        a0 = lm.forward(ids, output_attentions=True).attentions[0][0, 0]
    assert float(a0[torch.arange(1, 7), torch.arange(0, 6)].min()) > 0.99


def test_a_neuron_fires_inside_quotes(lm, gt, batch):
    """The neuron facts recomputed from a hook on the MLP's activation function (GELU output)."""
    ids, real, masks = batch
    acts = {}
    hooks = [lm.model.transformer.h[l].mlp.act.register_forward_hook(lambda _m, _i, out, l=l: acts.__setitem__(l, out))
             for l in range(lm.n_layers)]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for fact in gt.neurons:
        a = acts[fact.layer][..., fact.neuron][torch.tensor(real)]
        top = a >= a.max() - 0.2 * (a.max() - a.min())
        lab = torch.tensor(masks[fact.label][real])
        assert int(top.sum()) == fact.n_top
        assert float((top & lab).sum() / top.sum()) == pytest.approx(fact.share, abs=1e-6)
    quote = next(f for f in gt.neurons if f.label == "quote")
    assert quote.share > 0.9 and quote.n_top >= 20 and quote.base_rate < 0.15


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(model=str(MODEL.parent / "tinystories-4l")), "has no training.json naming a synth corpus"),
        (dict(seed="0"), "seed 0 is the training seed"),
        (dict(stories="5"), "stories=5 is out of range (10-2000)"),
    ],
)
def test_ground_truth_page_bad_links_are_one_line(params, message):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(MODEL.parents[2] / "app" / "main.py"), default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    at.switch_page("views/ground_truth.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
