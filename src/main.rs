//! The `samgate` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    samgate::cli::main()
}
