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


def edge_sample():
    """One tensor of every SAVE_DTYPE (random bits) plus the cases a .bin reader or writer gets wrong: scalars,
    empty tensors, a 3-D one, and names equal to storage keys or to strings in torch's persistent ids, in an
    unsorted order."""
    gen = torch.Generator().manual_seed(0)
    d = {f"t.{str(dt).split('.')[-1]}": random_tensor(dt, (3, 4), gen) for dt in SAVE_DTYPES}
    d["scalar.bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    d["scalar.i64"] = torch.tensor(-7)
    d["scalar.bool"] = torch.tensor(True)
    d["scalar.fp8"] = torch.tensor(0.5).to(torch.float8_e4m3fn)
    d["empty"] = torch.zeros(0, 5, dtype=torch.float16)
    d["empty2"] = torch.zeros(3, 0)
    d["empty.fp8"] = torch.zeros(0).to(torch.float8_e5m2)
    d["ones3d"] = torch.ones(2, 1, 3, dtype=torch.int32)
    d["0"] = torch.arange(5.0)  # a name equal to a storage key
    d["storage"] = torch.arange(3)  # names equal to strings in the persistent ids
    d["cpu"] = torch.arange(2.0)
    d["b"] = torch.zeros(1)  # plan order is not sorted
    d["a"] = torch.zeros(2)
    return d
