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


#: Every dtype torch.save can store (the ones this torch has), for .bin round-trip tests.
SAVE_DTYPES = [getattr(torch, n) for n in (
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "bool") if isinstance(getattr(torch, n, None), torch.dtype)]
