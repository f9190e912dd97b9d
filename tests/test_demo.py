"""The demo's prompt check: the colour and the motion a clip shows, on synthetic clips whose content is
known (``data.synthetic_clip``), on a flat clip and on the wrong caption."""

import pytest
import torch

from opensora_fast.data import synthetic_clip
from opensora_fast.demo import clip_content, prompt_check


@pytest.mark.parametrize(
    "color,shape,direction",
    [("red", "square", "right"), ("blue", "circle", "left"), ("green", "square", "up"), ("yellow", "circle", "down")],
)
def test_prompt_check_reads_colour_and_direction(color, shape, direction):
    clip = synthetic_clip(color, shape, direction, 17, (32, 32), 0.1).permute(1, 0, 2, 3)  # (T, 3, H, W)
    ok, seen = prompt_check(f"a {color} {shape} moving {direction}", clip)
    assert ok, seen
    assert seen["color"] == color and seen["direction"] == direction
    assert seen["displacement"] == pytest.approx(0.5, abs=0.05)  # the shape crosses half the frame
    other = {"right": "left", "left": "right", "up": "down", "down": "up"}[direction]
    assert not prompt_check(f"a {color} {shape} moving {other}", clip)[0]
    assert not prompt_check(f"a {'blue' if color != 'blue' else 'red'} {shape} moving {direction}", clip)[0]


def test_flat_or_still_clips_fail():
    flat = torch.full((9, 3, 16, 16), 0.2) + 0.002 * torch.randn(
        9, 3, 16, 16, generator=torch.Generator().manual_seed(0)
    )
    ok, seen = prompt_check("a red square moving right", flat)
    assert not ok and seen["color"] is None and seen["fg_fraction"] < 0.01
    still = synthetic_clip("red", "square", "right", 1, (32, 32)).permute(1, 0, 2, 3).repeat(9, 1, 1, 1)
    ok, seen = prompt_check("a red square moving right", still)
    assert not ok and seen["color"] == "red" and seen["displacement"] < 0.01


def test_bad_shape():
    with pytest.raises(ValueError, match=r"video must be \(T, 3, H, W\)"):
        clip_content(torch.zeros(3, 9, 16, 16))
