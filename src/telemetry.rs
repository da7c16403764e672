//! Logging set-up and the start-up report of which SIMD kernels this binary was compiled with.
//! candle chooses its quantized matmul kernels with `cfg(target_feature)`, so a build without
//! the flags in `.cargo/config.toml` silently runs scalar code; saying so at start-up makes
//! that mistake visible.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global tracing subscriber on stdout (`RUST_LOG` wins over the default `info`).
/// Colour codes only go to a terminal (and not with a non-empty `NO_COLOR`), so a log file stays plain text.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            let ansi = std::io::stdout().is_terminal() && !no_color;
            builder.with_ansi(ansi).try_init()
        }
        // Event fields at the top level; the fields of the spans the line was emitted in (the
        // request's `request_id`, the job's `job_id`) under "spans", innermost last.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// What the compiled binary and the running CPU offer, in one line for the start-up log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimdReport {
    /// Kernels compiled into candle's quantized matmul (decided at build time).
    pub candle_kernels: &'static str,
    pub compiled_avx2: bool,
    pub compiled_fma: bool,
    pub compiled_f16c: bool,
    pub cpu_avx2: bool,
    pub cpu_avx512f: bool,
    pub cpu_avx512vnni: bool,
    /// The int8 GEMM `int8-dynamic` and `llm-int8` run (chosen at run time).
    pub int8_kernel: &'static str,
}

impl SimdReport {
    pub fn detect() -> Self {
        let candle_kernels = if candle_core::utils::with_avx() {
            "avx2"
        } else if candle_core::utils::with_neon() {
            "neon"
        } else if candle_core::utils::with_simd128() {
            "simd128"
        } else {
            "scalar"
        };
        #[cfg(target_arch = "x86_64")]
        let (cpu_avx2, cpu_avx512f, cpu_avx512vnni) = (
            std::arch::is_x86_feature_detected!("avx2"),
            std::arch::is_x86_feature_detected!("avx512f"),
            std::arch::is_x86_feature_detected!("avx512vnni"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (cpu_avx2, cpu_avx512f, cpu_avx512vnni) = (false, false, false);
        Self {
            candle_kernels,
            compiled_avx2: cfg!(target_feature = "avx2"),
            compiled_fma: cfg!(target_feature = "fma"),
            compiled_f16c: cfg!(target_feature = "f16c"),
            cpu_avx2,
            cpu_avx512f,
            cpu_avx512vnni,
            int8_kernel: crate::kernels::int8_gemm::Isa::detect().name(),
        }
    }

    /// Logs the report; warns loudly when the binary runs scalar kernels on a CPU with AVX2.
    pub fn log(&self) {
        tracing::info!(
            candle_kernels = self.candle_kernels,
            compiled_avx2 = self.compiled_avx2,
            compiled_fma = self.compiled_fma,
            compiled_f16c = self.compiled_f16c,
            cpu_avx2 = self.cpu_avx2,
            cpu_avx512f = self.cpu_avx512f,
            cpu_avx512vnni = self.cpu_avx512vnni,
            int8_kernel = self.int8_kernel,
            "SIMD kernels"
        );
        if self.candle_kernels == "scalar" && self.cpu_avx2 {
            tracing::warn!(
                "this binary was built without AVX2 flags: quantized matmuls run scalar code \
                 (4-7x slower); build with the repository's .cargo/config.toml"
            );
        }
    }
}
