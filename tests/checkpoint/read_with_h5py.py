"""Reads a tessera checkpoint directory with h5py and checks every tensor
against the formulas the C++ test wrote it with (values_of below, written out
independently of tessera). Exit 0: all equal; 77: h5py/numpy missing (skip);
anything else: a failure, printed.

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


def values_of(name, n):
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
    return None


def main():
    ckpt = sys.argv[1]
    with open(os.path.join(ckpt, "index.json")) as f:
        index = json.load(f)
    checked = 0
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
        for p in t["pieces"]:
            with h5py.File(os.path.join(ckpt, p["file"]), "r") as f:
                d = f[p["dataset"]]
                assert d.attrs["dtype"] == t["dtype"], (name, d.attrs["dtype"], t["dtype"])
                assert int(d.attrs["offset"]) == p["offset"]
                assert list(d.attrs["global_shape"]) == t["shape"]
                data = d[()]
                got[p["offset"]:p["offset"] + p["numel"]] = data.view(expected.dtype)
                dcpl = d.id.get_create_plist()
                filters = [dcpl.get_filter(k)[0] for k in range(dcpl.get_nfilters())]
                if zstd is not None and filters and filters[-1] == 32015:
                    chunk = d.chunks[0]
                    size = data.dtype.itemsize
                    raw = []
                    for c in range((p["numel"] + chunk - 1) // chunk):
                        _, frame = d.id.read_direct_chunk((c * chunk,))
                        plain = np.frombuffer(zstd.decompress(frame), dtype=np.uint8)
                        if h5py.h5z.FILTER_SHUFFLE in filters:  # byte b of element i at b * chunk + i
                            plain = plain.reshape(size, chunk).T.reshape(-1)
                        raw.append(plain.view(data.dtype))
                    flat = np.concatenate(raw)[:p["numel"]]
                    assert np.array_equal(flat.view(np.uint8), data.view(np.uint8)), name + ": raw zstd decode differs"
        if not np.array_equal(got.view(np.uint8), expected.view(np.uint8)):
            bad = np.nonzero(got != expected)[0][:5]
            print(f"FAIL {name}: first differing elements {bad}: got {got[bad]}, expected {expected[bad]}")
            return 1
        checked += 1
    print(f"OK: {checked} tensors equal to their formulas")
    return 0 if checked >= 8 else 1


sys.exit(main())
