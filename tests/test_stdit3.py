"""STDiT3 on opensora_fast's kernels vs an independent Open-Sora-structured copy (tests/_opensora_like.py)."""

import copy
import json
import os

import pytest
import torch
from _close import assert_close_to_fp64
from _opensora_like import STDiT3 as OSSTDiT3

from opensora_fast.models.stdit3 import STDiT3, STDiT3Config

B, T, H, W, L, D_TXT = 2, 3, 8, 11, 8, 64  # 4 x 6 patches; W = 11 is padded to 12 and cropped back


def _pair(seed=0, depth=1):
    """(Open-Sora-structured model, ours) with the same random weights, biases non-zero."""
    torch.manual_seed(seed)
    ref = OSSTDiT3(depth=depth)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ours = STDiT3(STDiT3Config.tiny(depth=depth))
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _inputs(seed=1, x_mask=True):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(B, 4, T, H, W, generator=g),
        timestep=torch.tensor([937.0, 312.0]),
        y=torch.randn(B, 1, L, D_TXT, generator=g),
        mask=torch.tensor([[1] * 5 + [0] * 3, [1] * 8]),
        x_mask=torch.tensor([[True, False, True], [False, True, True]]) if x_mask else None,
        fps=torch.tensor([24.0]),
        height=torch.tensor([64.0]),
        width=torch.tensor([88.0]),
    )


def test_xl2_parameter_count_and_names():
    with torch.device("meta"):
        m = STDiT3(STDiT3Config.xl_2())
    assert sum(p.numel() for p in m.parameters()) == 1_207_643_972
    sd = m.state_dict()
    for k, shape in {
        "spatial_blocks.27.attn.qkv.weight": (3456, 1152),
        "spatial_blocks.0.attn.q_norm.weight": (72,),
        "temporal_blocks.27.cross_attn.q_linear.weight": (1152, 1152),
        "temporal_blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
        "temporal_blocks.3.mlp.fc1.weight": (4608, 1152),
        "spatial_blocks.5.scale_shift_table": (6, 1152),
        "t_block.1.weight": (6912, 1152),
        "y_embedder.y_proj.fc1.weight": (1152, 4096),
        "y_embedder.y_embedding": (300, 4096),
        "rope.freqs": (36,),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.scale_shift_table": (2, 1152),
        "fps_embedder.mlp.2.weight": (1152, 1152),
        "x_embedder.proj.weight": (1152, 4, 1, 2, 2),
    }.items():
        assert tuple(sd[k].shape) == shape, k
    assert "spatial_blocks.28.attn.qkv.weight" not in sd
    assert not any("cached" in k or "inv_freq" in k for k in sd)


@pytest.mark.parametrize("with_x_mask", [False, True])
def test_matches_opensora_structure(reference_backend, with_x_mask):
    ref, ours = _pair()
    inp = _inputs(x_mask=with_x_mask)
    with torch.no_grad():
        a, b = ref(**inp), ours(**inp)
    assert b.shape == (B, 8, T, H, W) and b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_velocity_only_and_t0_skip(reference_backend):
    _, ours = _pair()
    inp = _inputs()
    with torch.no_grad():
        full = ours(**inp)
        vel = ours(**inp, velocity_only=True)
        assert vel.shape == (B, 4, T, H, W)
        assert torch.equal(vel, full[:, :4])
        inp["x_mask"] = torch.ones(B, T, dtype=torch.bool)
        all_true = ours(**inp)
        inp["x_mask"] = None
        none = ours(**inp)
    assert torch.equal(all_true, none)
    assert not torch.equal(full, none)  # the conditioning frames do change the output


def test_text_kv_cache_identical_and_invalidated(reference_backend):
    _, ours = _pair(depth=2)
    inp = _inputs(x_mask=False)
    inp2 = dict(inp, y=inp["y"] + 0.5)
    with torch.no_grad():
        plain, plain2 = ours(**inp), ours(**inp2)
        with ours.text_kv_cache():
            c1 = ours(**inp)
            key = ours._text_key
            c2 = ours(**dict(inp, timestep=inp["timestep"]))
            assert ours._text_key is key  # the same encoding was reused
            assert all(b.cross_attn.kv_cache[0] is key for b in ours.spatial_blocks)
            c3 = ours(**inp2)
            assert ours._text_key is not key
        assert ours._text_key is None and ours.spatial_blocks[0].cross_attn.kv_cache is None
    assert torch.equal(c1, plain) and torch.equal(c2, plain) and torch.equal(c3, plain2)


def test_kernel_path_vs_fp64(triton_backend, monkeypatch):
    """Forward and every parameter gradient: Triton kernels (interpreter on CPU) vs the fp64 oracle,
    judged against the fp32 reference path's error."""
    ref, ours = _pair()
    # one sample (interpreter cost), odd W, a conditioning frame, 5 of 8 text tokens
    inp = {k: (v[1:] if k in ("x", "timestep", "y", "x_mask") else v) for k, v in _inputs().items()}
    inp["x"] = inp["x"][..., :6, :5]
    inp["mask"] = inp["mask"][:1]
    g = torch.randn(1, 8, T, 6, 5, generator=torch.Generator().manual_seed(5))

    def run(model):
        model.zero_grad()
        out = model(**inp)
        (out * g).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_k, grads_k = run(ours)
    monkeypatch.setenv("OPENSORA_FAST_BACKEND", "reference")
    out_r, grads_r = run(ours)
    out_64, grads_64 = run(copy.deepcopy(ref).double())
    assert_close_to_fp64(out_k, out_r, out_64, name="output")
    assert set(grads_k) == set(grads_64)
    for n in grads_64:
        assert_close_to_fp64(grads_k[n], grads_r[n], grads_64[n], name=f"grad {n}")


def test_gradient_checkpointing_same_grads(reference_backend):
    _, ours = _pair(depth=2)
    ours.train()
    ours.config.class_dropout_prob = 0.0
    ours.y_embedder.uncond_prob = 0.0
    inp = _inputs()

    def grads(ckpt):
        ours.config.grad_checkpoint = ckpt
        ours.zero_grad()
        ours(**inp).square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_model_and_autocast(reference_backend):
    ref, ours = _pair()
    inp = _inputs()
    with torch.no_grad():
        out64 = copy.deepcopy(ref).double()(**inp)
        out_os_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(**inp)
        out_bf16 = copy.deepcopy(ours).to(torch.bfloat16)(**inp)
    assert out_bf16.dtype == torch.float32
    assert_close_to_fp64(out_bf16, out_os_bf16, out64, name="bf16 model", factor=3.0)
    ours.train()
    ours.y_embedder.uncond_prob = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(**inp)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    assert (out - out64).abs().max() < 0.1 * out64.abs().max()


def test_class_dropout_uses_null_caption(reference_backend):
    _, ours = _pair()
    ours.train()
    inp = _inputs(x_mask=False)
    ours.y_embedder.uncond_prob = 1.0  # every caption replaced by y_embedding
    inp["mask"] = None
    inp["y"] = torch.randn(B, 1, L, D_TXT)
    dropped = ours(**inp)
    inp["y"] = ours.y_embedder.y_embedding[None, None].repeat(B, 1, 1, 1)
    ours.y_embedder.uncond_prob = 0.0
    torch.testing.assert_close(ours(**inp), dropped)
    with pytest.raises(ValueError, match="y must have shape"):
        ours(**dict(inp, y=torch.randn(B, 1, L - 1, D_TXT)))


def test_checkpoint_round_trip(tmp_path, reference_backend):
    from safetensors.torch import save_file

    ref, ours = _pair()
    inp = _inputs()
    with torch.no_grad():
        want = ours(**inp)
    # directory with config.json (Open-Sora field names + HF extras) and safetensors of the Open-Sora copy
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = dict(hidden_size=48, num_heads=2, depth=1, caption_channels=64, model_max_length=8)
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["STDiT3"], "model_type": "STDiT3"}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(d / "model.safetensors"))
    loaded = STDiT3.from_pretrained(str(d)).eval()
    assert loaded.config.extra["model_type"] == "STDiT3"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp), want, rtol=0, atol=0)
    # a torch file, wrapped as training scripts save it
    pt = tmp_path / "ema.pt"
    torch.save({"model": {"module." + k: v for k, v in ref.state_dict().items()}}, pt)
    loaded = STDiT3.from_pretrained(str(pt), config=STDiT3Config.tiny()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp), want, rtol=0, atol=0)
    # mismatches are all named
    sd = ref.state_dict()
    sd.pop("final_layer.linear.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["t_block.1.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        STDiT3.from_pretrained(str(tmp_path / "bad.pt"), config=STDiT3Config.tiny())
    msg = str(e.value)
    assert "final_layer.linear.bias" in msg and "extra.weight" in msg and "t_block.1.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg
    assert not os.path.exists(tmp_path / "bad.pt.json")


def test_forward_requires_size_arguments():
    _, ours = _pair()
    inp = _inputs()
    inp.pop("fps")
    with pytest.raises(ValueError, match="fps, height and width"):
        ours(**inp)


@pytest.mark.gpu
def test_xl_width_bf16_kernels_gpu():
    """XL/2 widths (C 1152, 16 heads of 72, 4096-dim captions of 300 tokens), depth 2, a 240p-like
    latent (5 x 30 x 54 -> 405 tokens per frame), bf16 kernels vs the bf16 Open-Sora structure, both
    judged against its fp64 run; forward and the gradients of every block parameter."""
    torch.manual_seed(0)
    ref = OSSTDiT3(hidden_size=1152, depth=2, num_heads=16, caption_channels=4096, token_num=300)
    ours = STDiT3(STDiT3Config.xl_2(depth=2))
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.cuda().eval(), ours.cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    inp = dict(
        x=torch.randn(2, 4, 5, 30, 54, device="cuda", generator=g),
        timestep=torch.tensor([937.0, 312.0], device="cuda"),
        y=torch.randn(2, 1, 300, 4096, device="cuda", generator=g) * 0.2,
        mask=torch.cat([torch.ones(2, 40), torch.zeros(2, 260)], 1).long().cuda(),
        x_mask=torch.tensor([[False, True, True, True, True], [True] * 5], device="cuda"),
        fps=torch.tensor([24.0], device="cuda"),
        height=torch.tensor([240.0], device="cuda"),
        width=torch.tensor([432.0], device="cuda"),
    )
    inp["mask"][1, 40:120] = 1
    go = torch.randn(2, 8, 5, 30, 54, device="cuda", generator=g)

    def run(model):
        model.zero_grad()
        out = model(**inp)
        (out * go).sum().backward()
        grads = {
            n: p.grad.float().clone()
            for n, p in model.named_parameters()
            if "blocks" in n and p.grad is not None
        }
        return out.detach(), grads

    out_k, gk = run(copy.deepcopy(ours).to(torch.bfloat16))
    out_r, gr = run(copy.deepcopy(ref).to(torch.bfloat16))
    out_64, g64 = run(copy.deepcopy(ref).double())
    assert_close_to_fp64(out_k, out_r, out_64, name="output", factor=3.0)
    for n in g64:
        assert_close_to_fp64(gk[n], gr[n], g64[n], name=f"grad {n}", factor=3.0, atol=3e-2)
