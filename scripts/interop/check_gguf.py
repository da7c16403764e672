#!/usr/bin/env python3
"""Check a GGUF file with the reference reader (PyPI `gguf`), independently of quantd.

Prints a JSON summary (version, file type, tensor type counts, key metadata) and exits 1 when
an expectation given on the command line does not hold.

Usage: check_gguf.py FILE [--file-type N] [--types '{"Q4_K": 16, ...}'] [--meta KEY=VALUE ...]
"""
import argparse
import json
import sys
from collections import Counter

from gguf import GGUFReader


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--file-type", type=int)
    ap.add_argument("--types", help="JSON object: quantized tensor type -> count")
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE that must hold")
    a = ap.parse_args()

    r = GGUFReader(a.file)
    counts = Counter(t.tensor_type.name for t in r.tensors)
    tokens = field(r, "tokenizer.ggml.tokens") or []
    summary = {
        "version": int(r.fields["GGUF.version"].contents()),
        "file_type": field(r, "general.file_type"),
        "architecture": field(r, "general.architecture"),
        "tensor_types": dict(sorted(counts.items())),
        "tensors": len(r.tensors),
        "tokens": len(tokens),
        "merges": len(field(r, "tokenizer.ggml.merges") or []),
        "tokenizer_model": field(r, "tokenizer.ggml.model"),
        "tokenizer_pre": field(r, "tokenizer.ggml.pre"),
        "has_chat_template": field(r, "tokenizer.chat_template") is not None,
        "alignment": field(r, "general.alignment"),
    }
    print(json.dumps(summary))
    errors = []
    if a.file_type is not None and summary["file_type"] != a.file_type:
        errors.append(f"general.file_type is {summary['file_type']}, expected {a.file_type}")
    if a.types:
        want = json.loads(a.types)
        got = {k: v for k, v in counts.items() if k not in ("F32",)}
        if got != want:
            errors.append(f"tensor types {got} != expected {want}")
    for kv in a.meta:
        key, value = kv.split("=", 1)
        got = field(r, key)
        if str(got) != value:
            errors.append(f"{key} is {got!r}, expected {value!r}")
    for e in errors:
        print("MISMATCH:", e, file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
