//! `quantd quantize`, `quantd convert` and `quantd export`: the same checkpoint reader, plan and
//! pipeline as jobs, run in-process with a progress bar and no server or database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::config::{cpu_count, Settings};
use crate::export::bnb::write_bnb_folder;
use crate::export::gguf_meta;
use crate::export::gptq::{write_grouped_folder, Layout};
use crate::export::hf::{write_hf_folder, HfDtype};
use crate::formats::gguf::Value;
use crate::jobs::calibrate::{calibrate, calibration_windows, Calibrated, CalibrationSource};
use crate::jobs::pipeline::{quantize_gguf, Hooks};
use crate::jobs::spec::{CalibrationParams, MethodSpec};
use crate::jobs::submit::quantization_plan;
use crate::model::checkpoint::Checkpoint;
use crate::quant::imatrix::ImportanceMatrix;
use crate::quant::{GgufType, Plan};
use crate::store::sync_dir;

#[derive(Args)]
pub struct QuantizeArgs {
    /// An HF folder (config.json, tokenizer.json, *.safetensors) or a .gguf file.
    input: PathBuf,
    /// Method: `gguf` (needs --type), `rtn` (--bits, --group-size, --asym), `gptq` (those and
    /// --calib, --samples, --seq-len, --seed, --act-order, --damp-percent), `awq`,
    /// `int8-dynamic` (--activations), `llm-int8` (--threshold), `nf4` or `fp4` (--block-size,
    /// --double-quant).
    #[arg(long, default_value = "gguf")]
    method: String,
    /// GGUF type: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_0, Q5_1, Q4_K_M, Q4_K_S, Q4_0, Q4_1, Q3_K_L,
    /// Q3_K_M, Q3_K_S, Q2_K, F16, BF16, F32.
    #[arg(long = "type")]
    gguf_type: Option<String>,
    /// rtn, gptq: bits per weight (4 or 8).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// rtn, gptq: columns per group (32, 64, 128; −1 = per output channel).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    group_size: i64,
    /// rtn, gptq: asymmetric groups (a zero point per group).
    #[arg(long)]
    asym: bool,
    /// gptq, awq: a UTF-8 text file to calibrate on; gguf: collect an importance matrix on it.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// gptq, awq, gguf (importance matrix): calibrate on text the model generates itself from
    /// its BOS token, for when no calibration text is at hand.
    #[arg(long, conflicts_with_all = ["calib", "imatrix"])]
    data_free: bool,
    /// gguf: weight the encoders with this importance matrix (llama.cpp's GGUF or legacy .dat
    /// format, e.g. from llama-imatrix) instead of collecting one.
    #[arg(long, conflicts_with = "calib")]
    imatrix: Option<PathBuf>,
    /// gguf with --calib: also write the collected importance matrix here, in llama.cpp's GGUF
    /// format (llama-quantize --imatrix reads it).
    #[arg(long, requires = "calib")]
    save_imatrix: Option<PathBuf>,
    /// gptq: calibration windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// gptq: tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// gptq: seed of the window offsets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// gptq: also write the calibration windows (token ids, JSON) here, to feed another tool
    /// exactly the same data.
    #[arg(long)]
    save_windows: Option<PathBuf>,
    /// gptq: quantize columns in their stored order instead of by decreasing Hessian diagonal
    /// (act_order, static groups, is the default).
    #[arg(long)]
    no_act_order: bool,
    /// awq: AutoAWQ's scales mean|x|^α / mean_w^(1−α) instead of the paper's mean|x|^α.
    #[arg(long)]
    duo_scaling: bool,
    /// awq: skip the per-group clipping search (`clip: false`), e.g. to match a tool without one.
    #[arg(long)]
    no_clip: bool,
    /// int8-dynamic: how activations are quantized at run time: `per_token`, or `torch` (one
    /// asymmetric 7-bit scale per call, as PyTorch's `quantize_dynamic`).
    #[arg(long, default_value = "per_token")]
    activations: String,
    /// int8-dynamic: `per_channel` (absmax/127 per output row) or `per_tensor` (PyTorch's
    /// default observer; `torch` activations only). Default: per_tensor with
    /// `--activations torch`, else per_channel.
    #[arg(long)]
    int8_weights: Option<String>,
    /// int8-dynamic: `int8` quantizes the LM head too (PyTorch's default recipe, the default
    /// with `--activations torch`), `float` keeps it.
    #[arg(long)]
    head: Option<String>,
    /// llm-int8: input columns with any |x| at or above this run in float.
    #[arg(long, default_value_t = 6.0)]
    threshold: f32,
    /// nf4, fp4: weights per absmax.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// nf4, fp4: store the absmax values in 8 bits (QLoRA's double quantization).
    #[arg(long)]
    double_quant: bool,
    /// gptq: dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp_percent: f64,
    /// Output .gguf file, or a directory to put `<name>-<type>.gguf` in.
    #[arg(long)]
    out: PathBuf,
    /// Per-tensor override, `REGEX=TYPE` (e.g. `ffn_down=Q8_0`); repeatable, last match wins.
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Threads for tensor work (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the plan as JSON and exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A .gguf file (→ HF folder) or an HF folder (→ .gguf file).
    input: PathBuf,
    /// The output folder (from GGUF) or .gguf file (from HF).
    output: PathBuf,
    /// Float type of the output: f32, f16 or bf16 (default: f32 for HF output, f16 for GGUF).
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A GGUF written by `quantd quantize --method rtn|gptq|awq` (for gptq, awq) or
    /// `nf4|fp4|llm-int8|int8-dynamic` (for bnb), or such a job's artifact.
    input: PathBuf,
    /// `gptq` (AutoGPTQ/GPTQModel layout, `checkpoint_format: gptq`), `awq` (AutoAWQ GEMM) or
    /// `bnb` (transformers + bitsandbytes, 4- or 8-bit).
    #[arg(long)]
    format: String,
    /// The output folder (created; must be empty).
    #[arg(long)]
    out: PathBuf,
}

/// Opens a path as a checkpoint: a .gguf file, or every regular file in a folder.
pub fn open_path(path: &Path) -> anyhow::Result<Checkpoint> {
    let limits = crate::catalog::check_limits(&Settings::defaults());
    let mut files = BTreeMap::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let wanted = crate::model::checkpoint::HF_SIDE_FILES.contains(&name.as_str())
                || name.ends_with(".safetensors");
            if p.is_file() && wanted {
                files.insert(name, p);
            }
        }
    } else {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.gguf")
            .to_string();
        files.insert(name, path.to_path_buf());
    }
    Checkpoint::open(&files, limits).with_context(|| format!("opening {}", path.display()))
}

struct BarHooks(ProgressBar);

impl Hooks for BarHooks {
    fn progress(&self, stage: &'static str, done: u64, total: u64, unit: &'static str) {
        self.0.set_prefix(unit);
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.set_message(stage);
    }

    fn cancelled(&self) -> bool {
        false
    }
}

fn bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>11} [{bar:40}] {pos}/{len} {prefix} {elapsed_precise} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar
}

fn model_name(input: &Path) -> String {
    input
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string()
}

/// What a written GGUF says about itself.
struct Labels<'a> {
    /// `general.name`.
    name: &'a str,
    /// The method's parameters (`quantize.params`).
    params: serde_json::Value,
    /// The importance matrix's file, as llama-quantize records it: the one read, or saved.
    imatrix_file: Option<&'a Path>,
    /// Keys that tell quantd how to serve the file (`MethodSpec::serving_metadata`).
    serving: Vec<(String, Value)>,
}

/// Writes a GGUF for `ckpt` next to `out` (temp name), then renames it into place.
fn write_gguf(
    ckpt: &Checkpoint,
    plan: &Plan,
    labels: Labels<'_>,
    calibrated: Calibrated,
    out: &Path,
    threads: usize,
) -> anyhow::Result<()> {
    let mut metadata = gguf_meta::model_metadata(
        ckpt,
        labels.name,
        plan.file_type,
        !plan.gguf_type.is_float(),
    )?;
    metadata.extend(gguf_meta::provenance(
        plan.method,
        &labels.params,
        None,
        None,
    ));
    metadata.extend(labels.serving);
    if let Some(m) = &calibrated.imatrix {
        let file = labels.imatrix_file.map(|p| p.display().to_string());
        metadata.extend(m.provenance(file.as_deref()));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let tmp = out.with_extension("gguf.tmp");
    let hooks = BarHooks(bar());
    let result = quantize_gguf(ckpt, plan, calibrated, &metadata, &tmp, &pool, &hooks);
    hooks.0.finish();
    let (digest, size, report) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, out)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir)?;
    }
    println!(
        "wrote {} ({size} bytes, {:.3} bits/weight over quantized tensors, {digest}) in {:.2}s",
        out.display(),
        plan.bits_per_weight,
        report.wall_seconds
    );
    Ok(())
}

/// The job method the arguments describe: the flags become the same `params` the API takes,
/// and `MethodSpec::parse` reads and checks them as it does for `POST /v1/jobs`.
fn method_of(args: &QuantizeArgs) -> anyhow::Result<MethodSpec> {
    let params = match args.method.as_str() {
        "gguf" => {
            let type_name = args
                .gguf_type
                .as_deref()
                .context("--type is required for --method gguf")?;
            let overrides = args
                .overrides
                .iter()
                .map(|o| {
                    let (pattern, type_name) = o
                        .rsplit_once('=')
                        .with_context(|| format!("--override {o}: expected REGEX=TYPE"))?;
                    Ok(json!({"pattern": pattern, "type": type_name}))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            // The API takes llama-quantize's spelling; the CLI, like llama-quantize, any case.
            let gguf_type = GgufType::parse(type_name)
                .with_context(|| format!("--type {type_name}: unknown GGUF type"))?
                .name();
            json!({
                "type": gguf_type,
                "overrides": overrides,
                "imatrix": args.calib.is_some() || args.imatrix.is_some(),
            })
        }
        "rtn" => json!({"bits": args.bits, "group_size": args.group_size, "sym": !args.asym}),
        "gptq" => json!({
            "bits": args.bits,
            "group_size": args.group_size,
            "sym": !args.asym,
            "act_order": !args.no_act_order,
            "damp_percent": finite("--damp-percent", args.damp_percent)?,
        }),
        "awq" => json!({
            "bits": args.bits,
            "group_size": args.group_size,
            "zero_point": args.asym,
            "duo_scaling": args.duo_scaling,
            "clip": !args.no_clip,
        }),
        "int8-dynamic" => {
            let mut params = json!({"activations": args.activations});
            if let Some(w) = &args.int8_weights {
                params["weights"] = w.clone().into();
            }
            if let Some(h) = &args.head {
                params["head"] = h.clone().into();
            }
            params
        }
        "llm-int8" => json!({"threshold": finite("--threshold", args.threshold as f64)?}),
        "nf4" | "fp4" => json!({"block_size": args.block_size, "double_quant": args.double_quant}),
        other => bail!(
            "--method {other}: available methods are gguf, rtn, gptq, awq, int8-dynamic, \
             llm-int8, nf4 and fp4"
        ),
    };
    MethodSpec::parse(&args.method, params).map_err(|e| {
        let message = e.message.trim_start_matches(&format!("{}: ", e.param));
        anyhow::anyhow!("{}: {message}", flag_of(&e.param))
    })
}

/// JSON has no NaN or infinity (serde_json would write null): such a flag is refused here.
fn finite(flag: &str, v: f64) -> anyhow::Result<f64> {
    if !v.is_finite() {
        bail!("{flag} {v}: must be a finite number");
    }
    Ok(v)
}

/// The command-line flag that sets a parameter the parser named (`params.group_size` →
/// `--group-size`).
fn flag_of(param: &str) -> String {
    match param.strip_prefix("params.") {
        None => format!("--{param}"),
        Some("weights") => "--int8-weights".into(),
        Some("imatrix") => "--calib/--imatrix".into(),
        Some("sym") | Some("zero_point") => "--asym".into(),
        Some("act_order") => "--no-act-order".into(),
        Some("clip") => "--no-clip".into(),
        Some(field) => {
            let field = field.split(['.', '[']).next().unwrap_or(field);
            format!(
                "--{}",
                field.replace('_', "-").replace("overrides", "override")
            )
        }
    }
}

pub fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let method = method_of(&args)?;
    let threads = args.threads.unwrap_or_else(cpu_count).max(1);
    let ckpt = open_path(&args.input)?;
    let plan = quantization_plan(&method, &ckpt, threads).map_err(|e| anyhow::anyhow!("{e}"))?;
    let params = method.params_json();
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    let name = model_name(&args.input);
    let out = if args.out.is_dir() {
        args.out.join(format!(
            "{name}-{}.gguf",
            method
                .default_variant()
                .expect("quantizing methods name a variant")
        ))
    } else {
        args.out.clone()
    };
    if args.imatrix.is_some() && !matches!(method, MethodSpec::Gguf(_)) {
        bail!("--imatrix: method {} does not read one", method.name());
    }
    let calibrated = match (&method, &args.calib) {
        (_, None) if args.imatrix.is_some() => {
            let path = args.imatrix.as_deref().expect("checked");
            let m = ImportanceMatrix::read(path)
                .with_context(|| format!("--imatrix {}", path.display()))?;
            eprintln!(
                "importance matrix: {} entries from {:?}, {} chunks of {} tokens",
                m.entries.len(),
                m.datasets,
                m.chunk_count,
                m.chunk_size
            );
            Calibrated {
                imatrix: Some(m),
                ..Calibrated::default()
            }
        }
        (m, None) if m.calibrates() && !args.data_free => {
            bail!("--method {} needs --calib FILE or --data-free", m.name())
        }
        (m, calib) if m.calibrates() => {
            let text = calib
                .as_ref()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))
                })
                .transpose()?;
            let params = CalibrationParams {
                dataset: calib.as_ref().map(|path| path.display().to_string()),
                samples: args.samples,
                seq_len: args.seq_len,
                seed: args.seed,
            };
            params.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let from = match (&text, &params.dataset) {
                (Some(text), Some(name)) => CalibrationSource::Text { text, name },
                _ => CalibrationSource::DataFree,
            };
            if let (Some(file), Some(text)) = (&args.save_windows, &text) {
                let windows = calibration_windows(&ckpt, text, &params)?;
                std::fs::write(file, serde_json::to_vec(&windows)?)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
            let hooks = BarHooks(bar());
            let (calibrated, report) = calibrate(&ckpt, &method, &plan, from, &params, &hooks)?;
            hooks.0.finish();
            eprintln!(
                "calibrated on {} windows of {} tokens{} in {:.1}s",
                report.samples,
                report.seq_len,
                if report.data_free {
                    " the model generated (data-free)"
                } else {
                    ""
                },
                report.wall_seconds
            );
            if let (Some(file), Some(m)) = (&args.save_imatrix, &calibrated.imatrix) {
                let w = std::fs::File::create(file)
                    .with_context(|| format!("writing {}", file.display()))?;
                m.write_gguf(std::io::BufWriter::new(w))?;
                eprintln!("wrote {}", file.display());
            }
            calibrated
        }
        (_, Some(_)) => bail!("--calib: method {} does not calibrate", method.name()),
        (_, None) if args.data_free => {
            bail!("--data-free: method {} does not calibrate", method.name())
        }
        (_, None) => Calibrated::default(),
    };
    let labels = Labels {
        name: &name,
        params,
        imatrix_file: args.imatrix.as_deref().or(args.save_imatrix.as_deref()),
        serving: method.serving_metadata(),
    };
    write_gguf(&ckpt, &plan, labels, calibrated, &out, threads)
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let layout = match args.format.as_str() {
        "bnb" => None,
        other => Some(
            Layout::parse(other)
                .with_context(|| format!("--format {other}: must be gptq, awq or bnb"))?,
        ),
    };
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} exists and is not empty", args.out.display());
    }
    let ckpt = open_path(&args.input)?;
    let report = match layout {
        Some(layout) => serde_json::to_value(write_grouped_folder(&ckpt, &args.out, layout)?)?,
        None => serde_json::to_value(write_bnb_folder(&ckpt, &args.out)?)?,
    };
    println!("{report}");
    Ok(())
}

pub fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let ckpt = open_path(&args.input)?;
    match ckpt.format {
        crate::model::checkpoint::Format::Gguf => {
            let dtype = args
                .dtype
                .as_deref()
                .map_or(Some(HfDtype::F32), HfDtype::parse)
                .context("--dtype must be f32, f16 or bf16")?;
            if args.output.exists() && std::fs::read_dir(&args.output)?.next().is_some() {
                bail!("{} exists and is not empty", args.output.display());
            }
            let b = bar();
            write_hf_folder(&ckpt, &args.output, dtype, &|done, total| {
                b.set_length(total as u64);
                b.set_position(done as u64);
            })?;
            b.finish();
            println!("wrote {}", args.output.display());
            Ok(())
        }
        crate::model::checkpoint::Format::HfSafetensors => {
            let t = match args
                .dtype
                .as_deref()
                .unwrap_or("f16")
                .to_ascii_lowercase()
                .as_str()
            {
                "f32" => GgufType::F32,
                "f16" => GgufType::F16,
                "bf16" => GgufType::BF16,
                other => bail!("--dtype {other}: must be f32, f16 or bf16"),
            };
            let tensors = ckpt.tensor_shapes();
            let plan = Plan::gguf(&ckpt.config, &tensors, t, &[], false, cpu_count());
            let params = serde_json::json!({"type": t});
            let labels = Labels {
                name: &model_name(&args.input),
                params,
                imatrix_file: None,
                serving: Vec::new(),
            };
            write_gguf(
                &ckpt,
                &plan,
                labels,
                Calibrated::default(),
                &args.output,
                cpu_count(),
            )
        }
    }
}
