//! The `quantd` binary: parses the command line and hands over to `quantd::cli`.

fn main() -> std::process::ExitCode {
    // candle sizes its thread pools from RAYON_NUM_THREADS, and without it re-counts physical
    // cores from /proc/cpuinfo on every dense matmul (tens of microseconds each, hundreds of
    // times per decoded token). Fixing the count once, before any thread exists, avoids that.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    quantd::cli::main()
}
