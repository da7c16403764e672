#!/usr/bin/env python3
"""Compare two GGUF files tensor by tensor (types and raw bytes) with the reference `gguf`
reader, e.g. quantd's Q4_K_M against llama.cpp's Q4_K_M of the same F16 input.

Usage: compare_gguf_tensors.py A.gguf B.gguf   (prints a summary line and the differing tensors;
exits 1 unless every tensor has the same type and bytes)
"""
import sys
from collections import Counter

import numpy as np
from gguf import GGUFReader


def main():
    a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
    tb = {t.name: t for t in b.tensors}
    same, diff_type, diff_bytes = 0, [], []
    for t in a.tensors:
        u = tb.get(t.name)
        if u is None:
            diff_type.append((t.name, t.tensor_type.name, None))
        elif t.tensor_type != u.tensor_type:
            diff_type.append((t.name, t.tensor_type.name, u.tensor_type.name))
        elif not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            diff_bytes.append((t.name, t.tensor_type.name))
        else:
            same += 1
    print(f"{len(a.tensors)} tensors: {same} byte-identical, {len(diff_type)} with another type, {len(diff_bytes)} same type but other bytes")
    for name, ta, tb_ in diff_type:
        print(f"  type  {name}: {ta} vs {tb_}")
    print("  bytes differ by type:", dict(Counter(t for _, t in diff_bytes)))
    missing = {t.name for t in b.tensors} - {t.name for t in a.tensors}
    for name in sorted(missing):
        print(f"  only in {sys.argv[2]}: {name}")
    sys.exit(1 if diff_type or diff_bytes or missing else 0)


if __name__ == "__main__":
    main()
