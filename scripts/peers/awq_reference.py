#!/usr/bin/env python3
"""Independent AWQ reference (llm-compressor's AWQModifier, CPU) for quantd's AWQ.

Smooths an f32 HF Llama-family model with AWQ (activation-aware per-channel scales, grid search
on α, Llama's default mappings) and quantizes it round-to-nearest (int, asymmetric, group-wise,
min-max) on the exact calibration windows quantd used (a JSON array of token-id arrays, fed
as-is: no BOS, attention mask all ones, batch size 1), then scores the base and the
fake-quantized model with gptq_reference.py's own evaluation (llama-perplexity's windowing:
consecutive --ctx windows, logits at positions ctx/2 .. ctx-2 predict the next token, at most
--max-tokens scored tokens).

    python scripts/peers/awq_reference.py --model DIR --calib calib-windows.json \
        --text corpus.txt [--bits 4] [--group-size 128] [--max-tokens 16384]

Prints one JSON object: ppl_base, ppl_quant, delta_ppl_pct, kld_mean (base || quant) and
top1_agreement_pct over the scored tokens, calib_seconds, peak_rss_kb. See README.md here.
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Sets the offline environment and imports torch; the evaluation is the GPTQ reference's.
from gptq_reference import (emit, eval_tokens, evaluate, int_scheme, load_windows,  # noqa: E402
                            parse_peer_args, peer_args, run_fields, run_oneshot)

import torch  # noqa: E402


def quantize_llmcompressor(model, windows, args):
    import llmcompressor
    from compressed_tensors.quantization import disable_quantization, forward_quantize
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier, default_mappings
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        # llmcompressor 0.14.0.1's AWQ pins each parent's cached inputs before its grid search
        # (vllm-project/llm-compressor#2813), which needs a CUDA driver: "RuntimeError: Found
        # no NVIDIA driver on your system". Pinning only speeds host-to-GPU copies; skip it.
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    # (With --strategy block, duo_scaling's weight means reshape the weight into whole blocks
    # and would fail on 576 columns; duo_scaling=False skips them.)
    scheme = int_scheme(args)
    duo = {"false": False, "true": True, "both": "both"}[args.duo_scaling]
    # AWQModifier only smooths (folds scales into the norms/linears); QuantizationModifier
    # then rounds the smoothed weights. Both run per layer at the sequential epoch end, AWQ
    # first (recipe order). During calibration quantization is disabled, so each layer's
    # inputs are the smoothed float model's outputs, as in AutoAWQ.
    recipe = [
        AWQModifier(mappings=default_mappings, duo_scaling=duo, n_grid=args.grid),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
    calib_s = run_oneshot(model, windows, recipe, args)
    # The model now fake-quantizes its weights in forward; write the rounded weights into the
    # parameters instead (and switch the on-the-fly rounding off), so the evaluation is a plain
    # HF forward and check_grid sees the grid.
    quantized = 0
    with torch.no_grad():
        for _, m in model.named_modules():
            qs = getattr(m, "quantization_scheme", None)
            if qs is not None and qs.weights is not None and hasattr(m, "weight"):
                m.weight.data = forward_quantize(m, m.weight, "weight", qs.weights).to(
                    m.weight.dtype)
                quantized += 1
    model.apply(disable_quantization)
    assert quantized > 0, "no quantized linears"
    return calib_s, {"llmcompressor": llmcompressor.__version__}, duo, quantized


def main():
    ap = peer_args(wait_calib_s=0)
    ap.add_argument("--duo-scaling", choices=["false", "true", "both"], default="false",
                    help="false: s = mean|x|^a (the paper); true: / mean_w^(1-a) (AutoAWQ)")
    ap.add_argument("--grid", type=int, default=20, help="AWQModifier n_grid")
    args = parse_peer_args(ap)

    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    windows = load_windows(args.calib, args.ctx, args.wait_calib_s)
    tokens = eval_tokens(os.path.join(args.model, "tokenizer.json"), args.text)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "python": sys.version.split()[0]}
    out = {"model": args.model, "text_tokens": len(tokens)}

    quant = copy.deepcopy(base)
    calib_s, v, duo, quantized = quantize_llmcompressor(quant, windows, args)
    versions.update(v)
    quant.eval()
    t = time.time()
    out.update(evaluate({"base": base, "quant": quant}, tokens, args.ctx, args.max_tokens))
    out.update({
        "tool": "llmcompressor AWQModifier + QuantizationModifier (sequential pipeline)",
        "bits": args.bits, "group_size": args.group_size, "strategy": args.strategy,
        "symmetric": False, "duo_scaling": duo, "n_grid": args.grid, "clip_search": False,
        "quantized_linears": quantized,
    })
    out.update(run_fields(out, windows, quant, args, calib_s, t, versions))
    emit(out, args.out)


if __name__ == "__main__":
    main()
