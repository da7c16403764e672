#!/usr/bin/env python3
"""Drives quantd's dashboard in headless Chromium (Debian's /usr/bin/chromium, through
Playwright's Python client; no browser is downloaded) and prints one JSON object: what the
browser reported (console errors, uncaught page errors, failed or 4xx/5xx requests), the chart
points and variant rows per base, optionally the progress a live job showed over time, a job
page's per-tensor bars and log, and a screenshot.

    python scripts/interop/dashboard_browser.py --url http://127.0.0.1:8080 \
        [--watch-job JOB] [--job-page JOB] [--screenshot docs/dashboard.png]

tests/dashboard.rs runs it; scripts/guide/dashboard_screenshot.py uses it for the docs image.
"""

import argparse
import json
import time

from playwright.sync_api import sync_playwright

# As this machine's notes advise for Debian's Chromium as root on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

BASES = """els => els.map(e => {
  const charts = e.querySelectorAll('svg.scatter');
  return {
    base: e.dataset.base,
    charts: charts.length,
    points: Array.from(charts).map(c => Array.from(c.querySelectorAll('circle.point')).map(p => p.dataset.variant)),
    variants: Array.from(e.querySelectorAll('tr.variant')).map(r => r.dataset.variant),
  };
})"""

ROW = """r => {
  const p = r.querySelector('progress');
  return {value: p.value, max: p.max, status: r.querySelector('.status').textContent,
          text: r.querySelector('.progress-text').textContent, t: performance.now()};
}"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the server's base URL")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--watch-job", help="sample this job's progress on the overview until it ends")
    ap.add_argument("--watch-seconds", type=float, default=300)
    ap.add_argument("--job-page", help="also open this job's page")
    ap.add_argument("--screenshot", help="write a full-page PNG of the overview here")
    ap.add_argument("--width", type=int, default=1280)
    a = ap.parse_args()

    out = {"console_errors": [], "page_errors": [], "bad_requests": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": 900})
        page.on("console", lambda m: out["console_errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: out["page_errors"].append(str(e)))
        page.on("response", lambda r: out["bad_requests"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
        # An event stream the page closes itself after a job's last event is not a failure.
        page.on("requestfailed", lambda r: None if "/events" in r.url and r.failure == "net::ERR_ABORTED"
                else out["bad_requests"].append(f"{r.failure} {r.url}"))

        page.goto(a.url + "/", wait_until="load")
        out["title"] = page.title()
        out["bases"] = page.eval_on_selector_all("section.base", BASES)
        if a.watch_job:
            row = f'tr.job[data-job="{a.watch_job}"]'
            out["live"] = page.eval_on_selector(row, "r => r.hasAttribute('data-live-job')")
            samples = []
            deadline = time.time() + a.watch_seconds
            while time.time() < deadline:
                s = page.eval_on_selector(row, ROW)
                if not samples or (s["value"], s["status"]) != (samples[-1]["value"], samples[-1]["status"]):
                    samples.append(s)
                if s["status"] in ("succeeded", "failed", "cancelled"):
                    break
                page.wait_for_timeout(50)
            out["progress_samples"] = samples
            # Let the stream's last events land before the page is left.
            page.wait_for_timeout(300)
        if a.screenshot:
            page.screenshot(path=a.screenshot, full_page=True)
        if a.job_page:
            page.goto(f"{a.url}/ui/jobs/{a.job_page}", wait_until="load")
            out["job_page"] = {
                "bars": page.eval_on_selector_all("rect.bar[data-tensor]", "els => els.length"),
                "log": page.eval_on_selector("pre.log", "e => e.textContent"),
                "status": page.eval_on_selector("section.job .status", "e => e.textContent"),
            }
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
