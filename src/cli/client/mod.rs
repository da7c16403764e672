//! The CLI client: `quantd upload`, `quantd models`, `quantd jobs submit|list|watch|cancel` and
//! `quantd chat`, each against a running server (`--url`/`QUANTD_URL`, `--api-key`/
//! `QUANTD_API_KEY`). Human-readable output by default; `--json` prints the server's JSON for
//! scripts. A refused request exits non-zero with the server's message and field.

mod api;
pub mod chat;
pub mod jobs;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use api::Api;
pub use api::Connection;
pub use chat::ChatArgs;
pub use jobs::JobsArgs;

#[derive(clap::Args)]
pub struct UploadArgs {
    /// An HF folder (config.json, tokenizer files, *.safetensors) or one .gguf file.
    pub path: PathBuf,
    /// The model id to create (default: the server picks one from the files).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Args)]
pub struct ModelsArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

/// Files of an upload: each regular file of a folder (not hidden), or the one file.
fn upload_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no files to upload", path.display());
    }
    Ok(files)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Uploads each file as a content-addressed blob (skipping blobs the server has), then
/// creates the model from their digests: large files stream, and a rerun resends nothing.
pub fn upload(args: UploadArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.conn)?;
    let mut files = serde_json::Map::new();
    for path in upload_files(&args.path)? {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let digest = sha256_of(&path)?;
        let head = api
            .request(reqwest::Method::HEAD, &format!("/v1/blobs/{digest}"))
            .send();
        let present = matches!(head, Ok(r) if r.status().is_success());
        if !present {
            let size = std::fs::metadata(&path)?.len();
            if !args.json {
                eprintln!("uploading {name} ({:.1} MB)", size as f64 / 1e6);
            }
            let file = std::fs::File::open(&path)?;
            api.send(
                api.request(reqwest::Method::PUT, &format!("/v1/blobs/{digest}"))
                    .header("content-length", size)
                    .body(reqwest::blocking::Body::sized(file, size)),
            )?;
        }
        files.insert(name, Value::String(digest));
    }
    let mut body = json!({ "files": files });
    if let Some(n) = &args.name {
        body["name"] = json!(n);
    }
    let model = api.post("/v1/models", &body)?;
    if args.json {
        println!("{model}");
    } else {
        println!(
            "created {} ({}, {})",
            model["id"].as_str().unwrap_or("?"),
            model["kind"].as_str().unwrap_or("model"),
            human_bytes(model["size_bytes"].as_f64().unwrap_or(0.0))
        );
    }
    Ok(())
}

pub fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.conn)?;
    let list = api.get("/v1/models")?;
    if args.json {
        println!("{list}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = data(&list)
        .iter()
        .map(|m| {
            vec![
                m["id"].as_str().unwrap_or("?").to_string(),
                m["kind"].as_str().unwrap_or("").to_string(),
                human_bytes(m["size_bytes"].as_f64().unwrap_or(0.0)),
                m["bits_per_weight"]
                    .as_f64()
                    .map_or(String::new(), |b| format!("{b:.2}")),
            ]
        })
        .collect();
    print_table(&["MODEL", "KIND", "SIZE", "BITS/W"], &rows);
    Ok(())
}

/// The `data` array of a list response (empty if absent).
pub fn data(list: &Value) -> &[Value] {
    list["data"].as_array().map_or(&[], |a| a.as_slice())
}

pub fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}
