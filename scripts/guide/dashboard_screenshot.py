#!/usr/bin/env python3
"""Makes docs/dashboard.png: starts `quantd serve` on a scratch data directory, uploads a model
with `quantd upload`, makes and evaluates several variants through the API, starts one more job
so a live progress bar shows, and photographs the dashboard in headless Chromium with
scripts/interop/dashboard_browser.py. Rerun it to refresh the picture:

    python scripts/guide/dashboard_screenshot.py --quantd target/release/quantd \
        --model ~/.cache/quantd-fixtures/smollm2-135m/hf-f32 \
        --text tests/corpus/eval-pride-and-prejudice.txt --out docs/dashboard.png

Needs Python with Playwright (scripts/test.sh installs it in the fixture venv) and Debian's
chromium.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = [
    {"method": "gguf", "params": {"type": "Q8_0"}},
    {"method": "gguf", "params": {"type": "Q6_K"}},
    {"method": "gguf", "params": {"type": "Q5_K_M"}},
    {"method": "gguf", "params": {"type": "Q4_K_M"}},
    {"method": "gguf", "params": {"type": "Q3_K_M"}},
    {"method": "rtn", "params": {"bits": 4, "group_size": 128}},
    {"method": "nf4", "params": {}},
    {"method": "int8-dynamic", "params": {}},
]


def call(url, method="GET", body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", content_type)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantd", required=True)
    ap.add_argument("--model", required=True, help="HF folder or GGUF to upload")
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--text", required=True, help="evaluation text")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "docs", "dashboard.png"))
    ap.add_argument("--port", type=int, default=18471)
    a = ap.parse_args()

    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, QUANTD_DATA_DIR=data, QUANTD_SERVER__PORT=str(a.port))
        server = subprocess.Popen([a.quantd, "serve"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(data, "serve.log"), "w"))
        try:
            for _ in range(300):
                try:
                    call(url + "/ready")
                    break
                except Exception:
                    time.sleep(0.2)
            subprocess.run([a.quantd, "upload", a.model, "--name", a.name, "--url", url],
                           check=True, stdout=subprocess.DEVNULL)
            with open(a.text, "rb") as f:
                ds = call(url + "/v1/datasets", "POST", f.read(), "text/plain")["id"]
            evaluation = {"dataset": ds, "max_tokens": a.max_tokens, "speed": False}
            jobs = [call(url + "/v1/jobs", "POST", dict(v, model=a.name, eval=evaluation))["id"]
                    for v in VARIANTS]
            for j in jobs:
                while (job := call(f"{url}/v1/jobs/{j}"))["status"] in ("queued", "running"):
                    time.sleep(1)
                print(f"{job['output_name']}: {job['status']}", file=sys.stderr)
                if job["status"] != "succeeded":
                    sys.exit(f"job {j} {job['status']}: {job['error']}")
            # One more, photographed mid-run, so the picture shows a live job.
            live = call(url + "/v1/jobs", "POST", {"model": a.name, "method": "gguf",
                                                   "params": {"type": "Q2_K"}, "eval": evaluation})["id"]
            # Photographed while it evaluates, a stage long enough to outlast the browser's start.
            while True:
                job = call(f"{url}/v1/jobs/{live}")
                if job["stage"] == "evaluating" and job["progress"]["done"] > 0:
                    break
                time.sleep(0.2)
            out = subprocess.run([sys.executable, os.path.join(HERE, "..", "interop", "dashboard_browser.py"),
                                  "--url", url, "--screenshot", a.out, "--width", "1300"],
                                 check=True, stdout=subprocess.PIPE, text=True)
            seen = json.loads(out.stdout)
            print(json.dumps({"bases": seen["bases"], "console_errors": seen["console_errors"]}, indent=1))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
