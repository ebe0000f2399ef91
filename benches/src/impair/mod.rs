//! `baylink-bench impair`: a userspace network impairment forwarder (the kernel here has no
//! netem). Two network namespaces, each with one TUN device, joined by two forwarder threads
//! (one per direction) that apply delay, jitter, loss, reordering, duplication and a rate
//! limit with a bounded queue, to TCP and UDP alike.
//!
//! Protocol for callers: one line `ready <ns_a> <addr_a> <ns_b> <addr_b>` on stdout once
//! everything is up; SIGUSR1 cuts the link (every packet dropped both ways, prints `cut`),
//! SIGUSR2 restores it (prints `restored`); SIGINT/SIGTERM/SIGHUP stop it: the namespaces
//! and devices are removed and one JSON line with the settings and counters is printed last
//! on stdout (and written to `--stats FILE`). Exit 2 with a one-line reason when the machine
//! cannot do it (not root, no /dev/net/tun, no `ip`).

pub mod forward;
pub mod link;
pub mod netns;
pub mod shaper;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use forward::{CounterSnapshot, Shared};
use netns::{Names, Topology};
use shaper::{Impairment, Shaper};

/// Help text after the options.
pub const IMPAIR_HELP: &str = "\
Sets up two network namespaces blk<pid>a and blk<pid>b (addresses 10.x.y.1 and 10.x.y.2 of a
/30 derived from the pid, TUN devices of the same names, MTU 1500, loopback up in each) and
forwards between them with the impairment applied per direction (--rtt-ms is split in two
one-way delays). Run programs on either side with `ip netns exec blk<pid>a CMD`.

Prints `ready <ns_a> <addr_a> <ns_b> <addr_b>` once everything is up.
Signals: SIGUSR1 cuts the link (prints `cut`), SIGUSR2 restores it (prints `restored`),
SIGINT/SIGTERM stop: namespaces and devices are deleted, then one JSON line with the
settings and the per-direction counters (received, forwarded, forwarded_bytes, dropped_loss,
dropped_queue, dropped_cut, duplicated, reordered, write_errors) is printed on stdout and
written to --stats FILE. Namespaces left by a forwarder that crashed are removed at start.
Exit status: 0 after a clean stop, 2 when the machine cannot do it (needs root,
/dev/net/tun and iproute2), 1 on any other error.";

/// `baylink-bench impair`.
#[derive(Debug, Clone, Args)]
pub struct ImpairArgs {
    /// Round-trip time to add, ms (each direction gets half).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub rtt_ms: f64,
    /// Uniform jitter per direction, ms (delay ± jitter; reorders packets when large).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub jitter_ms: f64,
    /// Packet loss per direction, percent.
    #[arg(long, default_value_t = 0.0, value_parser = percent)]
    pub loss: f64,
    /// Packets (per direction, percent) that skip the delay and overtake those in flight.
    #[arg(long, default_value_t = 0.0, value_parser = percent)]
    pub reorder: f64,
    /// Packets (per direction, percent) delivered twice.
    #[arg(long, default_value_t = 0.0, value_parser = percent)]
    pub duplicate: f64,
    /// Rate limit per direction in Mbit/s of IP packets (0: unlimited).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub rate_mbit: f64,
    /// Queue in front of the rate limit, KiB (default: 100 ms at the rate, at least 64 KiB).
    #[arg(long)]
    pub queue_kib: Option<u64>,
    /// Seed of the random choices (loss, jitter, reorder, duplicate); same seed, same choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the final JSON line to this file.
    #[arg(long)]
    pub stats: Option<PathBuf>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` must be a number ≥ 0"));
    }
    Ok(v)
}

fn percent(s: &str) -> Result<f64, String> {
    let v = non_negative(s)?;
    if v > 100.0 {
        return Err(format!("`{s}` is not a percentage (0..=100)"));
    }
    Ok(v)
}

/// The link settings, as recorded in the JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// Added round-trip time, ms.
    pub rtt_ms: f64,
    /// Jitter per direction, ms.
    pub jitter_ms: f64,
    /// Loss per direction, %.
    pub loss_pct: f64,
    /// Reordered per direction, %.
    pub reorder_pct: f64,
    /// Duplicated per direction, %.
    pub duplicate_pct: f64,
    /// Rate per direction, Mbit/s (0: unlimited).
    pub rate_mbit: f64,
    /// Queue in front of the rate limit, bytes.
    pub queue_bytes: u64,
    /// Seed.
    pub seed: u64,
    /// MTU of the TUN devices.
    pub mtu: u16,
}

/// The final JSON line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Namespace A.
    pub ns_a: String,
    /// Namespace B.
    pub ns_b: String,
    /// Settings.
    pub settings: Settings,
    /// Seconds between ready and stop.
    pub seconds: f64,
    /// Times the link was cut.
    pub cuts: u64,
    /// A to B counters.
    pub a_to_b: CounterSnapshot,
    /// B to A counters.
    pub b_to_a: CounterSnapshot,
}

impl ImpairArgs {
    /// The settings these arguments ask for.
    pub fn settings(&self) -> Settings {
        let rate_bps = self.rate_mbit * 1e6;
        let queue_bytes = self.queue_kib.map_or_else(
            || ((rate_bps * 0.1 / 8.0) as u64).max(64 << 10),
            |k| k << 10,
        );
        Settings {
            rtt_ms: self.rtt_ms,
            jitter_ms: self.jitter_ms,
            loss_pct: self.loss,
            reorder_pct: self.reorder,
            duplicate_pct: self.duplicate,
            rate_mbit: self.rate_mbit,
            queue_bytes,
            seed: self.seed,
            mtu: netns::MTU,
        }
    }
}

impl Settings {
    fn impairment(&self) -> Impairment {
        Impairment {
            delay: Duration::from_secs_f64(self.rtt_ms / 2000.0),
            jitter: Duration::from_secs_f64(self.jitter_ms / 1000.0),
            loss: self.loss_pct / 100.0,
            reorder: self.reorder_pct / 100.0,
            duplicate: self.duplicate_pct / 100.0,
            rate_bps: (self.rate_mbit > 0.0).then_some((self.rate_mbit * 1e6) as u64),
            queue_bytes: self.queue_bytes,
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A caller that closed our stdout does not stop the forwarder.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the forwarder until SIGINT/SIGTERM; see the module documentation.
pub fn main(args: &ImpairArgs) -> anyhow::Result<ExitCode> {
    // Block the control signals first: they are taken with sigwait below, and one arriving
    // during set-up still leads to a clean-up.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;

    if let Some(reason) = netns::unsupported() {
        eprintln!("impair: unsupported: {reason}");
        return Ok(ExitCode::from(2));
    }
    for name in netns::remove_stale()? {
        eprintln!("impair: removed stale {name}");
    }
    let settings = args.settings();
    let names = Names::for_pid(std::process::id());
    let mut topo = Topology::create(names.clone())?;
    let (Some(tun_a), Some(tun_b)) = (topo.tun_a.take(), topo.tun_b.take()) else {
        bail!("TUN devices missing after set-up");
    };
    let (tun_a, tun_b) = (Arc::new(tun_a), Arc::new(tun_b));
    let shared = Arc::new(Shared::default());
    let impairment = settings.impairment();
    let shapers = (
        Shaper::new(impairment.clone(), settings.seed),
        Shaper::new(impairment, settings.seed ^ 0x5EED_B10C_5EED_B10C),
    );
    let handles = forward::spawn(tun_a.clone(), tun_b.clone(), shapers, shared.clone())?;
    let started = Instant::now();
    say(&format!(
        "ready {} {} {} {}",
        names.ns_a, names.addr_a, names.ns_b, names.addr_b
    ));

    let mut cuts = 0u64;
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGUSR1 => {
                if !shared.switches.cut.swap(true, Ordering::SeqCst) {
                    cuts += 1;
                }
                say("cut");
            }
            Signal::SIGUSR2 => {
                shared.switches.cut.store(false, Ordering::SeqCst);
                say("restored");
            }
            _ => break,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    shared.switches.stop.store(true, Ordering::SeqCst);
    for h in handles {
        if h.join().is_err() {
            eprintln!("impair: a forwarder thread panicked");
        }
    }
    // The threads are gone: these are the last references, and the devices close here.
    drop(tun_a);
    drop(tun_b);
    drop(topo);
    let stats = Stats {
        ns_a: names.ns_a,
        ns_b: names.ns_b,
        settings,
        seconds,
        cuts,
        a_to_b: shared.a_to_b.snapshot(),
        b_to_a: shared.b_to_a.snapshot(),
    };
    let line = serde_json::to_string(&stats)?;
    if let Some(path) = &args.stats {
        std::fs::write(path, format!("{line}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    say(&line);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ImpairArgs,
    }

    #[test]
    fn settings_from_flags() {
        let cli = Cli::try_parse_from(["x", "--rtt-ms", "50", "--loss", "1", "--rate-mbit", "100"])
            .unwrap();
        let s = cli.args.settings();
        assert_eq!(s.queue_bytes, 1_250_000, "100 ms at 100 Mbit/s");
        let imp = s.impairment();
        assert_eq!(imp.delay, Duration::from_millis(25));
        assert_eq!(imp.rate_bps, Some(100_000_000));
        assert!((imp.loss - 0.01).abs() < 1e-12);
        assert!(Cli::try_parse_from(["x", "--loss", "101"]).is_err());
        assert!(Cli::try_parse_from(["x", "--rtt-ms", "-1"]).is_err());
        let unlimited = Cli::try_parse_from(["x"]).unwrap().args.settings();
        assert_eq!(unlimited.impairment().rate_bps, None);
        assert_eq!(unlimited.queue_bytes, 64 << 10);
    }
}
