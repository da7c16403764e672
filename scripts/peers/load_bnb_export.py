#!/usr/bin/env python3
"""Load a quantd bitsandbytes export (`quantd export --format bnb`, NF4/FP4 or int8) with
transformers + bitsandbytes on CPU and compare it with transformers running the same weights
dequantized into a plain f32 folder (`quantd convert VARIANT.gguf DIR --dtype f32`, which is
what quantd serves).

Checks, for each quantized linear, bitsandbytes' own dequantization of the stored weight
against the dense folder's weight (4-bit: `bitsandbytes.functional.dequantize_4bit`; int8:
`CB · SCB / 127`), then the logits of both models on the first `--tokens` tokens of `--text`.
The model is loaded with `dtype=float32` and compute dtype float32, so the remaining logit
differences are summation order (and, for 4-bit, nothing else; for int8, LLM.int8()'s own
activation rounding).

Prints one JSON line; exits 1 if loading fails, no linear was quantized, or top-1 agreement is
below `--min-top1`.

    ~/.cache/quantd-peers/gptq-venv/bin/python scripts/peers/load_bnb_export.py \\
        /tmp/ex/nf4-bnb /tmp/ex/nf4-dense --text tests/corpus/eval-pride-and-prejudice.txt
"""

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def weight_check(qmodel, dense):
    import bitsandbytes as bnb

    dense_mods = dict(dense.named_modules())
    worst, worst_name, n = 0.0, None, 0
    for name, m in qmodel.named_modules():
        kind = type(m).__name__
        if kind == "Linear4bit":
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif kind == "Linear8bitLt":
            w = m.weight.data.float() * m.weight.SCB.float().unsqueeze(1) / 127.0
        else:
            continue
        ref = dense_mods[name].weight.detach().float()
        assert w.shape == ref.shape, (name, tuple(w.shape), tuple(ref.shape))
        d = (w - ref).abs().max().item()
        n += 1
        if d > worst:
            worst, worst_name = d, name
    return {"linears": n, "max_abs_dw": worst, "worst": worst_name}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("dense_dir")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--min-top1", type=float, default=99.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        out, rc = run(args)
    finally:
        sys.stdout = real_stdout
    print(json.dumps(out), flush=True)
    return rc


def run(args):
    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {"export": args.export_dir, "dense": args.dense_dir,
           "versions": {"transformers": transformers.__version__,
                        "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__}}
    qc = json.load(open(os.path.join(args.export_dir, "config.json")))["quantization_config"]
    out["quantization_config"] = qc
    tok = AutoTokenizer.from_pretrained(args.export_dir)
    text = open(args.text, encoding="utf-8").read(20000)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    input_ids = torch.tensor([ids])
    t0 = time.time()
    try:
        qmodel = AutoModelForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32,
                                                      device_map="cpu").eval()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        out.update({"loaded": False, "error": f"{type(e).__name__}: {e}"[:2000]})
        return out, 1
    out["loaded"] = True
    out["load_seconds"] = round(time.time() - t0, 1)
    dense = AutoModelForCausalLM.from_pretrained(args.dense_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out["weights"] = weight_check(qmodel, dense)
        ref = dense(input_ids).logits[0].float()
        got = qmodel(input_ids).logits[0].float()
    d = (got - ref).abs()
    out.update({"tokens": len(ids), "max_abs_dlogit": d.max().item(),
                "mean_abs_dlogit": d.mean().item(),
                "top1_pct": (got.argmax(-1) == ref.argmax(-1)).float().mean().item() * 100})
    ok = out["weights"]["linears"] > 0 and out["top1_pct"] >= args.min_top1
    return out, 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
