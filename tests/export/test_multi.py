"""Several adapters on one base: switching and mixed-adapter batches in one forward pass.

References are computed the independent way: a fresh base model per adapter with the native
``load_adapter`` (SVDLoRALinear layers), run on the whole batch; example ``b`` of a mixed batch
must equal row ``b`` of the reference of its own adapter.
"""

from __future__ import annotations

import pytest
import torch

from adarank.export import MultiAdapterModel
from adarank.export.multi_layers import MultiAdapterLinear
from adarank.modules import load_adapter, save_adapter

ADAPTERS = {  # name -> (seed, rank, modules_to_save)
    "a": (1, 4, ("classifier",)),
    "b": (2, 2, None),
    "c": (3, 6, ("bert.pooler", "classifier")),  # BertPooler: a non-Linear saved module
}


@pytest.fixture
def bert_adapters(make_adapted, make_base, tmp_path):
    """Save three different BERT adapters; return ``{name: (dir, reference model)}``."""
    out = {}
    for name, (seed, rank, saved) in ADAPTERS.items():
        model = make_adapted("bert", seed, rank=rank, saved=saved, shift=(name == "a"))
        save_adapter(model, tmp_path / name)
        ref = make_base("bert")
        load_adapter(ref, tmp_path / name)
        out[name] = (tmp_path / name, ref.eval())
    return out


def _server(make_base, adapters, **kwargs) -> MultiAdapterModel:
    server = MultiAdapterModel(make_base("bert"), **kwargs).eval()
    for name, (directory, _) in adapters.items():
        server.load_adapter(name, directory)
    return server


@pytest.mark.parametrize("mode", ["gather", "group"])
def test_mixed_batch_equals_single_adapter_forwards(
    mode, bert_adapters, make_base, token_batch, logits
):
    server = _server(make_base, bert_adapters, mixed_mode=mode)
    ids = token_batch(batch=7, seq=9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding must stay per example
    plan = ["a", "b", None, "c", "a", "c", "b"]
    refs = {n: logits(m, ids, attention_mask=mask) for n, (_, m) in bert_adapters.items()}
    refs[None] = logits(make_base("bert"), ids, attention_mask=mask)
    mixed = logits(server, ids, attention_mask=mask, adapter_ids=plan)
    for b, name in enumerate(plan):
        torch.testing.assert_close(mixed[b], refs[name][b], atol=1e-5, rtol=1e-5)
    # the adapters really differ, so the test can tell them apart
    assert not torch.allclose(refs["a"], refs["b"], atol=1e-3)
    assert not torch.allclose(refs["c"], refs[None], atol=1e-3)


def test_switching_gives_each_adapters_outputs_and_keeps_base(
    bert_adapters, make_base, token_batch, logits
):
    server = _server(make_base, bert_adapters)
    base_state = {k: v.clone() for k, v in make_base("bert").state_dict().items()}
    ids = token_batch(batch=3, seq=8)
    for name in ["a", "c", "b", "a", None]:
        server.set_active_adapter(name)
        assert server.active_adapter == name
        ref = bert_adapters[name][1] if name else make_base("bert")
        torch.testing.assert_close(logits(server, ids), logits(ref, ids), atol=1e-5, rtol=1e-5)
    # no merged weights: the base parameters are bit-identical to a fresh base
    for key, value in server.model.state_dict().items():
        plain = key.replace(".base_layer.", ".").replace(".base_module.", ".")
        assert torch.equal(value, base_state[plain]), key
    server.delete_adapter("a")
    assert server.adapter_names == ["b", "c"] and server.active_adapter is None
    server.set_active_adapter("c")
    torch.testing.assert_close(
        logits(server, ids), logits(bert_adapters["c"][1], ids), atol=1e-5, rtol=1e-5
    )


def test_gpt2_conv1d_mixed_batch(make_adapted, make_base, token_batch, logits, tmp_path):
    server = MultiAdapterModel(make_base("gpt2")).eval()
    refs = {}
    for name, seed in [("x", 1), ("y", 2)]:
        save_adapter(make_adapted("gpt2", seed, shift=(name == "x")), tmp_path / name)
        server.load_adapter(name, tmp_path / name)
        ref = make_base("gpt2")
        load_adapter(ref, tmp_path / name)
        refs[name] = ref.eval()
    ids = token_batch(batch=4, seq=10)
    plan = ["y", "x", "x", "y"]
    mixed = logits(server, ids, adapter_ids=plan)
    for b, name in enumerate(plan):
        torch.testing.assert_close(mixed[b], logits(refs[name], ids)[b], atol=1e-5, rtol=1e-5)
    assert isinstance(server.model.transformer.h[0].attn.c_attn, MultiAdapterLinear)
    # route() also covers calls that bypass forward, e.g. greedy generation with a KV cache
    prompt = ids[:, :5]
    with server.route(plan):
        generated = server.model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for b, name in enumerate(plan):
        ref = refs[name].generate(
            prompt[b : b + 1], max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        assert torch.equal(generated[b], ref[0])


def test_unknown_or_bad_adapter_names_are_clear_errors(bert_adapters, make_base, token_batch):
    server = _server(make_base, bert_adapters)
    with pytest.raises(
        ValueError, match=r"unknown adapter 'zzz'; loaded adapters: \['a', 'b', 'c'\]"
    ):
        server.set_active_adapter("zzz")
    with pytest.raises(ValueError, match="unknown adapter 'q'"):
        server(input_ids=token_batch(batch=2), adapter_ids=["a", "q"])
    with pytest.raises(TypeError, match="one adapter name"):
        server(input_ids=token_batch(batch=2), adapter_ids="a")
    with pytest.raises(ValueError, match="batch has 3 examples"):
        server(input_ids=token_batch(batch=2), adapter_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="already loaded"):
        server.load_adapter("a", bert_adapters["a"][0])
    with pytest.raises(ValueError, match="without '.'"):
        server.load_adapter("a.b", bert_adapters["a"][0])


def test_adapter_for_another_base_is_rejected(bert_adapters, make_base, make_tiny_bert):
    wider = MultiAdapterModel(make_tiny_bert(0, hidden_size=48, num_labels=3))
    with pytest.raises(ValueError, match="shape mismatch for layer 'bert.encoder"):
        wider.load_adapter("a", bert_adapters["a"][0])
    assert wider.adapter_names == []
    gpt2 = MultiAdapterModel(make_base("gpt2"))
    with pytest.raises(ValueError, match="does not have"):
        gpt2.load_adapter("a", bert_adapters["a"][0])
    with pytest.raises(ValueError, match="already has adarank adapter layers"):
        MultiAdapterModel(bert_adapters["a"][1])


def test_adapter_trained_on_other_base_weights_is_rejected(bert_adapters, make_base):
    """Same shapes, different weights: the recorded base fingerprint catches it before any
    module is wrapped; ``check_base=False`` opts out."""
    base = make_base("bert")
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.weight.mul_(1.01)
    server = MultiAdapterModel(base)
    with pytest.raises(ValueError, match=r"trained on other base weights: 1 of \d+ adapted"):
        server.load_adapter("b", bert_adapters["b"][0])
    assert server.adapter_names == []
    assert not any(isinstance(m, MultiAdapterLinear) for m in base.modules())
    server.load_adapter("b", bert_adapters["b"][0], check_base=False)
    assert server.adapter_names == ["b"]
    # the original base accepts the shifted adapter (its shift is served as extra triplets)
    MultiAdapterModel(make_base("bert")).load_adapter("a", bert_adapters["a"][0])
