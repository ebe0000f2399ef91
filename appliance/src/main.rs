//! `baylink`: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baylink::cli::Cli::parse();
    baylink::commands::init_tracing(cli.log_format);
    baylink::commands::run(cli)
}
