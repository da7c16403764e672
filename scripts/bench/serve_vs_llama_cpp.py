#!/usr/bin/env python3
"""Inference speed of quantd beside llama.cpp (llama-cpp-python) on the same GGUF files, same
thread count, same run, alternating the two so machine noise hits both alike.

    python scripts/bench/serve_vs_llama_cpp.py --quantd target/release/quantd \
        --threads 2 --repeat 3 model-Q8_0.gguf model-Q4_K_M.gguf

Measures what llama-bench measures: pp = one prompt of --prompt-tokens tokens from an empty
cache; tg = --gen-tokens tokens decoded one at a time (greedy) at batch 1. quantd's numbers
come from `quantd bench --json` (which also reports the aggregate rate of concurrent streams
through its scheduler). Prints medians and quantd/llama.cpp ratios; --json writes them out.
Needs llama-cpp-python (scripts/test.sh builds it with GGML_NATIVE=ON).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def prompt_tokens(n, vocab):
    # The same deterministic ids quantd bench uses (speed does not depend on them).
    return [((i * 7919 + 17) % (vocab - 1)) + 1 for i in range(n)]


def llama_cpp_once(llm, pp_n, tg_n, flash):
    import numpy as np

    vocab = llm.n_vocab()
    toks = prompt_tokens(pp_n, vocab)
    llm.reset()
    t = time.perf_counter()
    llm.eval(toks)
    pp = pp_n / (time.perf_counter() - t)
    llm.reset()
    tok = 1
    t = time.perf_counter()
    for _ in range(tg_n):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    tg = tg_n / (time.perf_counter() - t)
    return pp, tg


def quantd_once(binary, path, pp_n, tg_n, threads, concurrency):
    env = dict(os.environ, CANDLE_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        [binary, "bench", path, "--json", "--repeat", "1", "--prompt-tokens", str(pp_n),
         "--gen-tokens", str(tg_n), "--concurrency", str(concurrency)],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--quantd", default="target/release/quantd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import llama_cpp

    results = []
    for path in args.gguf:
        llm = llama_cpp.Llama(
            path, n_ctx=max(1024, args.prompt_tokens + 16), n_batch=args.prompt_tokens,
            n_ubatch=args.prompt_tokens, n_threads=args.threads, n_threads_batch=args.threads,
            flash_attn=args.flash_attn, verbose=False,
        )
        llama_cpp_once(llm, 32, 4, args.flash_attn)  # warm-up
        r = {"file": path, "llama_pp": [], "llama_tg": [], "quantd_pp": [], "quantd_tg": [],
             "quantd_single": [], "quantd_concurrent": []}
        for _ in range(args.repeat):
            pp, tg = llama_cpp_once(llm, args.prompt_tokens, args.gen_tokens, args.flash_attn)
            r["llama_pp"].append(pp)
            r["llama_tg"].append(tg)
            q = quantd_once(args.quantd, path, args.prompt_tokens, args.gen_tokens, args.threads,
                            args.concurrency)
            r["quantd_pp"].append(q["pp_median"])
            r["quantd_tg"].append(q["tg_median"])
            if q.get("engine_single_median"):
                r["quantd_single"].append(q["engine_single_median"])
                r["quantd_concurrent"].append(q["engine_concurrent_median"])
        del llm
        med = {k: statistics.median(v) for k, v in r.items() if isinstance(v, list) and v}
        r["median"] = med
        results.append(r)
        name = os.path.basename(path)
        print(f"{name}: pp{args.prompt_tokens} quantd {med['quantd_pp']:.1f} vs llama.cpp "
              f"{med['llama_pp']:.1f} tok/s ({med['quantd_pp'] / med['llama_pp']:.2f}x); "
              f"tg{args.gen_tokens} quantd {med['quantd_tg']:.1f} vs llama.cpp {med['llama_tg']:.1f} "
              f"tok/s ({med['quantd_tg'] / med['llama_tg']:.2f}x)")
        if "quantd_single" in med:
            print(f"  quantd engine: 1 stream {med['quantd_single']:.1f} tok/s, {args.concurrency} "
                  f"streams {med['quantd_concurrent']:.1f} tok/s aggregate "
                  f"({med['quantd_concurrent'] / med['quantd_single']:.2f}x)")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
