"""Binarization of [0, 1] intensities for the Bernoulli likelihood: none, fixed or dynamic.

Dynamic binarization (the protocol of Salakhutdinov & Murray 2008 and Burda et al. 2016 for
MNIST-like benchmarks) draws every pixel afresh, x_bin ~ Bernoulli(x), each time an image is
seen. Here the draw is a pure function of (seed, stream, image index, pixel): a counter-based
hash (MurmurHash3's 32-bit finaliser) turned into a uniform u, and x_bin = [u < x]. So:
- it does not depend on the batch an image lands in, the rank that computes it or the world
  size (the index is the image's position in its split, not in the batch);
- a run resumed mid-epoch draws exactly what the uninterrupted run drew (no RNG state);
- it runs on the device as a few integer tensor ops, and gives the same bits on CPU and CUDA.
Training uses stream = epoch (a fresh draw per pass); evaluation a fixed stream per split.
"""

from __future__ import annotations

import torch

POLICIES = ("none", "fixed", "dynamic")
MASK32 = 0xFFFFFFFF
# Streams that are not training epochs (epochs count up from 0).
VALIDATION_STREAM = 2**31 - 1
TEST_STREAM = 2**31 - 2


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding values below 2^32, without int64 overflow:
    the constant is split into 16-bit halves, so no partial product reaches 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors of values in [0, 2^32): a bijection
    whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """`fmix32` on one Python int (the same bits): keys derived from scalars stay on the host,
    so no tensor is built and copied to the device per step."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def uniforms(seed: int, stream: int, indices: torch.Tensor, pixels: int) -> torch.Tensor:
    """Uniforms in [0, 1), shape (len(indices), pixels): row i is a function of (seed, stream,
    indices[i]) alone; 24 bits each (exact in float32)."""
    key = fmix32_int(seed & MASK32)
    key = fmix32_int(key ^ (((stream & MASK32) * 0x9E3779B1) & MASK32))
    rows = fmix32(key ^ _mul32(indices.to(torch.int64) & MASK32, 0x27D4EB2F))
    cols = fmix32(torch.arange(pixels, dtype=torch.int64, device=indices.device) ^ 0x165667B1)
    bits = fmix32(rows.unsqueeze(1) ^ cols.unsqueeze(0))
    return (bits >> 8).to(torch.float32) * (1.0 / 2**24)


def binarize(
    x: torch.Tensor,
    policy: str,
    seed: int = 0,
    stream: int = 0,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `policy` to intensities x in [0, 1], shape (batch, C, H, W): none (x itself),
    fixed (x > 0.5) or dynamic (Bernoulli(x), keyed by seed, stream and each image's index in
    its split; `indices` defaults to 0..batch-1)."""
    if policy == "none":
        return x
    if policy == "fixed":
        return (x > 0.5).to(x.dtype)
    if policy != "dynamic":
        raise ValueError(f"binarize policy must be one of {POLICIES}, got {policy!r}")
    if indices is None:
        indices = torch.arange(x.shape[0], device=x.device)
    if indices.device != x.device:
        indices = indices.to(x.device)
    u = uniforms(seed, stream, indices, x[0].numel()).view_as(x)
    return (u < x).to(x.dtype)
