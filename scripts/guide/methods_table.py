#!/usr/bin/env python3
"""Measures every quantization method and type quantd offers on one model, with quantd itself,
and writes the table of docs/methods.md (between its `methods-table` markers) plus the raw
numbers as JSON beside it. Rerun it to regenerate the table:

    python scripts/guide/methods_table.py --quantd target/release/quantd \
        --model ~/.cache/quantd-fixtures/smollm2-135m/hf-f32 \
        --text tests/corpus/eval-pride-and-prejudice.txt \
        --calib tests/corpus/calib-emma.txt --work /tmp/guide

Per variant: `quantd quantize MODEL ... --out V.gguf` (kept in --work and reused on a rerun),
`quantd quantize ... --dry-run` for bits per weight, `quantd eval V.gguf --reference MODEL
--text TEXT --max-tokens N --json` for Δppl / KLD / top-1, and `quantd bench V.gguf --json`
for prompt (pp512) and decode (tg128) tokens/s, medians of --repeat runs. The f32 model itself
is the reference and the first row. Calibrated methods calibrate on --calib, never on --text.

With --only NAME (repeatable) only those rows (and the base) are measured; the other rows are
kept from the JSON beside the doc, and the table says which rows come from which day.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

# (variant name, quantize arguments, needs calibration text)
VARIANTS = [
    ("F16", ["--type", "F16"], False),
    ("Q8_0", ["--type", "Q8_0"], False),
    ("Q6_K", ["--type", "Q6_K"], False),
    ("Q5_K_M", ["--type", "Q5_K_M"], False),
    ("Q4_K_M", ["--type", "Q4_K_M"], False),
    ("Q4_K_M + imatrix", ["--type", "Q4_K_M", "--calib", "{calib}"], True),
    ("Q4_0", ["--type", "Q4_0"], False),
    ("Q3_K_M", ["--type", "Q3_K_M"], False),
    ("Q2_K", ["--type", "Q2_K"], False),
    ("rtn 4-bit g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"], False),
    ("gptq 4-bit g128", ["--method", "gptq", "--bits", "4", "--group-size", "128", "--calib", "{calib}"], True),
    ("gptq 3-bit g128", ["--method", "gptq", "--bits", "3", "--group-size", "128", "--asym", "--calib", "{calib}"], True),
    ("awq 4-bit g128", ["--method", "awq", "--bits", "4", "--group-size", "128", "--calib", "{calib}"], True),
    ("int8-dynamic per_token", ["--method", "int8-dynamic", "--activations", "per_token"], False),
    # The course's recipe: PyTorch's default quantize_dynamic (per-tensor weights, lm_head too).
    ("int8-dynamic torch (course: PyTorch default)", ["--method", "int8-dynamic", "--activations", "torch"], False),
    ("int8-dynamic torch per-channel", ["--method", "int8-dynamic", "--activations", "torch",
                                        "--int8-weights", "per_channel", "--head", "float"], False),
    ("llm-int8", ["--method", "llm-int8"], False),
    ("nf4", ["--method", "nf4"], False),
    ("nf4 double quant", ["--method", "nf4", "--double-quant"], False),
    ("fp4", ["--method", "fp4"], False),
]

BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def run_json(cmd):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure(args, name, qargs):
    path = os.path.join(args.work, slug(name) + ".gguf")
    qargs = [a.format(calib=args.calib) for a in qargs]
    base = [args.quantd, "quantize", args.model, *qargs, "--out", path]
    plan = run_json(base + ["--dry-run"])
    if not os.path.exists(path):
        t = time.time()
        subprocess.run(base, check=True, stdout=subprocess.DEVNULL)
        print(f"  quantized in {time.time() - t:.0f} s", file=sys.stderr)
    return path, plan


def evaluate(args, path, reference=True):
    """Quality from `quantd eval` (deterministic, so cached in --work beside the variant and
    reused on a rerun with the same text and token count), then speed from `quantd bench`,
    always measured afresh."""
    name = slug(os.path.basename(path.rstrip(os.sep)))
    cache = os.path.join(args.work, f"{name}.eval-{slug(os.path.basename(args.text))}-{args.max_tokens}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            ev = json.load(f)
    else:
        cmd = [args.quantd, "eval", path, "--text", args.text, "--max-tokens", str(args.max_tokens), "--json"]
        if reference:
            cmd += ["--reference", args.model]
        ev = run_json(cmd)
        with open(cache, "w") as f:
            json.dump(ev, f)
    if args.no_bench:
        return ev, None
    bench = run_json([args.quantd, "bench", path, "--json", "--repeat", str(args.repeat),
                      "--concurrency", "0"])
    return ev, bench


def fmt(v, spec, unit="", missing="–"):
    return missing if v is None else format(v, spec) + unit


def table(rows):
    lines = [
        "| variant | file MB | bits/weight | PPL | Δppl | KLD mean | top-1 | prompt tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['file_mb']:.1f} | {fmt(r['bits_per_weight'], '.2f')} "
            f"| {r['perplexity']:.3f} | {fmt(r['delta_ppl_pct'], '+.2f', '%')} "
            f"| {fmt(r['kld_mean'], '.4f')} | {fmt(r['top1_pct'], '.1f', '%')} "
            f"| {r['pp512']:.0f} | {r['tg128']:.1f} |"
        )
    return "\n".join(lines)


def merge_kept_rows(args, measured, when):
    """The committed rows, with the base and the `--only` rows replaced by `measured` (in
    VARIANTS order); kept rows are marked with a dagger and the day they were measured."""
    with open(os.path.splitext(args.doc)[0] + "-table.json") as f:
        old = json.load(f)
    if old["max_tokens"] != args.max_tokens or os.path.basename(old["text"]) != os.path.basename(args.text):
        sys.exit("--only needs the committed table's --text and --max-tokens")
    by_name = {r["variant"]: r for r in measured}
    kept_from = {r["variant"].rstrip(" †"): r for r in old["rows"]}
    rows = [by_name["f32 (base)"]]
    for name, _, _ in VARIANTS:
        if name in by_name:
            rows.append(dict(by_name[name], date=when))
        elif name in kept_from:
            r = kept_from[name]
            rows.append(dict(r, variant=name + " †", date=r.get("date", old["date"])))
    days = sorted({r["date"] for r in rows[1:] if r["variant"].endswith("†")})
    return rows, f"; rows marked † are kept from {', '.join(days)} (same script)" if days else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantd", required=True)
    p.add_argument("--model", required=True, help="HF folder of the base model (the reference)")
    p.add_argument("--text", required=True, help="evaluation text")
    p.add_argument("--calib", required=True, help="calibration text (not the evaluation text)")
    p.add_argument("--work", required=True, help="folder for the variants (reused on reruns)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", action="append", help="measure only these variants (repeatable)")
    p.add_argument("--no-bench", action="store_true",
                   help="quantize and evaluate only (fills the caches in --work; writes no table)")
    p.add_argument("--doc", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs", "methods.md"))
    args = p.parse_args()
    if os.path.abspath(args.calib) == os.path.abspath(args.text):
        sys.exit("--calib must not be the evaluation text")
    os.makedirs(args.work, exist_ok=True)

    if args.no_bench:
        evaluate(args, args.model, reference=False)
        for name, qargs, _ in VARIANTS:
            if not args.only or name in args.only:
                print(name, file=sys.stderr)
                evaluate(args, measure(args, name, qargs)[0])
        return

    rows = []
    # The base model: perplexity only (it is the reference), and its speed.
    ev, bench = evaluate(args, args.model, reference=False)
    size = sum(os.path.getsize(os.path.join(args.model, f)) for f in os.listdir(args.model)
               if f.endswith(".safetensors"))
    rows.append({"variant": "f32 (base)", "file_mb": size / 1e6, "bits_per_weight": 32.0,
                 "perplexity": ev["perplexity"], "delta_ppl_pct": None, "kld_mean": None,
                 "top1_pct": None, "pp512": bench["pp_median"], "tg128": bench["tg_median"]})
    for name, qargs, _ in VARIANTS:
        if args.only and name not in args.only:
            continue
        print(f"{name}", file=sys.stderr)
        path, plan = measure(args, name, qargs)
        ev, bench = evaluate(args, path)
        rows.append({
            "variant": name,
            "file_mb": os.path.getsize(path) / 1e6,
            "bits_per_weight": plan.get("bits_per_weight"),
            "perplexity": ev["perplexity"],
            "delta_ppl_pct": ev["delta_ppl_pct"],
            "kld_mean": ev["kld_mean"],
            "top1_pct": ev["top1_agreement_pct"],
            "pp512": bench["pp_median"],
            "tg128": bench["tg_median"],
        })

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {bench['threads']} threads, int8 kernel {bench['simd']['int8_kernel']}"
    when = datetime.date.today().isoformat()
    kept = ""
    if args.only:
        rows, kept = merge_kept_rows(args, rows, when)
    block = (
        f"{BEGIN}\n"
        f"Measured by `scripts/guide/methods_table.py` on {when} ({machine}){kept}: "
        f"{'/'.join(os.path.normpath(args.model).split(os.sep)[-2:])}, {ev['scored_tokens']} scored tokens of "
        f"`{os.path.basename(args.text)}` at ctx {ev['ctx']}, against the base model; speed is "
        f"`quantd bench` pp512 / tg128, medians of {args.repeat}. Bits per weight count the "
        f"quantized linears (embeddings and norms aside).\n\n"
        f"{table(rows)}\n"
        f"{END}"
    )
    with open(args.doc) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{args.doc} has no {BEGIN} … {END} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.doc, "w") as f:
        f.write(head + block + tail)
    with open(os.path.splitext(args.doc)[0] + "-table.json", "w") as f:
        json.dump({"date": when, "machine": machine, "model": args.model, "text": args.text,
                   "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
