//! The command line: `serve`, `quantize` (offline, the job code path with a progress bar),
//! `convert` (GGUF ⇄ HF safetensors), `export` (GPTQ/AWQ/bitsandbytes checkpoints), `eval`,
//! `bench`, `migrate`, and the client commands against a running server (`upload`, `models`,
//! `jobs`, `chat`).

mod bench;
mod client;
mod eval;
mod offline;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Role, Settings};
use crate::startup::{cancel_on_signals, Application};
use crate::telemetry;

#[derive(Parser)]
#[command(
    name = "quantd",
    version,
    about = "Quantize LLM checkpoints, measure the loss, serve the variants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (defaults: 127.0.0.1:8080, ./data).
    Serve {
        /// A TOML file layered over the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Allow binding a non-loopback address with no API keys.
        #[arg(long)]
        allow_unauthenticated: bool,
        /// What this replica does (overrides `role` in the configuration): all, api or worker.
        #[arg(long, value_enum)]
        role: Option<Role>,
    },
    /// Quantize a checkpoint (HF folder or .gguf) to a GGUF file, offline.
    Quantize(Box<offline::QuantizeArgs>),
    /// Convert between GGUF and HF safetensors (direction from the input).
    Convert(offline::ConvertArgs),
    /// Write an rtn/gptq/awq GGUF as a GPTQ or AWQ (GEMM) safetensors checkpoint.
    Export(offline::ExportArgs),
    /// Perplexity of a model on a text, and KL divergence / top-1 against a reference.
    Eval(eval::EvalArgs),
    /// Measure inference speed (prompt processing, decoding, concurrent streams).
    Bench(bench::BenchArgs),
    /// Upload an HF folder or a GGUF file to a running server (as blobs, then the model).
    Upload(client::UploadArgs),
    /// List the server's models.
    Models(client::ModelsArgs),
    /// Submit, list, follow and cancel jobs on a running server.
    Jobs(client::JobsArgs),
    /// Chat with a served model, answers streamed as they are generated.
    Chat(client::ChatArgs),
    /// Create or upgrade the database under data_dir, then exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` installs its logger once its settings (log_format) are read.
    if !matches!(cli.command, Command::Serve { .. }) {
        telemetry::init(LogFormat::Text);
    }
    let result = match cli.command {
        Command::Serve {
            config,
            allow_unauthenticated,
            role,
        } => serve(config, allow_unauthenticated, role),
        Command::Quantize(args) => offline::quantize(*args),
        Command::Convert(args) => offline::convert(args),
        Command::Export(args) => offline::export(args),
        Command::Bench(args) => bench::bench(args),
        Command::Eval(args) => eval::eval(args),
        Command::Upload(args) => client::upload(args),
        Command::Models(args) => client::models(args),
        Command::Jobs(args) => client::jobs::run(args),
        Command::Chat(args) => client::chat::run(args),
        Command::Migrate { config } => migrate(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(
    config: Option<PathBuf>,
    allow_unauthenticated: bool,
    role: Option<Role>,
) -> anyhow::Result<()> {
    let mut settings = Settings::load(config.as_deref())?;
    settings.server.allow_unauthenticated |= allow_unauthenticated;
    if let Some(role) = role {
        settings.role = role;
    }
    telemetry::init(settings.log_format);
    telemetry::SimdReport::detect().log();
    runtime()?.block_on(async {
        let app = Application::build(settings).await?;
        cancel_on_signals(app.shutdown_token());
        app.run_until_stopped().await
    })
}

fn migrate(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref())?;
    runtime()?.block_on(async {
        std::fs::create_dir_all(&settings.data_dir)?;
        crate::db::connect(&settings.database_url, &settings.data_dir).await?;
        if settings.database_url.is_empty() {
            println!(
                "database at {} is up to date",
                settings.data_dir.join("quantd.db").display()
            );
        } else {
            println!("the PostgreSQL database is up to date");
        }
        Ok(())
    })
}
