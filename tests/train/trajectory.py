"""Comparing two trainings that should follow the same trajectory up to float rounding."""

from __future__ import annotations

import torch


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def assert_same_trajectory(
    start: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rel: float = 1e-2
) -> float:
    """`a` and `b` (flat weights after training from `start`) differ by less than `rel` of the
    distance they travelled. Elementwise tolerances do not fit Adam: a weight whose gradient is
    mostly rounding noise moves by about lr per step in a direction the noise picks, so kernels
    that round differently (another CPU's vector units, another batch shape, a fused optimizer)
    leave a few weights about lr apart while the trajectory is the same. A wrong or unsynced
    gradient moves the weights as far as training does."""
    start, a, b = start.double(), a.double(), b.double()
    moved = torch.linalg.vector_norm(b - start).item()
    apart = torch.linalg.vector_norm(a - b).item()
    assert moved > 0, "the weights did not move: nothing was compared"
    ratio = apart / moved
    print(f"apart by {ratio:.3g} of the distance travelled")
    assert ratio < rel, f"the runs are {ratio:.3g} of the distance travelled apart (< {rel})"
    return ratio
