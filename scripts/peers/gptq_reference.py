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


def int_scheme(args):
    """llm-compressor's scheme for quantd's groups: int, asymmetric, min-max, --bits, groups of
    --group-size along each row (--strategy block) or llm-compressor's own groups."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                                 QuantizationStrategy, QuantizationType)

    if args.strategy == "group":
        # Needs columns % group_size == 0: SmolLM2's 576-column linears fail validation.
        group_args = {"strategy": QuantizationStrategy.GROUP, "group_size": args.group_size}
    else:
        # Row blocks of 1 x group_size: the same groups along each row, and the last, partial
        # group (576 = 4*128 + 64) zero-padded for its min/max, which changes nothing since
        # the range is [min(w, 0), max(w, 0)] anyway.
        group_args = {"strategy": QuantizationStrategy.BLOCK,
                      "block_structure": [1, args.group_size]}
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=args.bits, type=QuantizationType.INT,
                                 symmetric=False, actorder=None, observer="minmax",
                                 **group_args),
    )


def run_oneshot(model, windows, recipe, args):
    """llm-compressor's sequential pipeline over exactly these windows, in order, batch 1;
    returns the seconds it took."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": windows,
                            "attention_mask": [[1] * len(w) for w in windows]})
    start = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]), batch_size=1, shuffle_calibration_samples=False,
            pipeline="sequential", tokenizer=args.tokenizer_dir)
    return time.time() - start


def quantize_llmcompressor(model, windows, args):
    import llmcompressor
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = int_scheme(args)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          dampening_frac=args.damp, block_size=128, actorder=None)
    calib_s = run_oneshot(model, windows, recipe, args)
    return calib_s, {"llmcompressor": llmcompressor.__version__}


def quantize_gptqmodel(quant, windows, args):
    """GPTQModel (original GPTQ: group parameters found on the error-updated columns as each
    group starts, static_groups=False). Quantizes, saves the GPTQ checkpoint, reloads it with
    the torch kernel and writes each layer's dequantized weight into `quant` (an f32 copy of
    the base model), so both models are scored by the same HF forward."""
    # gptqmodel 7.7.0 sizes its CPU pool as (cpu_count+1)//2 = 1 on a 2-vCPU machine, then
    # fails: "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False,
                         desc_act=False, act_group_aware=False, static_groups=False,
                         damp_percent=args.damp, true_sequential=True, mse=0.0,
                         offload_to_disk=False, device="cpu")
    calibration = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w),
                    dtype=torch.long)} for w in windows]
    start = time.time()
    model = GPTQModel.load(args.model, cfg, dtype=torch.float32)
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    calib_s = time.time() - start
    out_dir = args.save_dir or os.path.join("/tmp", f"gptqmodel-w{args.bits}g{args.group_size}")
    model.save(out_dir)
    del model
    loaded = GPTQModel.load(out_dir, device="cpu", backend=BACKEND.TORCH)
    qmods = {n: m for n, m in loaded.model.named_modules() if hasattr(m, "dequantize_weight")}
    targets = dict(quant.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, m in qmods.items():
            # dequantize_weight() returns [in_features, out_features].
            w = m.dequantize_weight().to(torch.float32).t()
            lin = targets[name]
            assert w.shape == lin.weight.shape, (name, w.shape, lin.weight.shape)
            lin.weight.copy_(w)
            replaced += 1
    assert replaced > 0, "no quantized linears found in the reloaded checkpoint"
    return calib_s, {"gptqmodel": gptqmodel.__version__, "replaced_linears": replaced,
                     "checkpoint": out_dir}


def check_grid(model, bits, group_size):
    """Weights of each quantized Linear take at most 2^bits distinct values per (row, group)."""
    worst = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            w = m.weight.detach()
            for g in torch.split(w, group_size, dim=1):  # the last group may be partial
                s = torch.sort(g, dim=-1).values
                distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
                worst = max(worst, int(distinct.max()))
    return worst


def peer_args(wait_calib_s):
    """The arguments every peer script takes (model, windows, text, groups, evaluation)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF folder (f32)")
    ap.add_argument("--calib", required=True, help="JSON array of token-id windows")
    ap.add_argument("--text", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--strategy", choices=["block", "group"], default="block",
                    help="llm-compressor strategy for the groups (see int_scheme)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-calib-s", type=int, default=wait_calib_s)
    ap.add_argument("--out", help="also write the result JSON here (llm-compressor logs to stdout)")
    return ap


def parse_peer_args(ap):
    args = ap.parse_args()
    args.tokenizer_dir = args.model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def main():
    ap = peer_args(wait_calib_s=1800)
    ap.add_argument("--tool", choices=["llmcompressor", "gptqmodel"], default="llmcompressor")
    ap.add_argument("--save-dir", help="gptqmodel: where to write the quantized checkpoint")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--base-only", action="store_true", help="only the unquantized PPL")
    args = parse_peer_args(ap)

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
        emit(out, args.out)
        return

    windows = load_windows(args.calib, args.ctx, args.wait_calib_s)
    quant = copy.deepcopy(base)
    if args.tool == "gptqmodel":
        calib_s, v = quantize_gptqmodel(quant, windows, args)
    else:
        calib_s, v = quantize_llmcompressor(quant, windows, args)
    versions.update(v)
    quant.eval()
    t = time.time()
    out.update(evaluate({"base": base, "quant": quant}, tokens, args.ctx, args.max_tokens))
    out.update({
        "tool": {"llmcompressor": "llmcompressor.GPTQModifier (sequential pipeline)",
                 "gptqmodel": "gptqmodel.GPTQModel.quantize (true_sequential)"}[args.tool],
        "bits": args.bits, "group_size": args.group_size, "symmetric": False,
        "actorder": None, "dampening_frac": args.damp,
    })
    out.update(run_fields(out, windows, quant, args, calib_s, t, versions))
    emit(out, args.out)


def run_fields(out, windows, quant, args, calib_s, eval_start, versions):
    """What every peer script reports besides its own settings: the calibration, Δppl, the
    grid check, times, memory and versions."""
    return {
        "calib_windows": len(windows), "calib_window_len": len(windows[0]),
        "delta_ppl_pct": 100.0 * (out["ppl_quant"] / out["ppl_base"] - 1.0),
        "max_distinct_values_per_group": check_grid(quant, args.bits, args.group_size),
        "calib_seconds": calib_s, "eval_seconds": time.time() - eval_start,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "threads": args.threads, "versions": versions,
    }


def emit(out, path):
    line = json.dumps(out)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
    print("RESULT " + line, flush=True)


if __name__ == "__main__":
    main()
