//! Project automation for baylink, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask ci`: installs the Debian packages the tests need, makes sure cargo-nextest is
//!   there, then runs fmt, clippy, clippy of the shipped build (`--no-default-features`),
//!   doc, the release build, the systemd unit's checks and the test suite, each step timed.
//!   `.ci/run` calls it.
//! - `cargo xtask demo`: builds `baylink`, sets up a loopback deployment with `baylink dev-env`
//!   delivering into a private Orthanc, sends a synthetic CT study into the edge by C-STORE
//!   (dcmtk `storescu`), follows it to the delivery notice, checks the study in Orthanc, the
//!   receipt and the notice with `openssl`, a refused study and both audit logs, and prints
//!   each stage's time.
//!
//! Deliberately small: std processes, std unix sockets and nix signals, no async runtime, so CI
//! compiles it in seconds before the real work starts.

#![forbid(unsafe_code)]

mod ci;
mod cmd;
mod demo;
mod evidence;
mod monitoring;
mod notify;
mod orthanc;
mod packages;
mod size;
mod unit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// baylink project automation.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything CI runs: packages, fmt, clippy, doc, tests (nextest, release).
    Ci(CiArgs),
    /// A CT study by C-STORE through a loopback edge → gateway into Orthanc, evidence checked.
    Demo(DemoArgs),
}

/// Options of `cargo xtask ci`.
#[derive(Debug, clap::Args)]
struct CiArgs {
    /// Do not install anything (Debian packages, cargo-nextest); only warn about what is missing.
    #[arg(long)]
    skip_install: bool,
    /// Skip the documentation build (faster local runs).
    #[arg(long)]
    quick: bool,
}

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Size of the synthetic CT study (512 x 512 16-bit slices of 512 KiB); suffixes K/M/G/T
    /// or KiB/MiB/GiB/TiB (powers of 1024) and kB/MB/GB/TB (powers of 1000), e.g. 64MiB, 1GiB.
    #[arg(long, default_value = "256MiB", value_parser = size::parse_size)]
    size: u64,
    /// Remove the demo directory afterwards and stop Orthanc (by default both stay, so the
    /// study can be looked at in Orthanc; the directory always stays when something failed).
    #[arg(long)]
    clean: bool,
    /// Use this baylink binary instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    baylink: Option<PathBuf>,
    /// Do not install missing Debian packages (softhsm2, dcmtk, orthanc, ...); fail instead.
    #[arg(long)]
    skip_install: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ci(args) => ci::run(&ci::Options {
            skip_install: args.skip_install,
            quick: args.quick,
        }),
        Command::Demo(args) => demo::run(&demo::Options {
            size: args.size,
            clean: args.clean,
            baylink: args.baylink,
            skip_install: args.skip_install,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ci_flags_parse() {
        let cli = Cli::try_parse_from(["xtask", "ci", "--skip-install", "--quick"]).unwrap();
        match cli.command {
            Command::Ci(a) => assert!(a.skip_install && a.quick),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "ci"]).unwrap();
        match cli.command {
            Command::Ci(a) => assert!(!a.skip_install && !a.quick),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn demo_size_has_a_default_and_takes_suffixes() {
        let cli = Cli::try_parse_from(["xtask", "demo"]).unwrap();
        match cli.command {
            Command::Demo(a) => {
                assert_eq!(a.size, 256 << 20);
                assert!(!a.clean);
                assert!(a.baylink.is_none());
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "demo", "--size", "512MiB", "--clean"]).unwrap();
        match cli.command {
            Command::Demo(a) => {
                assert_eq!(a.size, 512 << 20);
                assert!(a.clean);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn demo_rejects_a_bad_size_naming_it() {
        let err = Cli::try_parse_from(["xtask", "demo", "--size", "12 parsecs"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("12 parsecs"), "{text}");
    }
}
