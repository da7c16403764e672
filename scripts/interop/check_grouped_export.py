#!/usr/bin/env python3
"""Read a GPTQ or AWQ (GEMM) checkpoint with `safetensors` alone, dequantize every linear by the
format's own definition, and compare with the dense weights the same variant serves (an f32 HF
folder written by `quantd convert VARIANT.gguf DIR --dtype f32`).

GPTQ: qweight int32 [in·bits/32, out], the levels of each output column as one little-endian
bit stream along the inputs (level of input row i at stream bits i·b .. i·b+b−1, so 3-bit levels
may cross words; for 2/4/8 bits that is bits (i % pack)·b of word i // pack); qzeros int32
[groups, out·bits/32], streams along the outputs, holding zero − 1 (checkpoint_format "gptq")
or the zero itself ("gptq_v2");
w[out j, in i] = scales[g_idx[i], j] · (q − zero). AWQ GEMM: qweight int32 [in, out/8] and
qzeros [groups, out/8] with eight output columns per word in the order 0 2 4 6 1 3 5 7; zeros
stored as they are; group of input row i = i // group_size.

Prints one JSON line; exits 1 unless symmetric exports are exact and asymmetric ones are within
`--tolerance` quantization steps (the f16 rounding of the zero point, see src/export/gptq.rs).

Usage: check_grouped_export.py EXPORT_DIR DENSE_DIR [--tolerance 0.01] [--exact]
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_streams(words, bits):
    """words uint32 [n, W]: each row a little-endian bit stream → values [n, W·32/bits]."""
    little = np.ascontiguousarray(words.astype("<u4")).view(np.uint8)  # [n, 4W]
    stream = np.unpackbits(little, axis=1, bitorder="little").astype(np.int64)  # [n, 32W]
    stream = stream.reshape(words.shape[0], -1, bits)
    return (stream << np.arange(bits)).sum(axis=2)


def unpack_gptq(qweight, qzeros, bits, v1):
    mask = (1 << bits) - 1
    q = unpack_streams(qweight.view(np.uint32).T, bits).T  # [in, out]
    z = unpack_streams(qzeros.view(np.uint32), bits)  # [groups, out]
    if v1:
        z = (z + 1) & mask  # v1 stores zero − 1
    return q.astype(np.int64), z.astype(np.int64)


def unpack_awq(qweight, qzeros):
    def unpack(words):
        w = words.view(np.uint32)
        cols = np.empty((w.shape[0], w.shape[1] * 8), dtype=np.int64)
        for k, o in enumerate(AWQ_ORDER):
            cols[:, o::8] = (w >> (4 * k)) & 0xF
        return cols

    return unpack(qweight), unpack(qzeros)  # [in, out], [groups, out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("dense")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--exact", action="store_true",
                    help="require exact equality (GPTQ-layout variants store integer zeros)")
    a = ap.parse_args()
    config = json.load(open(os.path.join(a.export, "config.json")))
    qc = config["quantization_config"]
    method, bits, group_size = qc["quant_method"], qc["bits"], qc["group_size"]
    sym = qc.get("sym", not qc.get("zero_point", True))
    packed = load_file(os.path.join(a.export, "model.safetensors"))
    dense = load_file(os.path.join(a.dense, "model.safetensors"))
    linears, worst_abs, worst_steps = 0, 0.0, 0.0
    for name in sorted(k for k in packed if k.endswith(".qweight")):
        prefix = name[: -len(".qweight")]
        scales = packed[prefix + ".scales"].astype(np.float32)
        if method == "gptq":
            v1 = qc.get("checkpoint_format", "gptq") == "gptq"
            q, z = unpack_gptq(packed[name], packed[prefix + ".qzeros"], bits, v1)
            g_idx = packed[prefix + ".g_idx"].astype(np.int64)
        else:
            q, z = unpack_awq(packed[name], packed[prefix + ".qzeros"])
            g_idx = np.arange(q.shape[0]) // (group_size if group_size > 0 else q.shape[0])
        w = scales[g_idx] * (q - z[g_idx]).astype(np.float32)  # [in, out]
        want = dense[prefix + ".weight"].astype(np.float32).T
        if w.shape != want.shape:
            sys.exit(f"{prefix}: shape {w.shape} vs dense {want.shape}")
        diff = np.abs(w - want)
        worst_abs = max(worst_abs, float(diff.max()))
        step = scales[g_idx]
        nz = step > 0
        if nz.any():
            worst_steps = max(worst_steps, float((diff[nz] / step[nz]).max()))
        linears += 1
    ok = linears > 0 and (worst_abs == 0.0 if sym else worst_steps <= a.tolerance)
    if a.exact:
        ok = linears > 0 and worst_abs == 0.0
    print(json.dumps({"format": method, "bits": bits, "group_size": group_size, "sym": sym,
                      "linears": linears, "max_abs_diff": worst_abs,
                      "max_diff_in_steps": worst_steps, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
