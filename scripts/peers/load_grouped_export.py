#!/usr/bin/env python3
"""Load a quantd GPTQ- or AWQ-format export with a real quantized loader on CPU and compare its
logits with transformers running the matching dequantized (dense f32) folder.

quantd writes, for one quantization run, both a grouped export (`--format gptq`: per linear
qweight/qzeros/scales/g_idx, GPTQ "v1" packing with zero-1 stored; or AutoAWQ GEMM layout) and
the same weights dequantized into a plain f32 HF folder. If the export is read exactly, the
quantized model must give (nearly) the same logits as the dense one; the differences left are
the loader's compute dtype (gptqmodel's torch kernels run in float16/bfloat16) and, for
asymmetric groups, the integer zero point (the dense folder holds d*q + m with m an f16, the
export s*(q - z) with z = round(-m/d); quantd reports this as max_zero_rounding).

Loaders: `--loader gptqmodel` (default): `GPTQModel.load(EXPORT_DIR, device="cpu",
backend=BACKEND.TORCH, dtype=float16)` (for an AWQ export the backend becomes AWQ_TORCH).
`--loader transformers`: `AutoModelForCausalLM.from_pretrained(EXPORT_DIR, device_map="cpu",
quantization_config=GPTQConfig(bits, backend="torch"))` (AwqConfig(backend="torch_awq") for
AWQ), i.e. HF's integration (optimum + gptqmodel kernels for GPTQ). `--backend` picks another
gptqmodel kernel (`auto`, `torch_fused`, `torch_aten`, ...); the torch kernel is the one that
runs layers whose width is not a multiple of the group size (SmolLM2: 576 columns, g128) on CPU.

Both models see the same ids: the first `--tokens` (64) tokens of `--text`, tokenized with the
export's tokenizer. Besides the comparison against the dense f32 model it reports a noise floor
(the dense model run in the loader's dtype vs f32) and, for each quantized linear, the largest
difference between the loader's dequantized weight and the dense folder's weight.

Prints one JSON line; exits 1 if the model failed to load or top-1 agreement < `--min-top1`.

    ~/.cache/quantd-peers/gptqmodel-venv/bin/python scripts/peers/load_grouped_export.py \\
        /tmp/ex/b4-gptq /tmp/ex/b4-dense --text tests/corpus/eval-pride-and-prejudice.txt
"""

import argparse
import json
import os
import sys
import time
import traceback

# gptqmodel 7.7.0 sizes its CPU pool as (cpu_count+1)//2 = 1 on a 2-vCPU machine, then fails:
# "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quant_method(export_dir):
    cfg = json.load(open(os.path.join(export_dir, "config.json")))
    qc = cfg.get("quantization_config") or {}
    return qc.get("quant_method", "?"), qc


def load_gptqmodel(export_dir, method, backend_name, dtype):
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    name = backend_name
    if method == "awq" and name in ("torch", "torch_fused", "torch_int8", "torch_aten"):
        name = "awq_" + name
    backend = BACKEND(name)
    kwargs = {"device": "cpu", "backend": backend}
    if dtype is not None:
        kwargs["dtype"] = dtype
    wrapped = GPTQModel.load(export_dir, **kwargs)
    model = wrapped.model
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    info = {"loader": f"gptqmodel {gptqmodel.__version__} GPTQModel.load(device='cpu')",
            "backend": f"BACKEND.{backend.name}", "kernels": kernels}
    return model, info


def load_transformers(export_dir, method, qc, backend_name, dtype):
    """HF's GPTQ (optimum + gptqmodel kernels) / AWQ (gptqmodel kernels) integration. The
    kernel is picked by gptqmodel from the config's `backend` (a loading attribute that a
    passed quantization_config overrides)."""
    import transformers
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    kwargs = {"device_map": "cpu", "dtype": dtype or "auto"}
    backend = "auto"
    if backend_name != "auto":
        if method == "awq":  # transformers' AwqBackend names
            backend = {"torch": "torch_awq", "torch_fused": "torch_fused_awq"}.get(
                backend_name, backend_name)
            kwargs["quantization_config"] = AwqConfig(bits=qc["bits"], backend=backend)
        else:  # gptqmodel BACKEND names; legacy "torch" maps to gptq_torch
            backend = backend_name
            kwargs["quantization_config"] = GPTQConfig(bits=qc["bits"], backend=backend)
    model = AutoModelForCausalLM.from_pretrained(export_dir, **kwargs)
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    info = {"loader": f"transformers {transformers.__version__} AutoModelForCausalLM",
            "backend": backend, "kernels": kernels}
    return model, info


def model_dtype(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def weight_check(qmodel, dense):
    """Compare each quantized linear, as the loader dequantizes it, with the dense folder's
    weight: the largest |dW|, and the largest |dW| / scale (in quantization steps: a wrong code
    or zero point shows as >= 1 step; f16 rounding of the scales as << 1)."""
    dense_mods = dict(dense.named_modules())
    worst, worst_steps, worst_name, n = 0.0, 0.0, None, 0
    for name, m in qmodel.named_modules():
        if not hasattr(m, "qweight"):
            continue
        # Dequantize with the stored (f16) scales promoted to f32, so the check sees the
        # format, not the kernel's f16 arithmetic.
        scales = m.scales
        try:
            m.scales = scales.float()
            g = torch.arange(m.in_features) // m.group_size
            if hasattr(m, "dequantize_weight"):  # GPTQ kernels, [in, out]
                w = m.dequantize_weight()
                g = m.g_idx.long()
            else:  # AWQ GEMM layout: qweight [in, out/8], qzeros [groups, out/8]
                from gptqmodel.quantization.awq.utils.packing_utils import (reverse_awq_order,
                                                                            unpack_awq)
                iw, iz = unpack_awq(m.qweight, m.qzeros, m.bits)
                iw, iz = reverse_awq_order(iw, iz, m.bits)
                mask = (1 << m.bits) - 1
                iw, iz = iw & mask, iz & mask
                # Groups indexed per input row (dequantize_gemm's repeat_interleave assumes
                # in_features % group_size == 0).
                w = (iw - iz[g]).float() * m.scales[g]
            step = m.scales.float()[g].abs().clamp_min(1e-12)
        except Exception as e:  # noqa: BLE001 - a kernel without a dequantizer: skip the check
            return {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            m.scales = scales
        ref = dense_mods[name].weight.detach()
        # Both dequantizers return [in_features, out_features] (square layers too).
        w, step = w.detach().float().t(), step.t()
        assert w.shape == ref.shape, (name, tuple(w.shape), tuple(ref.shape))
        d = (w - ref).abs()
        n += 1
        worst_steps = max(worst_steps, (d / step).max().item())
        if d.max().item() > worst:
            worst, worst_name = d.max().item(), name
    return {"linears": n, "max_abs_dw": worst, "worst": worst_name,
            "max_dw_in_steps": round(worst_steps, 5)}


def compare(a, b):
    d = (a - b).abs()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item() * 100
    return d.max().item(), d.mean().item(), top1


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", help="quantd GPTQ/AWQ export folder")
    ap.add_argument("dense_dir", help="the same weights dequantized to an f32 HF folder")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests",
                                                   "corpus", "eval-pride-and-prejudice.txt"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--loader", choices=["gptqmodel", "transformers"], default="gptqmodel")
    ap.add_argument("--backend", default="torch",
                    help="gptqmodel BACKEND value (torch, torch_fused, torch_aten, auto, ...); "
                         "mapped to the AWQ kernel of that name for AWQ exports")
    ap.add_argument("--dtype", choices=list(DTYPES) + ["auto"], default="float16",
                    help="dtype asked of the loader (GPTQModel's torch kernel: float16/bfloat16)")
    ap.add_argument("--min-top1", type=float, default=99.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    return args


def main():
    args = parse_args()
    # Loaders log to stdout; keep stdout for the one JSON line.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        out, rc = run(args)
    finally:
        sys.stdout = real_stdout
    print(json.dumps(out), flush=True)
    return rc


def run(args):
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, qc = quant_method(args.export_dir)
    out = {"export": args.export_dir, "dense": args.dense_dir, "quant_method": method,
           "bits": qc.get("bits"), "group_size": qc.get("group_size"),
           "sym": qc["sym"] if "sym" in qc else
           (not qc["zero_point"] if "zero_point" in qc else None)}

    tok = AutoTokenizer.from_pretrained(args.export_dir)
    text = open(args.text, encoding="utf-8").read(20000)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    input_ids = torch.tensor([ids])
    out["tokens"] = len(ids)

    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    t0 = time.time()
    try:
        if args.loader == "gptqmodel":
            qmodel, info = load_gptqmodel(args.export_dir, method, args.backend, dtype)
        else:
            qmodel, info = load_transformers(args.export_dir, method, qc, args.backend, dtype)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        try:
            version = __import__(args.loader).__version__
        except Exception:  # noqa: BLE001
            version = "?"
        out.update({"loader": f"{args.loader} {version}", "backend": args.backend, "loaded": False,
                    "error": f"{type(e).__name__}: {e}"[:2000]})
        return out, 1
    out.update(info)
    out["loaded"] = True
    out["load_seconds"] = round(time.time() - t0, 1)
    qdtype = model_dtype(qmodel)
    out["loader_dtype"] = str(qdtype).replace("torch.", "")
    if not out["kernels"]:
        out["error"] = "no quantized linears in the loaded model"
        return out, 1

    dense = AutoModelForCausalLM.from_pretrained(args.dense_dir, dtype=torch.float32)
    dense.eval()
    qmodel.eval()
    with torch.inference_mode():
        ref = dense(input_ids).logits[0].float()
        out["weights"] = weight_check(qmodel, dense)
        try:
            got = qmodel(input_ids).logits[0].float()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            out["error"] = f"forward failed: {type(e).__name__}: {e}"[:2000]
            return out, 1
        # Noise floor: the dense model in the loader's dtype against itself in f32.
        if qdtype is not None and qdtype != torch.float32:
            floor = dense.to(qdtype)(input_ids).logits[0].float()
            fmax, fmean, ftop1 = compare(floor, ref)
            out["dense_in_loader_dtype"] = {"max_abs_dlogit": round(fmax, 5),
                                            "mean_abs_dlogit": round(fmean, 5),
                                            "top1_agreement_pct": round(ftop1, 2)}
    mx, mean, top1 = compare(got, ref)
    out.update({"max_abs_dlogit": round(mx, 5), "mean_abs_dlogit": round(mean, 5),
                "top1_agreement_pct": round(top1, 2),
                "versions": {"torch": torch.__version__,
                             "transformers": __import__("transformers").__version__}})
    ok = top1 >= args.min_top1
    out["pass"] = ok
    return out, 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
