//! The shipped systemd unit as an operator checks it: `systemd-analyze verify` (the unit loads,
//! its commands exist, its dependencies resolve) and `systemd-analyze security` (the exposure
//! score of its sandboxing, which must not rise above [`MAX_EXPOSURE`]).
//!
//! Neither needs a running systemd. `verify` resolves `ExecStart=` against a root directory,
//! so the check lays out a small one under `target/`: the release `baylink` at
//! `/usr/bin/baylink` (where the unit expects it), the host's `kill` for `ExecReload=`, and the
//! host's target units the unit's dependencies name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The highest exposure score (`systemd-analyze security`, 0.0 to 10.0) the unit may have.
pub const MAX_EXPOSURE: f64 = 1.2;

/// Verifies the unit in `systemd/` against the release binary and prints its exposure score;
/// fails when `verify` complains or the score is above [`MAX_EXPOSURE`].
pub fn check(root: &Path) -> Result<()> {
    let unit = root.join("systemd/baylink.service");
    let binary = root.join("target/release/baylink");
    if !binary.exists() {
        bail!(
            "{} is missing: the release build runs before this check",
            binary.display()
        );
    }
    let sysroot = root.join("target/unit-root");
    lay_out_root(&sysroot, &unit, &binary)?;

    let mut verify = Command::new("systemd-analyze");
    verify
        .arg("verify")
        .arg(format!("--root={}", sysroot.display()))
        .arg("baylink.service");
    let out = verify
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", cmd::display(&verify)))?;
    let complaints = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() || !complaints.is_empty() {
        bail!(
            "`{}` ({}): {complaints}",
            cmd::display(&verify),
            cmd::describe(out.status)
        );
    }
    println!("systemd-analyze verify: {} loads cleanly", unit.display());

    let mut security = Command::new("systemd-analyze");
    security
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit);
    let report = cmd::output(&mut security)?;
    let score = exposure(&report).with_context(|| {
        format!(
            "`{}` printed no overall exposure level:\n{report}",
            cmd::display(&security)
        )
    })?;
    for line in report.lines().filter(|l| l.starts_with('✗')) {
        println!(
            "  {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    println!("systemd-analyze security: exposure {score:.1} (at most {MAX_EXPOSURE:.1})");
    if score > MAX_EXPOSURE + 1e-9 {
        bail!(
            "{} has exposure {score:.1}, above {MAX_EXPOSURE:.1}: a sandboxing setting was lost \
             (the lines marked ✗ above)",
            unit.display()
        );
    }
    Ok(())
}

/// Makes `sysroot` hold what `verify` resolves: the unit, the binary, `kill`, the target units.
fn lay_out_root(sysroot: &Path, unit: &Path, binary: &Path) -> Result<()> {
    if sysroot.exists() {
        fs::remove_dir_all(sysroot)
            .with_context(|| format!("cannot remove {}", sysroot.display()))?;
    }
    let bin = sysroot.join("usr/bin");
    let units = sysroot.join("usr/lib/systemd/system");
    for dir in [&bin, &units] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Merged /usr, as on Debian: /bin/kill is /usr/bin/kill.
    std::os::unix::fs::symlink("usr/bin", sysroot.join("bin"))
        .with_context(|| format!("cannot link {}/bin", sysroot.display()))?;
    copy(binary, &bin.join("baylink"))?;
    copy(&which("kill")?, &bin.join("kill"))?;
    copy(unit, &units.join("baylink.service"))?;
    let host_units = Path::new("/usr/lib/systemd/system");
    let entries = fs::read_dir(host_units).with_context(|| {
        format!(
            "cannot list {} (is systemd installed?)",
            host_units.display()
        )
    })?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", host_units.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "target") && path.is_file() {
            let name = path.file_name().expect("a listed file has a name");
            copy(&path, &units.join(name))?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` is not on PATH"))
}

/// The score in `→ Overall exposure level for baylink.service: 1.2 OK 🙂`.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_is_read_off_the_summary_line() {
        let report = "✗ PrivateNetwork=  Service has access to the host's network  0.5\n\
                      \n→ Overall exposure level for baylink.service: 1.2 OK 🙂\n";
        assert_eq!(exposure(report), Some(1.2));
        assert_eq!(exposure("no summary here"), None);
    }

    #[test]
    fn the_shipped_unit_keeps_its_sandbox() {
        let root = cmd::workspace_root();
        let unit = fs::read_to_string(root.join("systemd/baylink.service")).unwrap();
        for line in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "PrivateUsers=yes",
            "DevicePolicy=closed",
            "ProcSubset=pid",
        ] {
            assert!(
                unit.lines().any(|l| l.trim() == line),
                "baylink.service lost `{line}`"
            );
        }
        // Capped, with values sized in docs/operations.md.
        for key in ["MemoryMax=", "TasksMax="] {
            assert!(
                unit.lines()
                    .any(|l| l.trim().strip_prefix(key).is_some_and(|v| !v.is_empty())),
                "baylink.service lost `{key}`"
            );
        }
    }
}
