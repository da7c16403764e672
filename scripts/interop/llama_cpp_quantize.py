#!/usr/bin/env python3
"""Quantize a GGUF with llama.cpp's own `llama_model_quantize` (PyPI llama-cpp-python), optionally
with an importance matrix file, as `llama-quantize [--imatrix FILE] IN OUT TYPE` does.

The imatrix file is read the way llama-quantize's `load_imatrix` reads it: the GGUF format
(`<name>.in_sum2` / `<name>.counts`, mean = sums / count, 1 where the count is 0) or the legacy
.dat format (values / ncall). Reading it here with the `gguf` package is an independent check of
the file quantd writes; the means go to llama.cpp through `llama_model_imatrix_data`.

Usage: llama_cpp_quantize.py IN.gguf OUT.gguf TYPE [--imatrix FILE] [--threads N]
"""
import argparse
import ctypes
import struct
import sys

import numpy as np

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
          "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
          "Q6_K": 18}


def read_gguf_imatrix(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    field = r.fields.get("general.type")
    kind = bytes(field.parts[field.data[0]]).decode() if field else None
    if kind != "imatrix":
        sys.exit(f"{path}: general.type is {kind!r}, not 'imatrix'")
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in r.fields:
            sys.exit(f"{path}: missing {key} (llama-quantize refuses such a file)")
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors[base + ".counts"]
        ne0 = sums.size // counts.size
        mean = np.empty_like(sums)
        for j, c in enumerate(counts):
            c = float(round(float(c)))
            part = slice(j * ne0, (j + 1) * ne0)
            mean[part] = sums[part] / np.float32(c) if c > 0 else 1.0
        out[base] = mean
    return out


def read_legacy_imatrix(path):
    data = open(path, "rb").read()
    at = 0

    def take(fmt):
        nonlocal at
        v = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return v

    (n,) = take("<i")
    out = {}
    for _ in range(n):
        (length,) = take("<i")
        name = data[at : at + length].decode()
        at += length
        ncall, nval = take("<ii")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=at).copy()
        at += 4 * nval
        out[name] = values / np.float32(ncall) if ncall > 0 else values
    return out


def read_imatrix(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    return read_gguf_imatrix(path) if magic == b"GGUF" else read_legacy_imatrix(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("type", choices=sorted(FTYPES))
    ap.add_argument("--imatrix")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[a.type]
    p.nthread = a.threads
    keep = []
    if a.imatrix:
        entries = read_imatrix(a.imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(sorted(entries.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            arr[i].name = name.encode()
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(entries)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        print(f"imatrix: {len(entries)} entries from {a.imatrix}", file=sys.stderr)
    rc = llama_cpp.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(p))
    sys.exit(rc)


if __name__ == "__main__":
    main()
