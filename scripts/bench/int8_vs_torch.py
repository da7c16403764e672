#!/usr/bin/env python3
"""Inference speed of quantd's `int8-dynamic` beside PyTorch's `quantize_dynamic` of the same
model, same thread count, same run, alternating the two so machine noise hits both alike.

    python scripts/bench/int8_vs_torch.py --quantd target/release/quantd \
        --model ~/.cache/quantd-fixtures/smollm2-135m/hf-f32 --threads 2 --repeat 3 \
        int8-per_token.gguf

Measures what llama-bench measures: pp = one prompt of --prompt-tokens tokens from an empty
cache; tg = --gen-tokens tokens decoded one at a time (greedy) at batch 1. quantd's numbers
come from `quantd bench --json`; PyTorch's from transformers' forward on the f32 folder after
`quantize_dynamic` with `per_channel_dynamic_qconfig` on the decoder linears (the tensors
quantd quantizes; scripts/peers/int8_reference.py scores the same model). Prints medians and
quantd/PyTorch ratios; --json writes them out. Needs torch and transformers (the peer venv of
scripts/peers/README.md).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peers"))
from serve_vs_llama_cpp import prompt_tokens, quantd_once  # noqa: E402


def torch_once(model, pp_n, tg_n):
    import torch

    vocab = model.config.vocab_size
    ids = torch.tensor([prompt_tokens(pp_n, vocab)])
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        pp = pp_n / (time.perf_counter() - t)
        past, tok = None, torch.tensor([[1]])
        t = time.perf_counter()
        for _ in range(tg_n):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tg = tg_n / (time.perf_counter() - t)
    return pp, tg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", help="quantd's int8-dynamic file")
    ap.add_argument("--model", required=True, help="the f32 HF folder it was made from")
    ap.add_argument("--quantd", default="target/release/quantd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from int8_reference import quantize_torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model = quantize_torch(model).eval()
    torch_once(model, 32, 4)  # warm-up
    r = {"torch_pp": [], "torch_tg": [], "quantd_pp": [], "quantd_tg": []}
    for _ in range(args.repeat):
        pp, tg = torch_once(model, args.prompt_tokens, args.gen_tokens)
        r["torch_pp"].append(pp)
        r["torch_tg"].append(tg)
        q = quantd_once(args.quantd, args.gguf, args.prompt_tokens, args.gen_tokens,
                        args.threads, 0)
        r["quantd_pp"].append(q["pp_median"])
        r["quantd_tg"].append(q["tg_median"])
    med = {k: statistics.median(v) for k, v in r.items()}
    print(f"pp{args.prompt_tokens}: quantd {med['quantd_pp']:.1f} vs torch {med['torch_pp']:.1f} "
          f"tok/s ({med['quantd_pp'] / med['torch_pp']:.2f}x); tg{args.gen_tokens}: quantd "
          f"{med['quantd_tg']:.1f} vs torch {med['torch_tg']:.1f} tok/s "
          f"({med['quantd_tg'] / med['torch_tg']:.2f}x); {args.threads} threads, "
          f"median of {args.repeat}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "runs": r,
                       "median": med, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
