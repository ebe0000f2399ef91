//! `cargo xtask ci`: the whole CI run, each step timed, failing fast with the step's name.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::cmd;
use crate::monitoring;
use crate::packages;
use crate::unit;

/// Options of the CI run.
#[derive(Debug)]
pub struct Options {
    /// Install nothing; only warn about missing packages and tools.
    pub skip_install: bool,
    /// Skip `cargo doc`.
    pub quick: bool,
}

/// One finished step: its name and how long it took.
#[derive(Debug)]
struct Timing {
    name: &'static str,
    elapsed: Duration,
    ok: bool,
}

/// Collects the step timings and prints the summary table.
#[derive(Debug, Default)]
struct Steps {
    done: Vec<Timing>,
}

impl Steps {
    /// Runs `f` as step `name`: prints a header before and the duration after; on failure the
    /// error names the step.
    fn step(
        &mut self,
        name: &'static str,
        what: &str,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        println!("==> {name}: {what}");
        let start = Instant::now();
        let result = f();
        let elapsed = start.elapsed();
        self.done.push(Timing {
            name,
            elapsed,
            ok: result.is_ok(),
        });
        match result {
            Ok(()) => {
                println!("==> {name} ({})", seconds(elapsed));
                Ok(())
            }
            Err(e) => {
                println!("==> {name} FAILED ({})", seconds(elapsed));
                Err(e.context(format!("CI step `{name}` failed")))
            }
        }
    }

    /// Runs a cargo command as step `name`.
    fn cargo(&mut self, name: &'static str, args: &[&str], env: &[(&str, String)]) -> Result<()> {
        let mut c = Command::new(cmd::cargo());
        c.args(args).current_dir(cmd::workspace_root());
        for (k, v) in env {
            c.env(k, v);
        }
        let what = format!(
            "{}cargo {}",
            env.iter()
                .map(|(k, v)| format!("{k}={v:?} "))
                .collect::<String>(),
            args.join(" ")
        );
        self.step(name, &what, || cmd::run(&mut c))
    }

    fn summary(&self) -> String {
        let width = self
            .done
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut out = format!("{:<width$}  {:>9}\n", "step", "time");
        let mut total = Duration::ZERO;
        for t in &self.done {
            total += t.elapsed;
            let mark = if t.ok { "" } else { "  FAILED" };
            out.push_str(&format!(
                "{:<width$}  {:>9}{mark}\n",
                t.name,
                seconds(t.elapsed)
            ));
        }
        out.push_str(&format!("{:<width$}  {:>9}\n", "total", seconds(total)));
        out
    }
}

/// Free space the tests need under the temporary directory: the 1 GiB transfers hold the
/// payload, both spools and the delivered copy (4 GiB) while other tests run beside them.
const TESTS_NEED: u64 = 8 << 30;

/// Free space the release build and the test binaries need in the workspace's `target/`.
const BUILD_NEEDS: u64 = 12 << 30;

/// Fails with the figures when `dir`'s file system has less than `need` bytes free: a full disk
/// otherwise shows up 20 minutes later as a transfer test that waits, as designed, for a full
/// spool to drain.
fn enough_space(dir: &std::path::Path, need: u64) -> Result<()> {
    let free = cmd::free_bytes(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    if free < need {
        return Err(anyhow!(
            "{:.1} GiB free under {}, CI needs {:.0} GiB there; free some space or point \
             TMPDIR (tests) or CARGO_TARGET_DIR (build) at a roomier file system",
            gib(free),
            dir.display(),
            gib(need)
        ));
    }
    println!("{:.1} GiB free under {}", gib(free), dir.display());
    Ok(())
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// True when `cargo nextest` answers.
fn have_nextest() -> bool {
    Command::new(cmd::cargo())
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the CI steps in order and prints the summary, also after a failure.
pub fn run(opts: &Options) -> Result<()> {
    let mut steps = Steps::default();
    let result = run_steps(&mut steps, opts);
    println!("\n{}", steps.summary());
    match &result {
        Ok(()) => println!("ci: all steps passed"),
        Err(_) => println!("ci: FAILED"),
    }
    result
}

fn run_steps(steps: &mut Steps, opts: &Options) -> Result<()> {
    // A fresh clone builds everything once: incremental state is only overhead there.
    let mut env: Vec<(&str, String)> = Vec::new();
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        env.push(("CARGO_INCREMENTAL", "0".to_owned()));
    }

    steps.step(
        "packages",
        "Debian packages for the tests",
        || match packages::ensure(packages::TEST_PACKAGES, !opts.skip_install) {
            Err(e) if opts.skip_install => {
                println!("warning (--skip-install): {e:#}");
                Ok(())
            }
            other => other,
        },
    )?;

    steps.step(
        "python-packages",
        "PyPI packages for the tests (pinned)",
        || match packages::ensure_python(packages::TEST_PYTHON_PACKAGES, !opts.skip_install) {
            Err(e) if opts.skip_install => {
                println!("warning (--skip-install): {e:#}");
                Ok(())
            }
            other => other,
        },
    )?;

    steps.step("nextest", "cargo-nextest", || {
        if have_nextest() {
            println!("cargo-nextest found");
            return Ok(());
        }
        if opts.skip_install {
            return Err(anyhow!(
                "cargo-nextest is not installed; run `cargo install cargo-nextest --locked`"
            ));
        }
        let mut c = Command::new(cmd::cargo());
        c.args(["install", "cargo-nextest", "--locked"]);
        cmd::run(&mut c).context("installing cargo-nextest failed")?;
        if !have_nextest() {
            return Err(anyhow!(
                "cargo-nextest was installed but `cargo nextest` does not answer; is \
                 ~/.cargo/bin on PATH?"
            ));
        }
        Ok(())
    })?;

    steps.step(
        "disk",
        "free space for the build and the tests' temporary directories",
        || {
            enough_space(&std::env::temp_dir(), TESTS_NEED)?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .filter(|t| t.exists())
                .unwrap_or_else(cmd::workspace_root);
            enough_space(&target, BUILD_NEEDS)
        },
    )?;

    steps.cargo("fmt", &["fmt", "--all", "--", "--check"], &env)?;
    steps.cargo(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
        &env,
    )?;
    // The shipped binary is built without the default `dev-env` feature (no `baylink
    // dev-env`, no test PKI): keep that build compiling.
    steps.cargo(
        "check-shipped",
        &[
            "clippy",
            "-p",
            "baylink",
            "--no-default-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
        &env,
    )?;
    // The fuzz targets (own workspace and lockfile, not a member of this one) build on
    // stable for `check`; cargo-fuzz's nightly sanitizer build is not needed to keep them
    // compiling. The workspace's target directory lets the check reuse its dependencies.
    steps.cargo(
        "fuzz-check",
        &[
            "check",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--bins",
            "--locked",
            "--target-dir",
            "target",
        ],
        &env,
    )?;
    if opts.quick {
        println!("==> doc: skipped (--quick)");
    } else {
        let mut doc_env = env.clone();
        let flags = match std::env::var("RUSTDOCFLAGS") {
            Ok(existing) if !existing.trim().is_empty() => format!("{existing} -D warnings"),
            _ => "-D warnings".to_owned(),
        };
        doc_env.push(("RUSTDOCFLAGS", flags));
        steps.cargo(
            "doc",
            &["doc", "--workspace", "--no-deps", "--locked"],
            &doc_env,
        )?;
    }
    // The integration tests run the real `baylink` binary: build every binary of the
    // workspace in the test profile first (the test build below reuses it).
    steps.cargo(
        "build",
        &["build", "--workspace", "--bins", "--release", "--locked"],
        &env,
    )?;
    steps.step(
        "systemd",
        "systemd-analyze verify and security of systemd/baylink.service",
        || unit::check(&cmd::workspace_root()),
    )?;
    steps.step(
        "monitoring",
        "promtool check rules systemd/prometheus-rules.yml; the Grafana dashboard parses",
        || monitoring::check(&cmd::workspace_root()),
    )?;
    steps.cargo(
        "test",
        &[
            "nextest",
            "run",
            "--workspace",
            "--release",
            "--locked",
            "--profile",
            "ci",
        ],
        &env,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_space_is_refused_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        enough_space(dir.path(), 1).unwrap();
        let e = enough_space(dir.path(), u64::MAX).unwrap_err().to_string();
        assert!(e.contains("GiB free under"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn steps_time_and_name_failures() {
        let mut steps = Steps::default();
        steps.step("first", "ok", || Ok(())).unwrap();
        let e = steps
            .step("second", "fails", || Err(anyhow!("boom")))
            .unwrap_err();
        assert_eq!(format!("{e:#}"), "CI step `second` failed: boom");
        assert_eq!(steps.done.len(), 2);
        assert!(steps.done[0].ok);
        assert!(!steps.done[1].ok);
    }

    #[test]
    fn summary_lists_every_step_and_a_total() {
        let steps = Steps {
            done: vec![
                Timing {
                    name: "clippy",
                    elapsed: Duration::from_millis(12_345),
                    ok: true,
                },
                Timing {
                    name: "test",
                    elapsed: Duration::from_millis(1_000),
                    ok: false,
                },
            ],
        };
        let s = steps.summary();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4, "{s}");
        assert!(lines[0].starts_with("step"));
        assert!(
            lines[1].starts_with("clippy") && lines[1].ends_with("12.3 s"),
            "{s}"
        );
        assert!(
            lines[2].starts_with("test") && lines[2].ends_with("FAILED"),
            "{s}"
        );
        assert!(
            lines[3].starts_with("total") && lines[3].ends_with("13.3 s"),
            "{s}"
        );
    }

    #[test]
    fn a_failing_cargo_step_names_step_and_command() {
        let mut steps = Steps::default();
        let e = steps
            .cargo("bogus", &["no-such-cargo-subcommand-xtask"], &[])
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.starts_with("CI step `bogus` failed"), "{text}");
        assert!(text.contains("no-such-cargo-subcommand-xtask"), "{text}");
    }
}
