//! The HTTP side of the CLI client: a blocking client bound to one server and key, the
//! server's error shape turned into a readable message, and a reader for server-sent events.

use std::io::{BufRead, BufReader, Read};

use anyhow::{anyhow, bail, Context};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

/// Where the server is and how to authenticate, shared by every client command.
#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// The server's base URL.
    #[arg(long, env = "QUANTD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key (sent as a bearer token).
    #[arg(long, env = "QUANTD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

pub struct Api {
    base: String,
    key: Option<String>,
    http: Client,
}

impl Api {
    pub fn new(c: &Connection) -> anyhow::Result<Self> {
        // No overall timeout: uploads, job streams and chats last as long as they last.
        let http = Client::builder()
            .timeout(None)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: c.url.trim_end_matches('/').to_string(),
            key: c.api_key.clone(),
            http,
        })
    }

    fn with_key(&self, r: RequestBuilder) -> RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.with_key(self.http.request(method, format!("{}{path}", self.base)))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        json_of(self.send(self.request(reqwest::Method::GET, path))?)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        json_of(self.send(self.request(reqwest::Method::POST, path).json(body))?)
    }

    /// Sends, and turns a non-2xx answer into the server's own message.
    pub fn send(&self, r: RequestBuilder) -> anyhow::Result<Response> {
        let resp = r
            .send()
            .with_context(|| format!("cannot reach quantd at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| {
                let e = &v["error"];
                let msg = e["message"].as_str()?.to_string();
                Some(match e["param"].as_str() {
                    Some(p) => format!("{msg} (field {p})"),
                    None => msg,
                })
            })
            .unwrap_or(body);
        bail!(
            "{} {}: {message}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
    }
}

fn json_of(resp: Response) -> anyhow::Result<Value> {
    resp.json().context("the server's answer is not JSON")
}

/// One server-sent event: its `event:` name ("message" when absent) and joined `data:` lines.
#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Calls `on_event` for each event of a `text/event-stream` body until the stream ends or the
/// callback returns false.
pub fn read_events(
    body: impl Read,
    mut on_event: impl FnMut(SseEvent) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let (mut event, mut data) = (String::new(), Vec::<String>::new());
    for line in BufReader::new(body).lines() {
        let line = line.map_err(|e| anyhow!("reading the event stream: {e}"))?;
        if line.is_empty() {
            if !data.is_empty() || !event.is_empty() {
                let e = SseEvent {
                    event: if event.is_empty() {
                        "message".to_string()
                    } else {
                        std::mem::take(&mut event)
                    },
                    data: std::mem::take(&mut data).join("\n"),
                };
                if !on_event(e)? {
                    return Ok(());
                }
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_string(),
            "data" => data.push(value.to_string()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_with_multi_line_data() {
        let body = "event: progress\ndata: {\"done\": 1}\n\n: keep-alive\n\ndata: a\ndata: b\n\n";
        let mut seen = Vec::new();
        read_events(body.as_bytes(), |e| {
            seen.push((e.event, e.data));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                ("progress".to_string(), "{\"done\": 1}".to_string()),
                ("message".to_string(), "a\nb".to_string())
            ]
        );
    }
}
