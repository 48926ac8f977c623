"""`precompute train-sae`: the TopK SAE on hand-built cases, and on stories260K every stored quality
number recomputed independently (plain PyTorch hooks on the MLP's down-projection, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute.sae.model import TopKSAE
from precompute.sae.train import SaeConfig, variance_explained

LAYER = 2


def test_topk_keeps_k_features_and_unit_decoder_rows():
    sae = TopKSAE(6, 10, 3)
    sae.init_from(torch.randn(50, 6), seed=1)
    z = sae.encode(torch.randn(20, 6))
    assert ((z > 0).sum(1) <= 3).all() and (z >= 0).all()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10))


def test_identity_dictionary_reconstructs_exactly():
    """Features = the input's own coordinates, k = d: a non-negative x is rebuilt exactly (VE 1);
    with k = 1 only each token's largest coordinate survives (VE known in closed form)."""
    d = 4
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 5.0, 1.0], [1.0, 0.0, 0.0, 4.0]])
    sae = TopKSAE(d, d, d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    assert torch.allclose(sae(x), x) and variance_explained(sae, x) == pytest.approx(1.0)
    one = TopKSAE(d, d, 1)
    one.load_state_dict(sae.state_dict())
    kept = torch.tensor([[3.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 4.0]])
    assert torch.allclose(one(x), kept)
    want = 1 - ((x - kept) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert variance_explained(one, x) == pytest.approx(float(want))


def test_config_is_checked():
    with pytest.raises(ValueError, match="at least 1"):
        SaeConfig(layer=0, k=0)
    with pytest.raises(ValueError, match="holdout"):
        SaeConfig(layer=0, holdout=1.0)


def _plain_acts_and_losses(lm, seqs, layer, sae):
    """Per unpadded sequence, with a plain pre-hook on the down-projection: its input (BOS
    left out), and the summed next-token losses clean / spliced / zero-ablated."""
    down = lm.model.model.layers[layer].mlp.down_proj
    acts, sums, count = [], {"clean": 0.0, "spliced": 0.0, "zero": 0.0}, 0
    for ids in seqs.ids:
        t = torch.tensor(np.asarray(ids)[None, :], dtype=torch.long)
        for mode in sums:
            seen = {}

            def hook(module, args, mode=mode):
                seen["x"] = args[0].detach().clone()
                if mode == "spliced":
                    return (sae(args[0]),)
                if mode == "zero":
                    return (torch.zeros_like(args[0]),)
                return None

            h = down.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    logits = lm.model(input_ids=t).logits[0]
            finally:
                h.remove()
            sums[mode] += float(torch.nn.functional.cross_entropy(logits[:-1], t[0, 1:], reduction="sum"))
            if mode == "clean":
                acts.append(seen["x"][0, seqs.first_scored():].numpy())
        count += len(ids) - 1
    return np.concatenate(acts), {k: v / count for k, v in sums.items()}


def test_train_sae_stores_what_an_independent_check_measures(tmp_path, stories260k_path, valid_corpus, lm260k, capsys):
    from precompute.cli import main
    from precompute.corpus import read_text_corpus
    from precompute.sae.tables import load_sae, sae_info
    from precompute.sae.train import split
    from precompute.sequences import tokenize
    from precompute.store.db import open_store
    from precompute.store.queries import list_runs

    url = f"sqlite:///{tmp_path / 'sae.db'}"
    assert main(["train-sae", "--model", str(stories260k_path), "--layer", str(LAYER), "--corpus", str(valid_corpus),
                 "--db", url, "--max-tokens", "4000", "--ctx-len", "128", "--epochs", "2", "--batch-size", "128",
                 "--features", "344", "--k", "16"]) == 0
    out = capsys.readouterr().out
    assert "variance explained" in out and "spliced" in out
    with open_store(url, create=False).session() as s:
        info = sae_info(s, "stories260K", LAYER)
        sae = load_sae(s, "stories260K", LAYER)
        run = list_runs(s, "stories260K", "sae")[0]
    assert (info.d_in, info.n_features, info.k) == (172, 344, 16) and run.summary["variance_explained"] == round(info.variance_explained, 4)
    assert info.curve and info.curve[0][0] == 0
    # the same sequences as the command: tokenised alike, the last 10% held out
    seqs = tokenize(lm260k, read_text_corpus(valid_corpus), ctx_len=128, max_tokens=4000)
    train_seqs, eval_seqs = split(seqs, 0.1)
    x_eval, loss = _plain_acts_and_losses(lm260k, eval_seqs, LAYER, sae)
    assert info.n_eval_tokens == len(x_eval)
    with torch.no_grad():
        rec = sae(torch.from_numpy(x_eval)).numpy()
    ve = 1 - ((x_eval - rec) ** 2).sum() / ((x_eval - x_eval.mean(0)) ** 2).sum()
    assert info.variance_explained == pytest.approx(float(ve), abs=1e-4)
    assert info.clean_loss == pytest.approx(loss["clean"], abs=1e-4)
    assert info.spliced_loss == pytest.approx(loss["spliced"], abs=1e-4)
    assert info.zero_loss == pytest.approx(loss["zero"], abs=1e-4)
    assert info.clean_loss < info.spliced_loss < info.zero_loss and info.variance_explained > 0.3
    # dead features: never active on any training token
    from precompute.sae.train import collect

    xt = collect(lm260k, train_seqs, LAYER)
    assert info.n_train_tokens == len(xt)
    with torch.no_grad():
        fired = (sae.encode(xt) > 0).any(0).numpy()
    assert info.dead_share == pytest.approx(1 - fired.mean())


def test_train_sae_bad_input_is_one_line(tmp_path, stories260k_path, valid_corpus, capsys):
    from precompute.cli import main

    url = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["train-sae", "--model", str(stories260k_path), "--corpus", str(valid_corpus), "--db", url, "--max-tokens", "2000"]
    assert main(args + ["--layer", "9"]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(args + ["--layer", "0", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()
