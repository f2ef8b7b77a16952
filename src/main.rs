//! `recover`: parse the arguments, run the library, turn errors into an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    rora::runtime::configure_threads();
    rora::runtime::configure_allocator();
    let cli = rora::cli::Cli::parse();
    match rora::runtime::run_on_pool(|| rora::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
