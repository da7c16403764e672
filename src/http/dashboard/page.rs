//! The dashboard's HTML shell: escaping, the one stylesheet, and the one script (live job
//! progress and logs over SSE). Everything is inline, so the page works offline with no CDN.

use crate::http::jobs::Job;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · quantd</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style></head>
<body><header><a class="brand" href="/">quantd</a><nav><a href="/">dashboard</a> <a href="/openapi.json">API</a> <a href="/metrics">metrics</a></nav></header>
<main>{body}</main>
<script>{SCRIPT}</script></body></html>"#,
        title = escape(title),
    )
}

/// A job's `<progress>` with its text, which the script keeps current for live jobs; a job
/// that succeeded shows a full bar (its counters belong to its last stage).
pub fn progress(job: &Job) -> String {
    let p = &job.progress;
    let (done, max, text) = if job.status == "succeeded" {
        (1, 1, "done".to_string())
    } else {
        let unit = p
            .unit
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        (
            p.done,
            p.total.max(1),
            format!("{}/{}{unit}", p.done, p.total),
        )
    };
    format!(
        r#"<progress class="job-progress" value="{done}" max="{max}"></progress> <span class="progress-text">{}</span>"#,
        escape(&text)
    )
}

const STYLE: &str = r#"
:root { --fg:#1d232b; --muted:#667; --line:#dde1e6; --accent:#2f6fdf; --bg:#f7f8fa; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, sans-serif; color:var(--fg); background:var(--bg); }
header { display:flex; gap:24px; align-items:center; padding:10px 24px; background:#fff; border-bottom:1px solid var(--line); }
header .brand { font-weight:700; font-size:18px; color:var(--fg); text-decoration:none; }
nav a { margin-right:14px; color:var(--muted); }
main { padding:16px 24px 40px; max-width:1400px; }
h1 { font-size:20px; margin:8px 0 14px; } h2 { font-size:16px; margin:22px 0 8px; }
section.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:12px 16px; margin-bottom:16px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:4px 10px 4px 0; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td.num, th.num { text-align:right; }
a { color:var(--accent); }
.muted { color:var(--muted); }
.status { font-weight:600; } .status.succeeded { color:#1d7a3a; } .status.failed { color:#b3261e; }
.status.running { color:var(--accent); } .status.cancelled { color:var(--muted); }
progress { width:140px; vertical-align:middle; }
.charts { display:flex; flex-wrap:wrap; gap:12px; }
svg.chart { background:#fff; max-width:100%; height:auto; }
svg .frame { fill:none; stroke:#aab; } svg .grid { stroke:#eef0f3; } svg .zero { stroke:#99a; stroke-dasharray:3 3; }
svg .tick { font-size:10px; fill:var(--muted); } svg .axis { font-size:11px; fill:var(--fg); }
svg .chart-title { font-size:12px; font-weight:600; fill:var(--fg); }
svg .point { fill:var(--accent); fill-opacity:.85; stroke:#fff; } svg .point-label { font-size:10px; fill:#333; }
svg .c0 { fill:#2f6fdf; } svg .c1 { fill:#e8833a; } svg .c2 { fill:#3aa56b; } svg .c3 { fill:#c2457d; }
svg .c4 { fill:#8e6bd8; } svg .c5 { fill:#9a7b3c; } svg .c6 { fill:#35a3b5; } svg .c7 { fill:#777; }
pre.log { background:#10151c; color:#dfe6ee; padding:10px; border-radius:6px; max-height:420px; overflow:auto; font-size:12px; }
"#;

/// Live updates: every element with `data-live-job` follows `/v1/jobs/{id}/events` (the same
/// stream the API documents) and updates its progress bar, stage, status and, on a job page,
/// the log. Browsers send the dashboard's cookie with the request, so keys work here too.
const SCRIPT: &str = r#"
(function () {
  const finals = { done: 'succeeded', failed: 'failed', cancelled: 'cancelled' };
  document.querySelectorAll('[data-live-job]').forEach(function (el) {
    const id = el.getAttribute('data-live-job');
    const es = new EventSource('/v1/jobs/' + encodeURIComponent(id) + '/events');
    const set = function (sel, f) { el.querySelectorAll(sel).forEach(f); };
    const log = document.querySelector('pre.log[data-job="' + id + '"]');
    const append = function (kind, data) {
      if (log && el.hasAttribute('data-live-log')) { log.textContent += kind + ' ' + data + '\n'; log.scrollTop = log.scrollHeight; }
    };
    es.addEventListener('progress', function (e) {
      const d = JSON.parse(e.data);
      set('progress.job-progress', function (p) { p.max = Math.max(1, d.total); p.value = d.done; });
      set('.progress-text', function (t) { t.textContent = d.done + '/' + d.total + (d.unit ? ' ' + d.unit : ''); });
      if (d.stage) { set('.stage', function (s) { s.textContent = d.stage; }); }
    });
    ['stage', 'log', 'metric', 'quantized'].forEach(function (kind) {
      es.addEventListener(kind, function (e) {
        if (kind === 'stage') {
          const d = JSON.parse(e.data);
          set('.stage', function (s) { s.textContent = d.stage; });
          set('.status', function (s) { s.textContent = 'running'; s.className = 'status running'; });
        }
        append(kind, e.data);
      });
    });
    Object.keys(finals).forEach(function (kind) {
      es.addEventListener(kind, function (e) {
        es.close();
        set('.status', function (s) { s.textContent = finals[kind]; s.className = 'status ' + finals[kind]; });
        if (kind === 'done') { set('progress.job-progress', function (p) { p.value = p.max; }); }
        append(kind, e.data);
        el.setAttribute('data-finished', finals[kind]);
      });
    });
    // The stream ends after the final event; do not let the browser reconnect to a finished job.
    es.onerror = function () { if (el.hasAttribute('data-finished')) { es.close(); } };
  });
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
