"""Reads a tessera checkpoint directory with h5py and checks every tensor
against the formulas the C++ test wrote it with (values_of below, written out
independently of tessera). Exit 0: all equal; 77: h5py/numpy missing (skip);
anything else: a failure, printed.

Both formats: version 1 stores every piece as a 1-D dataset, a flat range
[offset, offset + numel) of the tensor; version 2 stores a piece as the box
[offsets, offsets + sizes) of the tensor narrowed to the flat range
[flat_offset, flat_offset + numel) of the box, as an N-D dataset of the box's
shape when the whole box is held, else 1-D. Each piece is placed by
computing the global indices of its elements with numpy (not with tessera's
code), and the dataset attributes are checked against the index.

Arguments: the checkpoint directory, the plugin directory, the minimum
number of tensors that must be checked, and optionally a safetensors file:
then the expected values are that file's tensors by name instead of the
formulas (tensors it lacks are not checked), for a checkpoint of a real
training run, e.g. a tensor-parallel one whose qkv rows are stored as three
row blocks per tp rank.

The zstd filter (32015) comes from hdf5plugin when it has one (the PyPI
wheel does; Debian's python3-hdf5plugin does not), else from tessera's own
plugin directory (argv[2]). When the `zstandard` module is present, every
chunk is also read raw and decompressed with it, independently of HDF5's
filter pipeline.
"""
import json
import os
import sys

try:
    import h5py
    import numpy as np
except ImportError as e:
    print(f"SKIP: python3 cannot import h5py/numpy ({e}); install python3-h5py python3-numpy")
    sys.exit(77)

decoder = None
try:
    import hdf5plugin  # noqa: F401  (registers its filters on import)
    if h5py.h5z.filter_avail(32015):
        decoder = "hdf5plugin"
except ImportError:
    pass
if decoder is None:
    h5py.h5pl.prepend(sys.argv[2].encode())
    decoder = "tessera plugin (" + sys.argv[2] + ")"
print("zstd decoder:", decoder)


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """name -> flat numpy array, parsed with struct/json (not tessera's reader)."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        begin, end = h["data_offsets"]
        out[name] = np.frombuffer(body[begin:end], dtype=SAFETENSORS_DTYPES[h["dtype"]]).copy()
    return out


EXPECTED = read_safetensors(sys.argv[4]) if len(sys.argv) > 4 else None


def values_of(name, n):
    if EXPECTED is not None:
        return EXPECTED.get(name)
    i = np.arange(n, dtype=np.float64)
    if name == "model/f32":
        return (i * 0.25 - 1.5).astype(np.float32)
    if name == "model/f64":
        return i / 3.0
    if name == "model/bf16":   # raw bits: the top half of the float32
        return ((i - 8) * 0.5).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16)
    if name == "model/f16":
        return (i * 0.125 - 1).astype(np.float16)
    if name == "optim/i64":
        return np.arange(n, dtype=np.int64) * 1000000007 - 5
    if name == "optim/i32":
        return np.arange(n, dtype=np.int32) * -3
    if name == "optim/u8":
        return ((np.arange(n) * 7) % 256).astype(np.uint8)
    if name == "model/big":
        return ((np.arange(n) % 1000) * 0.5 - 7).astype(np.float32)
    if name == "model/wide":    # 2 rows of 1.1M: two chunks per row
        return ((np.arange(n) % 1000) * 0.5 - 7).astype(np.float32)
    if name == "model/w2d":     # sliced along dim 1 and flat ranges of a box
        return (i * 0.75 - 9).astype(np.float32)
    if name == "optim/cube":    # a 3-D box whose rows are not contiguous
        return np.arange(n, dtype=np.int32) * 7 - 100
    return None


def piece_slice(p, shape, version):
    """(box offsets, box sizes, flat offset, numel) of an index piece."""
    if version == 1:
        return [0] * len(shape), list(shape), p["offset"], p["numel"]
    return p["offsets"], p["sizes"], p["flat_offset"], p["numel"]


def global_indices(shape, offsets, sizes, flat_offset, numel):
    """Row-major indices in the whole tensor of a slice's elements, in its order."""
    ids = np.arange(int(np.prod(shape)) if shape else 1).reshape(shape if shape else ())
    box = ids[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] if shape else ids.reshape(1)
    return box.reshape(-1)[flat_offset:flat_offset + numel]


def raw_chunks(d, data, filters, zstd):
    """The dataset decoded chunk by chunk with the zstandard module."""
    chunks = d.chunks
    size = data.dtype.itemsize
    padded_shape = [-(-n // c) * c for n, c in zip(d.shape, chunks)]
    out = np.zeros(padded_shape, dtype=data.dtype)
    import itertools
    for start in itertools.product(*[range(0, n, c) for n, c in zip(d.shape, chunks)]):
        _, frame = d.id.read_direct_chunk(start)
        plain = np.frombuffer(zstd.decompress(frame), dtype=np.uint8)
        count = int(np.prod(chunks))
        if h5py.h5z.FILTER_SHUFFLE in filters:  # byte b of element i at b * count + i
            plain = plain.reshape(size, count).T.reshape(-1)
        out[tuple(slice(s, s + c) for s, c in zip(start, chunks))] = plain.view(data.dtype).reshape(chunks)
    return out[tuple(slice(0, n) for n in d.shape)]


def main():
    ckpt = sys.argv[1]
    with open(os.path.join(ckpt, "index.json")) as f:
        index = json.load(f)
    checked = 0
    raw_checked = 0
    zstd = None
    try:
        import zstandard
        zstd = zstandard.ZstdDecompressor()
    except ImportError:
        print("python zstandard missing: raw chunks not decoded independently")
    for name, t in index["tensors"].items():
        n = int(np.prod(t["shape"])) if t["shape"] else 1
        expected = values_of(name, n)
        if expected is None:
            continue
        got = np.zeros(n, dtype=expected.dtype)
        version = index["format_version"]
        for p in t["pieces"]:
            offsets, sizes, flat_offset, numel = piece_slice(p, t["shape"], version)
            whole_box = flat_offset == 0 and numel == int(np.prod(sizes))
            with h5py.File(os.path.join(ckpt, p["file"]), "r") as f:
                d = f[p["dataset"]]
                assert d.attrs["dtype"] == t["dtype"], (name, d.attrs["dtype"], t["dtype"])
                assert list(d.attrs["global_shape"]) == t["shape"]
                if version == 1:
                    assert int(d.attrs["offset"]) == p["offset"]
                    assert d.shape == (numel,), (name, d.shape)
                else:
                    assert list(d.attrs["box_offsets"]) == offsets and list(d.attrs["box_sizes"]) == sizes, name
                    assert int(d.attrs["flat_offset"]) == flat_offset and int(d.attrs["numel"]) == numel, name
                    want = tuple(sizes) if whole_box and sizes else (1,) if whole_box else (numel,)
                    assert d.shape == want, (name, d.shape, want)
                data = d[()]
                got[global_indices(t["shape"], offsets, sizes, flat_offset, numel)] = data.reshape(-1).view(expected.dtype)
                dcpl = d.id.get_create_plist()
                filters = [dcpl.get_filter(k)[0] for k in range(dcpl.get_nfilters())]
                if zstd is not None and filters and filters[-1] == 32015:
                    flat = raw_chunks(d, data, filters, zstd)
                    assert np.array_equal(flat.view(np.uint8), data.view(np.uint8)), name + ": raw zstd decode differs"
                    raw_checked += 1
        if not np.array_equal(got.view(np.uint8), expected.view(np.uint8)):
            bad = np.nonzero(got != expected)[0][:5]
            print(f"FAIL {name}: first differing elements {bad}: got {got[bad]}, expected {expected[bad]}")
            return 1
        checked += 1
    print(f"OK: {checked} tensors equal to their formulas (format {index['format_version']}), "
          f"{raw_checked} pieces also decoded chunk by chunk with zstandard")
    return 0 if checked >= int(sys.argv[3] if len(sys.argv) > 3 else 8) else 1


sys.exit(main())
