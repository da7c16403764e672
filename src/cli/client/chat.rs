//! `quantd chat MODEL`: a conversation on standard input, one user turn a line, each answer
//! streamed from `/v1/chat/completions` as it is generated. `/exit` or end of input ends it.

use std::io::{BufRead, Write};

use anyhow::Context;
use serde_json::{json, Value};

use super::api::{read_events, Api, Connection};

#[derive(clap::Args)]
pub struct ChatArgs {
    pub model: String,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print each answer's whole response as one JSON line (no streaming).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.conn)?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(s) = &args.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let text = line.trim();
        if text == "/exit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        messages.push(json!({"role": "user", "content": text}));
        let mut body = json!({
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": !args.json,
        });
        if let Some(s) = args.seed {
            body["seed"] = json!(s);
        }
        let answer = if args.json {
            let r = api.post("/v1/chat/completions", &body)?;
            println!("{r}");
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        } else {
            stream_answer(&api, &body)?
        };
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    Ok(())
}

/// Prints the answer's pieces as they arrive and returns the whole text.
fn stream_answer(api: &Api, body: &Value) -> anyhow::Result<String> {
    let resp = api.send(
        api.request(reqwest::Method::POST, "/v1/chat/completions")
            .json(body),
    )?;
    let mut answer = String::new();
    let mut out = std::io::stdout();
    read_events(resp, |e| {
        if e.data == "[DONE]" {
            return Ok(false);
        }
        let chunk: Value = serde_json::from_str(&e.data).context("a stream chunk is not JSON")?;
        if let Some(err) = chunk["error"]["message"].as_str() {
            anyhow::bail!("generation failed: {err}");
        }
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(piece);
            write!(out, "{piece}")?;
            out.flush()?;
        }
        Ok(true)
    })?;
    writeln!(out)?;
    Ok(answer)
}
