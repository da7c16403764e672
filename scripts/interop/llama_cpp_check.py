#!/usr/bin/env python3
"""Load GGUF files written by quantd in llama.cpp (PyPI `llama-cpp-python`) and complete a
prompt greedily; exit 1 unless every file continues it with the expected text.

Usage: llama_cpp_check.py FILE.gguf [FILE.gguf ...] [--prompt P] [--expect " Paris"]
Install the peer as scripts/test.sh does (llama-cpp-python built from source with GGML_NATIVE=ON).
"""
import argparse
import sys

from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default=" Paris")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ok = True
    for path in a.files:
        llm = Llama(model_path=path, n_ctx=256, n_threads=a.threads, verbose=False)
        out = llm(a.prompt, max_tokens=8, temperature=0.0, top_k=1)
        text = out["choices"][0]["text"]
        passed = text.startswith(a.expect)
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {path}: {a.prompt!r} -> {text!r}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
