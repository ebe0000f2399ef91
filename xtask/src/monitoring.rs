//! What an operator loads into their monitoring: the alert rules `promtool` must accept, and
//! a Grafana dashboard that must at least be a JSON document with panels.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Checks `systemd/prometheus-rules.yml` with `promtool check rules` and parses
/// `systemd/grafana-dashboard.json`.
pub fn check(root: &Path) -> Result<()> {
    let rules = root.join("systemd/prometheus-rules.yml");
    let out = cmd::output(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules),
    )
    .with_context(|| format!("promtool does not accept {}", rules.display()))?;
    print!("{out}");

    let dashboard = root.join("systemd/grafana-dashboard.json");
    let text = std::fs::read_to_string(&dashboard)
        .with_context(|| format!("cannot read {}", dashboard.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", dashboard.display()))?;
    let panels = json["panels"].as_array().map_or(0, Vec::len);
    if panels == 0 {
        bail!("{} has no panels", dashboard.display());
    }
    println!("{}: {panels} panels", dashboard.display());
    Ok(())
}
