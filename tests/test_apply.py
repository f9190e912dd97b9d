"""opensora_fast.apply on a module tree with Open-Sora 1.2's structure (tests/_opensora_like.py)."""

import copy

import pytest
import torch
import torch.nn as nn
from _opensora_like import STDiT3 as OSSTDiT3

import opensora_fast


def _model():
    torch.manual_seed(0)
    m = OSSTDiT3(depth=2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(2, 4, 3, 8, 6, generator=g),
        timestep=torch.tensor([800.0, 150.0]),
        y=torch.randn(2, 1, 8, 64, generator=g),
        mask=torch.tensor([[1] * 6 + [0] * 2, [1] * 3 + [0] * 5]),
        x_mask=torch.tensor([[False, True, True], [True, True, True]]),
        fps=torch.tensor([24.0]),
        height=torch.tensor([64.0]),
        width=torch.tensor([48.0]),
    )


def _run(model, inp, g):
    model.zero_grad()
    out = model(**inp)
    (out * g).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_apply_same_outputs_and_gradients(reference_backend):
    model = _model()
    inp = _inputs()
    g = torch.randn(2, 8, 3, 8, 6, generator=torch.Generator().manual_seed(2))
    before, grads_before = _run(model, inp, g)
    params = {n: p for n, p in model.named_parameters()}
    block_cls = type(model.spatial_blocks[0])

    assert opensora_fast.apply(model) is model
    assert opensora_fast.apply(model) is model  # idempotent
    assert {n: p for n, p in model.named_parameters()} == params  # the very same Parameter objects
    assert type(model.spatial_blocks[0]) is block_cls
    assert model.temporal_blocks[1].forward.__func__.__module__ == "opensora_fast.models.stdit3"

    after, grads_after = _run(model, inp, g)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert set(grads_after) == set(grads_before)
    for n in grads_before:
        torch.testing.assert_close(grads_after[n], grads_before[n], rtol=1e-4, atol=1e-5, msg=n)


def test_apply_survives_deepcopy_and_state_dict(reference_backend):
    model = opensora_fast.apply(_model())
    inp = _inputs()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inp), model(**inp), rtol=0, atol=0)
        clone.spatial_blocks[0].mlp.fc2.bias.add_(1.0)  # the clone's forward uses the clone's weights
        assert not torch.equal(clone(**inp), model(**inp))
    fresh = _model()
    fresh.load_state_dict(model.state_dict())


def test_apply_rejects_other_modules():
    with pytest.raises(TypeError, match="spatial_blocks"):
        opensora_fast.apply(nn.Linear(2, 2))
    model = _model()
    del model.spatial_blocks[0].cross_attn.kv_linear
    with pytest.raises(TypeError, match="kv_linear"):
        opensora_fast.apply(model)
