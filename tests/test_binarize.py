"""Dynamic binarization: a hash of (seed, stream, index, pixel), checked against a pure-Python
MurmurHash3 finaliser, and for the properties training relies on."""

import pytest
import torch

from vae_pipeline.binarize import binarize, fmix32, uniforms

M32 = 0xFFFFFFFF


def _fmix32_reference(h: int) -> int:
    """MurmurHash3's fmix32 with Python's unbounded integers (the published constants)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _uniform_reference(seed: int, stream: int, index: int, pixel: int) -> float:
    key = _fmix32_reference(seed & M32)
    key = _fmix32_reference(key ^ ((stream * 0x9E3779B1) & M32))
    row = _fmix32_reference(key ^ ((index * 0x27D4EB2F) & M32))
    col = _fmix32_reference(pixel ^ 0x165667B1)
    return (_fmix32_reference(row ^ col) >> 8) / 2**24


def test_the_hash_matches_a_pure_python_murmur_finaliser():
    values = [0, 1, 2, 255, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, M32]
    got = fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_fmix32_reference(v) for v in values]
    u = uniforms(7, 3, torch.tensor([0, 5, 60_000]), 4)
    for row, index in enumerate((0, 5, 60_000)):
        for pixel in range(4):
            assert u[row, pixel].item() == _uniform_reference(7, 3, index, pixel)


def test_an_images_draw_depends_on_its_index_not_its_batch_or_rank():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    indices = torch.arange(100, 116)
    whole = binarize(x, "dynamic", seed=3, stream=2, indices=indices)
    # two ranks take rows r::2 of the global batch, as the trainer's sampler does
    for rank in (0, 1):
        part = binarize(x[rank::2], "dynamic", seed=3, stream=2, indices=indices[rank::2])
        torch.testing.assert_close(part, whole[rank::2], rtol=0, atol=0)
    reordered = binarize(x.flip(0), "dynamic", seed=3, stream=2, indices=indices.flip(0))
    torch.testing.assert_close(reordered.flip(0), whole, rtol=0, atol=0)
    # a fresh draw each epoch (stream) and for another seed
    assert not torch.equal(binarize(x, "dynamic", 3, 3, indices), whole)
    assert not torch.equal(binarize(x, "dynamic", 4, 2, indices), whole)


def test_dynamic_draws_are_bernoulli_with_the_pixel_as_probability():
    levels = torch.tensor([0.0, 0.1, 0.3, 128 / 255, 0.9, 1.0])
    x = levels.view(6, 1, 1, 1).expand(6, 1, 200, 200).contiguous()
    draws = binarize(x, "dynamic", seed=0, stream=0)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    means = draws.flatten(1).mean(dim=1)
    # 40,000 draws per level: standard error <= 0.0025
    torch.testing.assert_close(means, levels, rtol=0, atol=0.01)
    assert means[0] == 0.0 and means[-1] == 1.0  # never a 1 from black, always from white
    # neighbouring pixels and neighbouring images are not correlated
    u = uniforms(0, 0, torch.arange(2000), 64)
    pixels = torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]
    images = torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1]
    assert pixels.abs() < 0.1 and images.abs() < 0.1  # 2,000 pairs: noise is about 0.02


def test_fixed_and_none():
    x = torch.tensor([[[[0.2, 0.5, 0.51, 1.0]]]])
    assert binarize(x, "none") is x
    assert binarize(x, "fixed").flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="binarize policy"):
        binarize(x, "stochastic")
