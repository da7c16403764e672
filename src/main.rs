//! The `quantd` binary: parses the command line and hands over to `quantd::cli`.

fn main() -> std::process::ExitCode {
    quantd::process_tuning::apply();
    quantd::cli::main()
}
