"""One test set per architecture family, on tiny random models built from configs (nothing downloaded).

A neuron is the input of the MLP output projection; each family computes it its own way, and
the test recomputes it from the MLP's own input with the family's formula.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig

from precompute.hooks import forward_until, hook_name, hooked, neuron_acts
from precompute.models import ModelError, load_model
from precompute.train import train_tokenizer

TEXTS = ["once upon a time there was a little dog.", "the cat sat on the mat and was happy."] * 20


def _configs():
    common = dict(vocab_size=300, bos_token_id=0, eos_token_id=0)
    return {
        "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, architectures=["GPT2LMHeadModel"], **common),
        "gpt_neo": GPTNeoConfig(
            num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]], window_size=8, architectures=["GPTNeoForCausalLM"], **common
        ),
        "gpt_neox": GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, architectures=["GPTNeoXForCausalLM"], **common
        ),
        "llama": LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            max_position_embeddings=64, architectures=["LlamaForCausalLM"], **common
        ),
    }


def _manual_neurons(family: str, mlp, x):
    if family == "llama":
        return torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    if family == "gpt_neox":
        return mlp.act(mlp.dense_h_to_4h(x))
    return mlp.act(mlp.c_fc(x))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, lowercase=True)


@pytest.fixture(scope="module", params=list(_configs()))
def lm(request, tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _configs()[request.param]
    model = AutoModelForCausalLM.from_config(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.adapter.family == request.param
    return loaded


def _ids(lm):
    return torch.tensor([lm.encode("once upon a time the cat was happy")])


def test_shapes(lm):
    assert lm.n_layers == 2 and lm.n_heads == 4 and lm.d_model == 32
    assert lm.d_mlp == (48 if lm.adapter.family == "llama" else 64)
    assert lm.w_out(0).shape == (lm.d_mlp, lm.d_model)
    assert lm.w_u().shape == (lm.d_model, lm.vocab_size)


def test_neuron_is_input_of_mlp_output_projection(lm):
    ids = _ids(lm)
    got = neuron_acts(lm, ids)
    for layer in range(lm.n_layers):
        mlp = lm.blocks[layer].mlp
        seen = {}
        h = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        try:
            with torch.no_grad():
                lm.model(input_ids=ids)
        finally:
            h.remove()
        torch.testing.assert_close(got[layer], _manual_neurons(lm.adapter.family, mlp, seen["x"]), atol=1e-5, rtol=1e-5)


def test_w_out_is_each_neurons_output_direction(lm):
    proj = lm.mlp_out(1)
    with torch.no_grad():
        basis = torch.eye(lm.d_mlp)
        direct = proj(basis) - proj(torch.zeros(1, lm.d_mlp))
    torch.testing.assert_close(direct, lm.w_out(1), atol=1e-6, rtol=1e-5)


def test_noop_hooks_leave_logits_unchanged_and_are_removed(lm):
    ids = _ids(lm)
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        names = {hook_name(l, p): (lambda x: None) for l in range(2) for p in ("mlp.post", "attn.z")}
        with hooked(lm, names):
            hooked_logits = lm.model(input_ids=ids).logits
    torch.testing.assert_close(hooked_logits, clean)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in lm.model.modules())


def test_zero_head_equals_zeroing_its_output_weights(lm):
    ids = _ids(lm)
    layer, head = 1, 2
    d_head = lm.d_model // lm.n_heads

    def zero(z):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        with hooked(lm, {hook_name(layer, "attn.z"): zero}):
            ablated = lm.model(input_ids=ids).logits
        proj = lm.attn_out(layer)
        saved = proj.weight.detach().clone()
        try:
            cols = slice(head * d_head, (head + 1) * d_head)
            if type(proj).__name__ == "Conv1D":
                proj.weight[cols, :] = 0
            else:
                proj.weight[:, cols] = 0
            edited = lm.model(input_ids=ids).logits
        finally:
            proj.weight.copy_(saved)
    torch.testing.assert_close(ablated, edited, atol=1e-5, rtol=1e-5)


def test_stop_after_skips_later_layers(lm):
    fired = []
    with hooked(lm, {hook_name(1, "mlp.post"): lambda x: fired.append(1)}, stop_after=0):
        assert forward_until(lm, _ids(lm)) is None
    assert fired == []


def test_display_vocab_shows_special_tokens(lm):
    ids = lm.encode("the cat")
    assert ids[0] == lm.bos_id
    strs = lm.token_strs(ids)
    assert strs[0] == "<|endoftext|>"
    assert "".join(strs[1:]) == "the cat"


def test_bad_models_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(ModelError, match="unsupported architecture 'BertForMaskedLM'"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        load_model("./no/such/folder")


def test_layer_and_neuron_checks(lm):
    with pytest.raises(ModelError, match="layer 2 out of range"):
        lm.check_layer(2)
    with pytest.raises(ModelError, match="neuron 9999 out of range"):
        lm.check_neuron(0, 9999)
