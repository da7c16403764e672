//! `quantd jobs submit|list|watch|cancel`: jobs on a running server; `watch` follows the job's
//! event stream with a progress bar and exits non-zero unless the job succeeds.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::api::{read_events, Api, Connection};
use super::{data, print_table};

#[derive(clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(clap::Subcommand)]
pub enum JobsCommand {
    /// Submit a job (the body of POST /v1/jobs, from flags or --body).
    Submit(SubmitArgs),
    /// List jobs, newest first.
    List(ListArgs),
    /// Follow a job's events until it ends; exit status 0 only if it succeeded.
    Watch(WatchArgs),
    /// Cancel a queued or running job.
    Cancel(IdArgs),
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The model to quantize or evaluate.
    #[arg(long, required_unless_present = "body")]
    pub model: Option<String>,
    /// gguf, rtn, gptq, awq, int8-dynamic, llm-int8, nf4, fp4, eval.
    #[arg(long, required_unless_present = "body")]
    pub method: Option<String>,
    /// The method's parameters as JSON, e.g. '{"type": "Q4_K_M"}'.
    #[arg(long)]
    pub params: Option<String>,
    #[arg(long)]
    pub output_name: Option<String>,
    /// Return the plan without running anything.
    #[arg(long)]
    pub dry_run: bool,
    /// A whole request body as JSON (flags given beside it override its fields).
    #[arg(long)]
    pub body: Option<String>,
    /// Follow the job until it ends, as `jobs watch` does.
    #[arg(long)]
    pub watch: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Args)]
pub struct WatchArgs {
    pub id: String,
    /// Print each event as one JSON line instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Args)]
pub struct IdArgs {
    pub id: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

pub fn run(args: JobsArgs) -> anyhow::Result<()> {
    match args.command {
        JobsCommand::Submit(a) => submit(a),
        JobsCommand::List(a) => list(a),
        JobsCommand::Watch(a) => watch(&Api::new(&a.conn)?, &a.id, a.json),
        JobsCommand::Cancel(a) => cancel(a),
    }
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))
}

fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let mut body = match &a.body {
        Some(b) => parse_json("--body", b)?,
        None => json!({}),
    };
    if !body.is_object() {
        bail!("--body must be a JSON object");
    }
    if let Some(m) = &a.model {
        body["model"] = json!(m);
    }
    if let Some(m) = &a.method {
        body["method"] = json!(m);
    }
    if let Some(p) = &a.params {
        body["params"] = parse_json("--params", p)?;
    }
    if let Some(n) = &a.output_name {
        body["output_name"] = json!(n);
    }
    if a.dry_run {
        body["dry_run"] = json!(true);
    }
    let api = Api::new(&a.conn)?;
    let job = api.post("/v1/jobs", &body)?;
    if a.json && !a.watch {
        println!("{job}");
        return Ok(());
    }
    if a.dry_run {
        println!("{}", serde_json::to_string_pretty(&job["plan"])?);
        return Ok(());
    }
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if !a.json {
        println!(
            "submitted {id}: {} {} → {}",
            job["method"].as_str().unwrap_or("?"),
            job["model"].as_str().unwrap_or("?"),
            job["output_name"].as_str().unwrap_or("-")
        );
    }
    if a.watch {
        watch(&api, &id, a.json)?;
    }
    Ok(())
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.conn)?;
    let mut query = vec![format!("limit={}", a.limit)];
    if let Some(s) = &a.status {
        query.push(format!("status={s}"));
    }
    if let Some(m) = &a.model {
        query.push(format!("model={m}"));
    }
    let page = api.get(&format!("/v1/jobs?{}", query.join("&")))?;
    if a.json {
        println!("{page}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = data(&page)
        .iter()
        .map(|j| {
            let p = &j["progress"];
            let progress = match (p["done"].as_i64(), p["total"].as_i64()) {
                (Some(d), Some(t)) if t > 0 => format!("{d}/{t}"),
                _ => String::new(),
            };
            vec![
                j["id"].as_str().unwrap_or("?").to_string(),
                j["method"].as_str().unwrap_or("").to_string(),
                j["model"].as_str().unwrap_or("").to_string(),
                j["status"].as_str().unwrap_or("").to_string(),
                j["stage"].as_str().unwrap_or("").to_string(),
                progress,
                j["output_name"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "JOB", "METHOD", "MODEL", "STATUS", "STAGE", "PROGRESS", "OUTPUT",
        ],
        &rows,
    );
    Ok(())
}

/// Follows `/v1/jobs/{id}/events` to the job's end.
pub fn watch(api: &Api, id: &str, json_lines: bool) -> anyhow::Result<()> {
    let resp = api.send(api.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events")))?;
    let bar = if json_lines {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} {prefix:12} [{bar:30}] {pos}/{len} {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        b
    };
    let mut outcome: Option<Value> = None;
    read_events(resp, |e| {
        let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::String(e.data.clone()));
        if json_lines {
            println!("{}", json!({"event": e.event, "data": data}));
        }
        match e.event.as_str() {
            "progress" => {
                if let Some(s) = data["stage"].as_str() {
                    bar.set_prefix(s.to_string());
                }
                bar.set_length(data["total"].as_u64().unwrap_or(0));
                bar.set_position(data["done"].as_u64().unwrap_or(0));
                bar.set_message(data["unit"].as_str().unwrap_or("").to_string());
            }
            "stage" => {
                bar.set_prefix(data["stage"].as_str().unwrap_or("").to_string());
                bar.set_position(0);
            }
            "log" => {
                if let Some(m) = data["message"].as_str() {
                    bar.println(m);
                }
            }
            "done" | "failed" | "cancelled" => {
                outcome = Some(json!({"event": e.event, "data": data}));
                return Ok(false);
            }
            _ => {}
        }
        Ok(true)
    })?;
    bar.finish_and_clear();
    let Some(outcome) = outcome else {
        bail!("the event stream of {id} ended before the job did");
    };
    let data = &outcome["data"];
    match outcome["event"].as_str() {
        Some("done") => {
            if !json_lines {
                println!(
                    "{id} succeeded: {}",
                    data["output_model"].as_str().unwrap_or("no model (eval)")
                );
            }
            Ok(())
        }
        Some(kind) => bail!(
            "{id} {kind}: {}",
            data["error"].as_str().unwrap_or("no reason given")
        ),
        None => unreachable!("outcome always has an event"),
    }
}

fn cancel(a: IdArgs) -> anyhow::Result<()> {
    let api = Api::new(&a.conn)?;
    let job = api.post(&format!("/v1/jobs/{}/cancel", a.id), &json!({}))?;
    if a.json {
        println!("{job}");
    } else {
        println!(
            "{}: {}",
            a.id,
            job["status"].as_str().unwrap_or("cancel requested")
        );
    }
    Ok(())
}
