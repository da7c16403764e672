#!/usr/bin/env python3
"""Perplexity (and optionally KL divergence / top-1 against a reference GGUF) computed by
llama.cpp through llama-cpp-python, by llama-perplexity's method: consecutive windows of --ctx
tokens, logits at positions ctx/2 .. ctx-2 scoring the next token, up to --max-tokens scored
tokens (the last window scored in part). The independent reference for `quantd eval` (same
text, same windows, same scored tokens).

    python scripts/eval/llama_cpp_perplexity.py model.gguf --text corpus.txt --max-tokens 16384 \
        [--reference base.gguf] [--token-ids ids.json]

--token-ids takes the ids to score from a JSON list (e.g. from the HF tokenizer) instead of
llama.cpp's own tokenizer.
"""

import argparse
import json
import math
import time

import numpy as np


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def window_logits(llm, window):
    llm.reset()
    llm.eval(window)
    return np.array(llm.scores[: len(window)], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--reference")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, help="scored tokens at most")
    ap.add_argument("--token-ids")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    def load(path):
        return llama_cpp.Llama(path, n_ctx=args.ctx, n_batch=args.ctx, n_ubatch=args.ctx,
                               logits_all=True, n_threads=args.threads, verbose=False)

    llm = load(args.model)
    ref = load(args.reference) if args.reference else None
    if args.token_ids:
        tokens = json.load(open(args.token_ids))
    else:
        text = open(args.text, encoding="utf-8").read()
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    first = args.ctx // 2
    per_window = args.ctx - 1 - first
    n_windows = len(tokens) // args.ctx
    budget = n_windows * per_window
    if args.max_tokens:
        budget = min(budget, args.max_tokens)
        n_windows = min(n_windows, -(-budget // per_window))
    nll, ref_nll, kls, same, scored = 0.0, 0.0, [], 0, 0
    start = time.time()
    for w in range(n_windows):
        window = tokens[w * args.ctx:(w + 1) * args.ctx]
        take = min(per_window, budget - scored)
        lp = log_softmax(window_logits(llm, window)[first:first + take])
        targets = np.array(window[first + 1:first + 1 + take])
        nll -= lp[np.arange(len(targets)), targets].sum()
        scored += len(targets)
        if ref is not None:
            lr = log_softmax(window_logits(ref, window)[first:first + take])
            ref_nll -= lr[np.arange(len(targets)), targets].sum()
            kls.extend((np.exp(lr) * (lr - lp)).sum(axis=-1).tolist())
            same += int((lr.argmax(-1) == lp.argmax(-1)).sum())
    out = {"model": args.model, "text_tokens": len(tokens), "windows": n_windows,
           "scored_tokens": scored, "perplexity": math.exp(nll / scored),
           "seconds": time.time() - start}
    if ref is not None:
        k = np.array(kls)
        out.update({"reference_perplexity": math.exp(ref_nll / scored),
                    "kld_mean": float(k.mean()), "kld_median": float(np.median(k)),
                    "kld_p99": float(np.quantile(k, 0.99)), "kld_max": float(k.max()),
                    "top1_agreement_pct": 100.0 * same / scored})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
