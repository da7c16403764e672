#!/usr/bin/env python3
"""Independent references for quantd's `int8-dynamic` (PyTorch, CPU).

Scores an f32 HF Llama-family model and an int8 version of it on the evaluation text with
gptq_reference.py's own evaluation (llama-perplexity's windowing, as `quantd eval`: consecutive
--ctx windows, logits at positions ctx/2 .. ctx-2 predict the next token, at most --max-tokens
scored tokens). The int8 version is one of:

- `--mode torch`: PyTorch's default recipe, the course's
  `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`: default
  qconfig, so per-tensor symmetric int8 weights (`MinMaxObserver`, scale = absmax / 127.5,
  levels [-128, 127]), fbgemm's one asymmetric 7-bit activation scale per call
  (`reduce_range`), on every nn.Linear, the lm_head included (its tied weight gets its own int8
  copy; the embeddings stay float). This is quantd's `activations: "torch"` with its defaults.
- `--mode torch_per_channel`: the same call with `per_channel_dynamic_qconfig` (int8 symmetric
  weights per output channel) on the decoder layers' nn.Linear modules only, the tensors quantd
  quantizes by default (embeddings and the lm_head stay float). This is quantd's
  `activations: "torch", weights: "per_channel", head: "float"`.
- `--mode per_token`: the same weights, fake-quantized (round(w / s) · s, s = absmax / 127 per
  output row), and activations fake-quantized per token (s = absmax / 127 per row of the
  input) in every decoder linear: the float computation quantd's `activations: "per_token"`
  kernel computes in integers.

    python scripts/peers/int8_reference.py --model DIR --text corpus.txt \
        --mode torch|torch_per_channel|per_token \
        [--max-tokens 16384] [--out result.json]

Prints one JSON object (and with --out writes it): ppl_base, ppl_quant, delta_ppl_pct,
kld_mean (base || quant), top1_agreement_pct, eval_seconds, versions. See README.md here.
"""

import argparse
import copy
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Sets the offline environment and imports torch; the evaluation is the GPTQ reference's.
from gptq_reference import emit, eval_tokens, evaluate  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def decoder_linears(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("model.layers.")}


def quantize_torch(model):
    """The default recipe: every nn.Linear, default (per-tensor) qconfig."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "fbgemm"
    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_torch_per_channel(model):
    """Per-channel weights on the decoder layers' linears only."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = "fbgemm"
    spec = {name: per_channel_dynamic_qconfig for name in decoder_linears(model)}
    return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)


RECIPES = {
    "torch": (quantize_torch, "quantize_dynamic(model, {nn.Linear}, dtype=qint8): default "
              "qconfig (per-tensor weights), every nn.Linear incl. lm_head"),
    "torch_per_channel": (quantize_torch_per_channel, "quantize_dynamic with "
                          "per_channel_dynamic_qconfig on the decoder layers' nn.Linear only"),
}


class PerTokenInt8(nn.Module):
    """y = fq_token(x) · fq_row(W)ᵀ (+ b), fq = symmetric int8 fake quantization (absmax/127,
    round half to even)."""

    def __init__(self, lin):
        super().__init__()
        w = lin.weight.detach().float()
        s = w.abs().amax(dim=1, keepdim=True) / 127.0
        q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
        self.weight = nn.Parameter(q.clamp(-127, 127) * s, requires_grad=False)
        self.bias = lin.bias

    def forward(self, x):
        s = x.abs().amax(dim=-1, keepdim=True) / 127.0
        s = torch.where(s > 0, s, 1.0)
        xq = torch.round(x / s).clamp(-127, 127) * s
        return nn.functional.linear(xq, self.weight, self.bias)


def quantize_per_token(model):
    for name, lin in decoder_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PerTokenInt8(lin))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF folder (f32)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--mode", choices=["torch", "torch_per_channel", "per_token"],
                    required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    tokens = eval_tokens(os.path.join(args.model, "tokenizer.json"), args.text)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    quant = copy.deepcopy(base)
    quantize, recipe = RECIPES.get(args.mode, (quantize_per_token, "per-token fake int8 on "
                                                "the decoder layers' nn.Linear"))
    quant = quantize(quant).eval()
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    replaced = sum(isinstance(m, (DynamicLinear, PerTokenInt8)) for m in quant.modules())
    t = time.time()
    out = {"model": args.model, "mode": args.mode, "recipe": recipe,
           "text_tokens": len(tokens), "quantized_linears": replaced}
    out.update(evaluate({"base": base, "quant": quant}, tokens, args.ctx, args.max_tokens))
    out.update({
        "delta_ppl_pct": 100.0 * (out["ppl_quant"] / out["ppl_base"] - 1.0),
        "eval_seconds": time.time() - t, "threads": args.threads,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    })
    emit(out, args.out)


if __name__ == "__main__":
    main()
