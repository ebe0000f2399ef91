//! Running other programs with errors that say which command failed and how.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// The cargo that runs us (`$CARGO` under `cargo run`), else `cargo` from `PATH`.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A command as a person would type it, for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        s.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push('\'');
            s.push_str(&arg.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(&arg);
        }
    }
    s
}

/// Describes how a process ended: `exit status 3`, `killed by SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("{status}")
    }
}

/// Runs `cmd` with inherited stdout/stderr and no stdin; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.stdin(Stdio::null());
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout as text; stderr is inherited. Fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(out.status));
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
pub fn free_bytes(dir: &Path) -> nix::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_needs_quoting() {
        let mut c = Command::new("echo");
        c.args(["a", "b c", "", "it's"]);
        assert_eq!(display(&c), r"echo a 'b c' '' 'it'\''s'");
    }

    #[test]
    fn failures_name_the_command_and_status() {
        let e = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("sh -c 'exit 3'"), "{text}");
        assert!(text.contains("exit status 3"), "{text}");

        let e = run(&mut Command::new("/nonexistent/xtask-test")).unwrap_err();
        assert!(e.to_string().contains("cannot start"), "{e}");
    }

    #[test]
    fn signals_are_named() {
        let e = run(Command::new("sh").args(["-c", "kill -KILL $$"])).unwrap_err();
        assert!(e.to_string().contains("killed by SIGKILL"), "{e}");
    }

    #[test]
    fn output_captures_stdout() {
        let out = output(Command::new("sh").args(["-c", "echo hello"])).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
