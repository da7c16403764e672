#!/usr/bin/env python3
"""Side by side, same run, same input file, same thread count: wall time, output size and peak
RSS of `quantd quantize` and llama.cpp's `llama_model_quantize` (PyPI llama-cpp-python).

Both quantize the same F16 GGUF (made by `quantd convert` from the fixture's hf-f16 folder).
quantd is also run from the f32 HF folder to report its peak RSS against the target
1.5 x (largest tensor in f32 + output file). Prints a markdown table of medians.

Usage: quantize_vs_llama_cpp.py --quantd target/release/quantd --fixture DIR [--runs 3] [--threads 2]
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15, "Q4_0": 2, "Q2_K": 10}


def run_child(cmd):
    """Runs cmd, returns (seconds, peak RSS bytes)."""
    # stderr goes to a file: llama.cpp logs every tensor, which would fill a pipe and block.
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        secs = time.perf_counter() - start
        if status != 0:
            err.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read().decode(errors='replace')[-2000:]}")
    return secs, usage.ru_maxrss * 1024


def llama_quantize_child(src, dst, ftype, threads):
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {ftype}\np.nthread = {threads}\n"
        f"rc = llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), p)\n"
        "sys.exit(rc)\n"
    )
    return run_child([sys.executable, "-c", code])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantd", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q8_0,Q6_K,Q4_K_M,Q4_0,Q2_K")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="qbench-")
    f16 = os.path.join(work, "smol-f16.gguf")
    subprocess.run([a.quantd, "convert", os.path.join(a.fixture, "hf-f16"), f16], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for t in a.types.split(","):
        q_times, l_times, q_rss, l_rss = [], [], [], []
        for i in range(a.runs):
            qo, lo = os.path.join(work, f"q-{t}.gguf"), os.path.join(work, f"l-{t}.gguf")
            s, r = run_child([a.quantd, "quantize", f16, "--type", t, "--out", qo, "--threads", str(a.threads)])
            q_times.append(s); q_rss.append(r)
            s, r = llama_quantize_child(f16, lo, FTYPES[t], a.threads)
            l_times.append(s); l_rss.append(r)
        qs, ls = os.path.getsize(qo), os.path.getsize(lo)
        qm, lm = statistics.median(q_times), statistics.median(l_times)
        rows.append((t, qs, ls, qm, lm, max(q_rss), max(l_rss)))
    print(f"input: {f16} (F16 GGUF), threads {a.threads}, median of {a.runs} runs, one process per run\n")
    print("| type | quantd MB | llama.cpp MB | quantd s | llama.cpp s | ratio | quantd peak RSS MB | llama.cpp peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for t, qs, ls, qm, lm, qr, lr in rows:
        print(f"| {t} | {qs/1e6:.1f} | {ls/1e6:.1f} | {qm:.2f} | {lm:.2f} | {qm/lm:.2f} | {qr/2**20:.0f} | {lr/2**20:.0f} |")
    # Peak RSS of a Q4_K_M quantization from the f32 HF folder against the target.
    out = os.path.join(work, "f32-q4km.gguf")
    secs, rss = run_child([a.quantd, "quantize", os.path.join(a.fixture, "hf-f32"), "--type", "Q4_K_M", "--out", out, "--threads", str(a.threads)])
    largest = 49152 * 576 * 4
    target = 1.5 * (largest + os.path.getsize(out))
    print(f"\nQ4_K_M from hf-f32: {secs:.2f}s, peak RSS {rss/2**20:.0f} MiB; target 1.5 x (largest f32 tensor {largest/2**20:.0f} MiB + output {os.path.getsize(out)/2**20:.0f} MiB) = {target/2**20:.0f} MiB")


if __name__ == "__main__":
    main()
