#!/usr/bin/env python3
"""Independent references for quantd's `nf4`, `fp4` and `llm-int8`: bitsandbytes (CPU backend)
through transformers, on the same f32 model and the same tokens.

Loads the f32 HF folder twice, once as it is and once with a `BitsAndBytesConfig` (4-bit NF4 or
FP4, blocks of 64 as transformers fixes them, optional double quantization; or 8-bit LLM.int8()
with --threshold), compute dtype f32, on the CPU. transformers
quantizes every nn.Linear but `lm_head` (the decoder linears, which are quantd's tensors too).
Scores both with gptq_reference.py's evaluation (llama-perplexity's windowing, as `quantd eval`:
consecutive --ctx windows, logits at positions ctx/2 .. ctx-2 predict the next token, at most
--max-tokens scored tokens).

    python scripts/peers/bnb_reference.py --model DIR --text corpus.txt --mode nf4 \
        [--double-quant] [--max-tokens 16384] [--out result.json]

Prints one JSON object (and with --out writes it): ppl_base, ppl_quant, delta_ppl_pct,
kld_mean (base || quant), top1_agreement_pct, eval_seconds, versions. See README.md here.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Sets the offline environment and imports torch; the evaluation is the GPTQ reference's.
from gptq_reference import emit, eval_tokens, evaluate  # noqa: E402

import torch  # noqa: E402


def bnb_config(args):
    from transformers import BitsAndBytesConfig

    if args.mode == "llm_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=args.threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.mode,
                              bnb_4bit_use_double_quant=args.double_quant,
                              bnb_4bit_compute_dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF folder (f32)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--mode", choices=["nf4", "fp4", "llm_int8"], required=True)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM

    tokens = eval_tokens(os.path.join(args.model, "tokenizer.json"), args.text)
    load = dict(dtype=torch.float32, attn_implementation="eager", device_map="cpu")
    base = AutoModelForCausalLM.from_pretrained(args.model, **load).eval()
    quant = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb_config(args),
                                                 **load).eval()
    quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in quant.modules())
    t = time.time()
    out = {"model": args.model, "mode": args.mode, "double_quant": args.double_quant,
           "threshold": args.threshold if args.mode == "llm_int8" else None,
           "text_tokens": len(tokens), "quantized_linears": quantized}
    out.update(evaluate({"base": base, "quant": quant}, tokens, args.ctx, args.max_tokens))
    out.update({
        "delta_ppl_pct": 100.0 * (out["ppl_quant"] / out["ppl_base"] - 1.0),
        "eval_seconds": time.time() - t, "threads": args.threads,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "python": sys.version.split()[0]},
    })
    emit(out, args.out)


if __name__ == "__main__":
    main()
