"""Frame masks for training image / video conditioning, as Open-Sora 1.2's ``mask_ratios``.

Each training sample draws one mask kind with the configured probability (the rest of the probability is
"identity": no conditioning) and gets a (T,) bool mask over its latent frames: True = a frame to
generate (noised, in the loss), False = a conditioning frame (given clean, left out of the loss; the
model sees it through ``x_mask`` and the t0 modulation). ``RFlow.training_losses(mask=...)`` consumes it.

Kinds (T latent frames, q = max(1, T // 4) the most conditioning frames of the "quarter" kinds):

- ``identity``: all True.
- ``image_head`` / ``image_tail`` / ``image_head_tail``: the first / last / both end frames condition.
- ``image_random``: one frame at a random position conditions.
- ``quarter_head`` / ``quarter_tail`` / ``quarter_head_tail``: n ~ U{1..q} frames at the start / end /
  both ends condition.
- ``quarter_random``: a run of n ~ U{1..q} frames at a random position conditions.
- ``intepolate`` (Open-Sora's spelling, kept so its configs load): every other frame conditions, starting
  at frame 0 or 1.
- ``random``: each frame conditions with probability r ~ U(0.1, 0.9).

If no frame is left to generate ("random" by chance, or a head-and-tail kind with T = 2), the last frame
is generated (Open-Sora does so for "random"; its head-and-tail kinds at T = 2 give an empty loss, NaN).
A sample with T = 1 (an image) is never masked. One difference from Open-Sora's ``MaskGenerator``: it uses
q = T // 4, which is 0 for T < 4 latent frames and makes its ``random.randint(1, 0)`` raise; here q >= 1.
Draws come from a ``torch.Generator`` so that training with a per-step seed resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK_KINDS = (
    "identity",
    "quarter_random",
    "quarter_head",
    "quarter_tail",
    "quarter_head_tail",
    "image_random",
    "image_head",
    "image_tail",
    "image_head_tail",
    "random",
    "intepolate",
)

# Open-Sora 1.2 configs/opensora-v1-2/train/stage1.py and stage2.py: 20% of the samples are conditioned.
STAGE1_MASK_RATIOS = {
    "random": 0.05,
    "intepolate": 0.005,
    "quarter_random": 0.005,
    "quarter_head": 0.005,
    "quarter_tail": 0.005,
    "quarter_head_tail": 0.005,
    "image_random": 0.025,
    "image_head": 0.05,
    "image_tail": 0.025,
    "image_head_tail": 0.025,
}
# stage3.py: 25% conditioned, mostly on the first frame (image-to-video).
STAGE3_MASK_RATIOS = {
    "random": 0.01,
    "intepolate": 0.002,
    "quarter_random": 0.002,
    "quarter_head": 0.002,
    "quarter_tail": 0.002,
    "quarter_head_tail": 0.002,
    "image_random": 0.0,
    "image_head": 0.22,
    "image_tail": 0.005,
    "image_head_tail": 0.005,
}
MASK_RATIOS = {"stage1": STAGE1_MASK_RATIOS, "stage2": STAGE1_MASK_RATIOS, "stage3": STAGE3_MASK_RATIOS}


@dataclass
class MaskGenerator:
    """Draws per-sample frame masks with probabilities ``ratios`` (kind -> probability; "identity" gets
    what the others leave when it is not given, and all must then sum to 1)."""

    ratios: dict

    def __post_init__(self):
        ratios = dict(self.ratios)
        bad = sorted(set(ratios) - set(MASK_KINDS))
        if bad:
            raise ValueError(f"mask_ratios: unknown kinds {bad}; expected some of {list(MASK_KINDS)}")
        for k, r in ratios.items():
            if not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
                raise ValueError(f"mask_ratios[{k!r}] must be a probability in [0, 1], got {r!r}")
        if "identity" not in ratios:
            ratios["identity"] = max(0.0, 1.0 - sum(ratios.values()))
        total = sum(ratios.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"mask_ratios must sum to 1 (with 'identity' filling the rest), got {total}")
        self.ratios = ratios
        self._kinds = list(ratios)
        self._probs = torch.tensor([ratios[k] for k in self._kinds], dtype=torch.float64)

    def kinds(self, batch: int, generator: torch.Generator | None = None) -> list[str]:
        """The mask kind of each of ``batch`` samples."""
        idx = torch.multinomial(self._probs, batch, replacement=True, generator=generator)
        return [self._kinds[i] for i in idx.tolist()]

    def masks(self, batch: int, num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, num_frames) bool on the CPU; True = generate, False = condition."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return torch.stack([frame_mask(k, num_frames, generator) for k in self.kinds(batch, generator)])


def _randint(lo: int, hi: int, generator) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def frame_mask(kind: str, num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One (num_frames,) bool mask of ``kind`` (see the module docstring); True = generate."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {list(MASK_KINDS)}")
    T = num_frames
    m = torch.ones(T, dtype=torch.bool)
    if T <= 1 or kind == "identity":
        return m
    q = max(1, T // 4)
    if kind.startswith("image_"):
        n = 1
    elif kind.startswith("quarter_"):
        n = _randint(1, q, generator)
    if kind.endswith("_random") and kind != "random":
        start = _randint(0, T - n, generator)
        m[start : start + n] = False
    elif kind.endswith("_head_tail"):
        m[:n] = False
        m[T - n :] = False
    elif kind.endswith("_head"):
        m[:n] = False
    elif kind.endswith("_tail"):
        m[T - n :] = False
    elif kind == "intepolate":
        m[_randint(0, 1, generator) :: 2] = False
    elif kind == "random":
        r = float(torch.empty(()).uniform_(0.1, 0.9, generator=generator))
        m = torch.rand(T, generator=generator) > r
    if not m.any():  # "random" with bad luck, or *_head_tail with T = 2: the loss needs a frame
        m[-1] = True
    return m
