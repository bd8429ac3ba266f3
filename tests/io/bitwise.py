"""Random bit patterns of any dtype, and bitwise comparison (NaN payloads and -0.0 included)."""

import torch


def random_tensor(dtype, shape, gen=None):
    """Random bit patterns (NaNs, infs, subnormals included) of any dtype, via uint8."""
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a, b):
    return type(a) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
