#!/usr/bin/env python3
"""Independent GPTQ reference (llm-compressor's GPTQModifier, CPU) for quantd's GPTQ.

Quantizes an f32 HF Llama-family model with GPTQ (int, asymmetric, group-wise, no act-order,
dampening 0.01) on the exact calibration windows quantd used (a JSON array of token-id arrays,
fed as-is: no BOS, attention mask all ones, batch size 1), then scores the base and the
fake-quantized model on the evaluation text by llama-perplexity's windowing (the same as
scripts/eval/llama_cpp_perplexity.py and `quantd eval`): consecutive --ctx windows, logits at
positions ctx/2 .. ctx-2 predict the next token, at most --max-tokens scored tokens.

    python scripts/peers/gptq_reference.py --model DIR --calib calib-windows.json \
        --text corpus.txt [--bits 4] [--group-size 128] [--max-tokens 16384]

Prints one JSON object: ppl_base, ppl_quant, delta_ppl_pct, kld_mean (base || quant) and
top1_agreement_pct over the scored tokens, calib_seconds, peak_rss_kb. See README.md here.
"""

import argparse
import copy
import json
import math
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def eval_tokens(tokenizer_json, text_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    text = open(text_path, encoding="utf-8").read()
    return tok.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def evaluate(models, tokens, ctx, max_tokens):
    """models: {"name": model}. Returns NLL sums, per-token KL(first || other), top-1 agreement."""
    first = ctx // 2
    per_window = ctx - 1 - first
    n_windows = len(tokens) // ctx
    budget = n_windows * per_window
    if max_tokens:
        budget = min(budget, max_tokens)
        n_windows = min(n_windows, -(-budget // per_window))
    names = list(models)
    nll = {n: 0.0 for n in names}
    kl_sum, same, scored = 0.0, 0, 0
    for w in range(n_windows):
        window = tokens[w * ctx:(w + 1) * ctx]
        take = min(per_window, budget - scored)
        ids = torch.tensor([window])
        targets = torch.tensor(window[first + 1:first + 1 + take])
        lps = {}
        for n in names:
            logits = models[n](input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            lp = torch.log_softmax(logits[first:first + take].double(), dim=-1)
            nll[n] -= lp[torch.arange(take), targets].sum().item()
            lps[n] = lp
        if len(names) == 2:
            lr, lq = lps[names[0]], lps[names[1]]
            kl_sum += (lr.exp() * (lr - lq)).sum().item()
            same += int((lr.argmax(-1) == lq.argmax(-1)).sum().item())
        scored += take
    out = {"windows": n_windows, "scored_tokens": scored}
    for n in names:
        out["ppl_" + n] = math.exp(nll[n] / scored)
    if len(names) == 2:
        out["kld_mean"] = kl_sum / scored
        out["top1_agreement_pct"] = 100.0 * same / scored
    return out


def load_windows(path, ctx, wait_s):
    deadline = time.time() + wait_s
    while not os.path.exists(path):
        if time.time() > deadline:
            sys.exit(f"calibration windows not found: {path}")
        time.sleep(10)
    time.sleep(2)  # let the writer finish
    windows = json.load(open(path))
    assert all(len(w) == len(windows[0]) for w in windows), "ragged windows"
    return windows


def quantize_llmcompressor(model, windows, args):
    import llmcompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                                 QuantizationStrategy, QuantizationType)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    if args.strategy == "group":
        # Needs columns % group_size == 0: SmolLM2's 576-column linears fail validation.
        group_args = {"strategy": QuantizationStrategy.GROUP, "group_size": args.group_size}
    else:
        # Row blocks of 1 x group_size: the same groups along each row, and the last, partial
        # group (576 = 4*128 + 64) zero-padded for its min/max, which changes nothing since
        # the range is [min(w, 0), max(w, 0)] anyway.
        group_args = {"strategy": QuantizationStrategy.BLOCK,
                      "block_structure": [1, args.group_size]}
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=args.bits, type=QuantizationType.INT,
                                 symmetric=False, actorder=None, observer="minmax",
                                 **group_args),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          dampening_frac=args.damp, block_size=128, actorder=None)
    ds = Dataset.from_dict({"input_ids": windows,
                            "attention_mask": [[1] * len(w) for w in windows]})
    start = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]), batch_size=1, shuffle_calibration_samples=False,
            pipeline="sequential", tokenizer=args.tokenizer_dir)
    return time.time() - start, {"llmcompressor": llmcompressor.__version__}


def check_grid(model, bits, group_size):
    """Weights of each quantized Linear take at most 2^bits distinct values per (row, group)."""
    worst = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            w = m.weight.detach()
            g = w.reshape(w.shape[0], -1, group_size)
            s = torch.sort(g, dim=-1).values
            distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
            worst = max(worst, int(distinct.max()))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF folder (f32)")
    ap.add_argument("--calib", required=True, help="JSON array of token-id windows")
    ap.add_argument("--text", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--strategy", choices=["block", "group"], default="block",
                    help="llm-compressor strategy for the groups (see quantize_llmcompressor)")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-calib-s", type=int, default=1800)
    ap.add_argument("--base-only", action="store_true", help="only the unquantized PPL")
    args = ap.parse_args()
    args.tokenizer_dir = args.model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModelForCausalLM

    tokens = eval_tokens(os.path.join(args.model, "tokenizer.json"), args.text)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0]}
    out = {"model": args.model, "text_tokens": len(tokens)}
    if args.base_only:
        t = time.time()
        out.update(evaluate({"base": base}, tokens, args.ctx, args.max_tokens))
        out.update({"eval_seconds": time.time() - t, "versions": versions,
                    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
        print(json.dumps(out))
        return

    windows = load_windows(args.calib, args.ctx, args.wait_calib_s)
    quant = copy.deepcopy(base)
    calib_s, v = quantize_llmcompressor(quant, windows, args)
    versions.update(v)
    quant.eval()
    t = time.time()
    out.update(evaluate({"base": base, "quant": quant}, tokens, args.ctx, args.max_tokens))
    out.update({
        "tool": "llmcompressor.GPTQModifier (sequential pipeline)",
        "bits": args.bits, "group_size": args.group_size, "symmetric": False,
        "actorder": None, "dampening_frac": args.damp,
        "calib_windows": len(windows), "calib_window_len": len(windows[0]),
        "delta_ppl_pct": 100.0 * (out["ppl_quant"] / out["ppl_base"] - 1.0),
        "max_distinct_values_per_group": check_grid(quant, args.bits, args.group_size),
        "calib_seconds": calib_s, "eval_seconds": time.time() - t,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "threads": args.threads, "versions": versions,
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
