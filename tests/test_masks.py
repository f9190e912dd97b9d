"""Frame masks for image/video conditioning (Open-Sora 1.2's mask_ratios)."""

import pytest
import torch

from opensora_fast.masks import MASK_KINDS, MASK_RATIOS, STAGE1_MASK_RATIOS, MaskGenerator, frame_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cond(m):
    """Indices of the conditioning frames (mask False)."""
    return (~m).nonzero().flatten().tolist()


@pytest.mark.parametrize("T", [4, 9, 15, 30])
def test_each_kind_conditions_the_frames_it_names(T):
    q = T // 4
    for seed in range(20):
        g = _gen(seed)
        assert _cond(frame_mask("identity", T, g)) == []
        assert _cond(frame_mask("image_head", T, g)) == [0]
        assert _cond(frame_mask("image_tail", T, g)) == [T - 1]
        assert _cond(frame_mask("image_head_tail", T, g)) == [0, T - 1]
        assert len(_cond(frame_mask("image_random", T, g))) == 1
        c = _cond(frame_mask("quarter_head", T, g))
        assert 1 <= len(c) <= q and c == list(range(len(c)))
        c = _cond(frame_mask("quarter_tail", T, g))
        assert 1 <= len(c) <= q and c == list(range(T - len(c), T))
        c = _cond(frame_mask("quarter_head_tail", T, g))
        n = len(c) // 2
        assert 1 <= n <= q and c == list(range(n)) + list(range(T - n, T))
        c = _cond(frame_mask("quarter_random", T, g))
        assert 1 <= len(c) <= q and c == list(range(c[0], c[0] + len(c)))  # one contiguous run
        c = _cond(frame_mask("intepolate", T, g))
        assert c in (list(range(0, T, 2)), list(range(1, T, 2)))
        m = frame_mask("random", T, g)
        assert m.dtype == torch.bool and m.shape == (T,) and m.any()


def test_random_positions_and_sizes_vary():
    T = 16
    starts = {_cond(frame_mask("image_random", T, _gen(s)))[0] for s in range(200)}
    sizes = {len(_cond(frame_mask("quarter_head", T, _gen(s)))) for s in range(200)}
    assert starts == set(range(T)) and sizes == {1, 2, 3, 4}
    # each frame conditions with probability r ~ U(0.1, 0.9): fractions spread over about [0.1, 0.9]
    fractions = torch.tensor([float((~frame_mask("random", 256, _gen(s))).float().mean()) for s in range(200)])
    assert 0.02 < fractions.min() < 0.2 and 0.8 < fractions.max() < 0.98
    assert abs(fractions.mean() - 0.5) < 0.07


def test_short_clips_and_images():
    for kind in MASK_KINDS:
        assert frame_mask(kind, 1, _gen(0)).tolist() == [True]  # an image is never conditioned
        for T in (2, 3):  # Open-Sora's T // 4 = 0 would raise here; we condition 1 frame at most
            for s in range(10):
                m = frame_mask(kind, T, _gen(s))
                assert m.any(), (kind, T)  # at least one frame left for the loss


def test_generator_draws_kinds_with_the_configured_probabilities():
    gen = MaskGenerator(dict(STAGE1_MASK_RATIOS))
    assert gen.ratios["identity"] == pytest.approx(0.8)
    n = 40000
    kinds = gen.kinds(n, _gen(3))
    for k, p in gen.ratios.items():
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(kinds.count(k) / n - p) < 5 * sd + 1e-4, k
    masks = gen.masks(8, 15, _gen(4))
    assert masks.shape == (8, 15) and masks.dtype == torch.bool
    assert torch.equal(masks, gen.masks(8, 15, _gen(4)))  # seeded: training resumes exactly
    assert (MaskGenerator({"image_head": 1.0}).masks(5, 6, _gen(0)) == frame_mask("image_head", 6)).all()


def test_stage_ratios_are_open_soras():
    assert sum(STAGE1_MASK_RATIOS.values()) == pytest.approx(0.2)
    assert sum(MASK_RATIOS["stage3"].values()) == pytest.approx(0.25)
    assert MASK_RATIOS["stage3"]["image_head"] == 0.22 and MASK_RATIOS["stage2"] == STAGE1_MASK_RATIOS


@pytest.mark.parametrize(
    "ratios,match",
    [
        ({"head": 0.1}, "unknown kinds"),
        ({"random": 1.5}, r"mask_ratios\['random'\]"),
        ({"random": 0.7, "image_head": 0.6}, "sum to 1"),
        ({"identity": 0.5, "random": 0.1}, "sum to 1"),
    ],
)
def test_bad_ratios_are_named(ratios, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(ratios)
    with pytest.raises(ValueError, match="unknown mask kind"):
        frame_mask("head", 5)
