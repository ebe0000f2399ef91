//! Figures: per-run records, their summary per contestant (medians), the JSON document and
//! the human table.

use serde::Serialize;

use crate::proc::Machine;
use crate::quinn_pair::{LatencyUs, PathReport};

/// Bytes in a GiB.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Gbit/s for `bytes` in `seconds` (None when either is zero).
pub fn gbit_per_s(bytes: u64, seconds: f64) -> Option<f64> {
    (bytes > 0 && seconds > 0.0).then(|| bytes as f64 * 8.0 / seconds / 1e9)
}

/// CPU seconds per GiB of payload.
pub fn per_gib(cpu_seconds: f64, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| cpu_seconds / (bytes as f64 / GIB))
}

/// Median of the values present (mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values
        .into_iter()
        .flatten()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn extreme(values: &[Option<f64>], pick: fn(f64, f64) -> f64) -> Option<f64> {
    values.iter().flatten().copied().reduce(pick)
}

/// A pair of per-side figures.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sides {
    /// The sending side (quinn-source / `baylink send`).
    pub sender: Option<f64>,
    /// The receiving side (quinn-sink / the gateway).
    pub receiver: Option<f64>,
}

/// Chunk latency in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencyMs {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Maximum (per run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl LatencyMs {
    /// From microsecond percentiles.
    pub fn from_us(us: &LatencyUs) -> LatencyMs {
        LatencyMs {
            p50: Some(us.p50 as f64 / 1000.0),
            p99: Some(us.p99 as f64 / 1000.0),
            max: Some(us.max as f64 / 1000.0),
        }
    }
}

/// One run of one contestant.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunRecord {
    /// Run number (1-based).
    pub run: u32,
    /// Payload bits per second of the link phase, in Gbit/s (within the time box).
    pub gbit_per_s: Option<f64>,
    /// Seconds of the link phase.
    pub seconds: Option<f64>,
    /// Payload bytes moved.
    pub bytes: Option<u64>,
    /// Chunks acknowledged.
    pub chunks: Option<u64>,
    /// Stopped by the time limit.
    pub timed_out: bool,
    /// Why the run gave no figures, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// CPU seconds per side.
    pub cpu_seconds: Option<Sides>,
    /// CPU seconds per GiB per side.
    pub cpu_seconds_per_gib: Option<Sides>,
    /// Chunk latency.
    pub chunk_latency_ms: Option<LatencyMs>,
    /// baylink: Gbit/s over the whole `send`, sealing included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbit_per_s_including_seal: Option<f64>,
    /// baylink: seconds of the whole `send`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_including_seal: Option<f64>,
    /// baylink: chunk payload bytes `send` put on the wire (= bytes unless resumed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// baylink: seconds spent sealing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_seconds: Option<f64>,
    /// baylink: payload bytes the seal cloned into the spool instead of copying (a work
    /// directory on a file system that shares blocks: XFS with reflink, btrfs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloned_bytes: Option<u64>,
    /// baylink: payload bytes streamed to the gateway while sealing; when above 0 the
    /// link phase is the whole send (`gbit_per_s` = `gbit_per_s_including_seal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_bytes: Option<u64>,
    /// baylink: the transfer id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// baylink: delivered files byte-identical to the source (SHA-256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_identical: Option<bool>,
    /// scp: the TCP congestion controller of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_congestion: Option<String>,
    /// The congestion controller of the run: `[link] congestion` for quinn and baylink, the
    /// TCP controller for scp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub congestion: Option<String>,
    /// Bytes sent again (or estimated so), and their share of the payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmit: Option<Retransmit>,
    /// quinn: the path as quinn saw it at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathReport>,
}

impl RunRecord {
    /// A run that failed without figures.
    pub fn failed(run: u32, error: &anyhow::Error) -> RunRecord {
        RunRecord {
            run,
            error: Some(format!("{error:#}")),
            ..RunRecord::default()
        }
    }

    /// A run the time limit stopped without figures.
    pub fn timed_out(run: u32) -> RunRecord {
        RunRecord {
            run,
            timed_out: true,
            ..RunRecord::default()
        }
    }
}

/// What a run sent again: QUIC's lost packets, or TCP's retransmitted segments.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Retransmit {
    /// Where the figure comes from.
    pub source: String,
    /// Whether `retransmitted_bytes` is an estimate (TCP: segments × MSS).
    pub estimate: bool,
    /// Bytes sent again: quinn `path.lost_bytes` (packets declared lost, whose frames go
    /// out again), or TCP `RetransSegs` × MSS.
    pub retransmitted_bytes: u64,
    /// Packets declared lost (quinn) or segments retransmitted (TCP).
    pub lost_packets: u64,
    /// Packets (quinn) or segments (TCP `OutSegs`) sent.
    pub sent_packets: u64,
    /// UDP payload bytes sent (quinn `udp_tx.bytes`: every QUIC packet, headers included);
    /// none for TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_bytes: Option<u64>,
    /// Congestion events (the controller's window cuts; quinn only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub congestion_events: Option<u64>,
    /// Payload bytes the run moved.
    pub payload_bytes: u64,
    /// `retransmitted_bytes / payload_bytes`.
    pub ratio: Option<f64>,
}

/// quinn's connection figures behind a [`Retransmit`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QuicFigures {
    /// `path.lost_bytes`.
    pub lost_bytes: u64,
    /// `path.lost_packets`.
    pub lost_packets: u64,
    /// `path.sent_packets`.
    pub sent_packets: u64,
    /// `udp_tx.bytes`.
    pub tx_bytes: u64,
    /// `path.congestion_events`.
    pub congestion_events: u64,
}

impl Retransmit {
    /// From quinn's connection statistics (summed over the connections of the run).
    pub fn quinn(source: &str, path: QuicFigures, payload_bytes: u64) -> Retransmit {
        let QuicFigures {
            lost_bytes,
            lost_packets,
            sent_packets,
            tx_bytes,
            congestion_events,
        } = path;
        Retransmit {
            source: source.to_owned(),
            estimate: false,
            retransmitted_bytes: lost_bytes,
            lost_packets,
            sent_packets,
            tx_bytes: Some(tx_bytes),
            congestion_events: Some(congestion_events),
            payload_bytes,
            ratio: (payload_bytes > 0).then(|| lost_bytes as f64 / payload_bytes as f64),
        }
    }

    /// From TCP's `RetransSegs` and `OutSegs` deltas of the sender's namespace, times `mss`.
    pub fn tcp(retrans_segs: u64, out_segs: u64, mss: u64, payload_bytes: u64) -> Retransmit {
        let bytes = retrans_segs * mss;
        Retransmit {
            source: format!(
                "estimate: Tcp RetransSegs delta in the sender's network namespace \
                 (/proc/net/snmp) x MSS {mss}"
            ),
            estimate: true,
            retransmitted_bytes: bytes,
            lost_packets: retrans_segs,
            sent_packets: out_segs,
            tx_bytes: None,
            congestion_events: None,
            payload_bytes,
            ratio: (payload_bytes > 0).then(|| bytes as f64 / payload_bytes as f64),
        }
    }
}

/// baylink's extra summary fields.
#[derive(Debug, Clone, Serialize)]
pub struct BaylinkExtras {
    /// Median Gbit/s over the whole `send`, sealing included.
    pub gbit_per_s_including_seal: Option<f64>,
    /// Median baylink Gbit/s / median quinn Gbit/s of this invocation.
    pub ratio_vs_quinn: Option<f64>,
    /// Median baylink Gbit/s / median quinn_sha256 Gbit/s (raw quinn whose receiver checks
    /// SHA-256 of every byte).
    pub ratio_vs_quinn_sha256: Option<f64>,
    /// Median quinn_sha256 Gbit/s / median quinn Gbit/s: the most a receiver that verifies
    /// every byte can reach of raw quinn on this machine.
    pub quinn_sha256_vs_quinn: Option<f64>,
    /// Median baylink Gbit/s / median scp-over-cubic Gbit/s.
    pub ratio_vs_scp_cubic: Option<f64>,
    /// Median baylink Gbit/s / median scp-over-bbr Gbit/s.
    pub ratio_vs_scp_bbr: Option<f64>,
    /// Against the faster of the two scp runs.
    pub ratio_vs_scp: Option<f64>,
}

/// One contestant over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct ContestantSummary {
    /// Median Gbit/s over the runs that gave a rate.
    pub gbit_per_s: Option<f64>,
    /// Each run's Gbit/s in run order (null: failed or timed out without a rate).
    pub runs_gbit_per_s: Vec<Option<f64>>,
    /// Slowest run.
    pub gbit_per_s_min: Option<f64>,
    /// Fastest run.
    pub gbit_per_s_max: Option<f64>,
    /// The congestion controller (of the first run that names one).
    pub congestion: Option<String>,
    /// Median over runs of retransmitted bytes / payload bytes.
    pub retransmit_ratio: Option<f64>,
    /// Median over runs of retransmitted bytes.
    pub retransmitted_bytes: Option<f64>,
    /// Median CPU seconds per GiB, per side.
    pub cpu_seconds_per_gib: Sides,
    /// Median over runs of each run's chunk latency percentiles.
    pub chunk_latency_ms: LatencyMs,
    /// baylink only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub baylink: Option<BaylinkExtras>,
    /// Runs stopped by the time limit.
    pub timed_out_runs: usize,
    /// Runs that failed.
    pub failed_runs: usize,
    /// Every run.
    pub runs: Vec<RunRecord>,
}

impl ContestantSummary {
    /// Summarises `runs`.
    pub fn from_runs(runs: Vec<RunRecord>) -> ContestantSummary {
        let rates: Vec<Option<f64>> = runs.iter().map(|r| r.gbit_per_s).collect();
        let side = |pick: fn(&Sides) -> Option<f64>| {
            median(
                runs.iter()
                    .map(|r| r.cpu_seconds_per_gib.as_ref().and_then(pick)),
            )
        };
        let latency = |pick: fn(&LatencyMs) -> Option<f64>| {
            median(
                runs.iter()
                    .map(|r| r.chunk_latency_ms.as_ref().and_then(pick)),
            )
        };
        ContestantSummary {
            gbit_per_s: median(rates.iter().copied()),
            gbit_per_s_min: extreme(&rates, f64::min),
            gbit_per_s_max: extreme(&rates, f64::max),
            runs_gbit_per_s: rates,
            congestion: runs.iter().find_map(|r| r.congestion.clone()),
            retransmit_ratio: median(
                runs.iter()
                    .map(|r| r.retransmit.as_ref().and_then(|t| t.ratio)),
            ),
            retransmitted_bytes: median(
                runs.iter()
                    .map(|r| r.retransmit.as_ref().map(|t| t.retransmitted_bytes as f64)),
            ),
            cpu_seconds_per_gib: Sides {
                sender: side(|s| s.sender),
                receiver: side(|s| s.receiver),
            },
            chunk_latency_ms: LatencyMs {
                p50: latency(|l| l.p50),
                p99: latency(|l| l.p99),
                max: None,
            },
            baylink: None,
            timed_out_runs: runs.iter().filter(|r| r.timed_out).count(),
            failed_runs: runs.iter().filter(|r| r.error.is_some()).count(),
            runs,
        }
    }

    /// Adds baylink's extra fields from the same invocation's medians of the other
    /// contestants.
    pub fn with_baylink_extras(mut self, others: &OtherMedians) -> ContestantSummary {
        let ratio = |other: Option<f64>| ratio_of(self.gbit_per_s, other);
        let faster_scp = match (others.scp_cubic, others.scp_bbr) {
            (Some(c), Some(b)) => Some(c.max(b)),
            (c, b) => c.or(b),
        };
        self.baylink = Some(BaylinkExtras {
            gbit_per_s_including_seal: median(
                self.runs.iter().map(|r| r.gbit_per_s_including_seal),
            ),
            ratio_vs_quinn: ratio(others.quinn),
            ratio_vs_quinn_sha256: ratio(others.quinn_sha256),
            quinn_sha256_vs_quinn: ratio_of(others.quinn_sha256, others.quinn),
            ratio_vs_scp_cubic: ratio(others.scp_cubic),
            ratio_vs_scp_bbr: ratio(others.scp_bbr),
            ratio_vs_scp: ratio(faster_scp),
        });
        self
    }
}

/// `a / b`, when both are known and `b` is positive.
fn ratio_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Median Gbit/s of the other contestants, for baylink's ratios.
#[derive(Debug, Clone, Copy, Default)]
pub struct OtherMedians {
    /// quinn.
    pub quinn: Option<f64>,
    /// quinn with SHA-256 checked at the receiver.
    pub quinn_sha256: Option<f64>,
    /// scp over cubic.
    pub scp_cubic: Option<f64>,
    /// scp over bbr.
    pub scp_bbr: Option<f64>,
}

/// A contestant's entry in the JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Entry {
    /// It ran.
    Ran(Box<ContestantSummary>),
    /// It did not run, and why.
    Skipped {
        /// Why.
        skipped: String,
    },
}

impl Entry {
    /// A skipped contestant.
    pub fn skipped(why: &str) -> Entry {
        Entry::Skipped {
            skipped: why.to_owned(),
        }
    }
}

/// All contestants.
#[derive(Debug, Clone, Serialize)]
pub struct Contestants {
    /// Raw quinn, memory → memory.
    pub quinn: Entry,
    /// Raw quinn, memory → memory, SHA-256 of every chunk checked by the receiver.
    pub quinn_sha256: Entry,
    /// baylink, disk → disk.
    pub baylink: Entry,
    /// scp over TCP cubic.
    pub scp_cubic: Entry,
    /// scp over TCP bbr.
    pub scp_bbr: Entry,
}

/// The emulated link.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// Requested round-trip time.
    pub rtt_ms: f64,
    /// Requested loss per direction.
    pub loss_pct: f64,
    /// Requested rate (0: unlimited).
    pub rate_mbit: f64,
    /// What was actually in the path.
    pub impairment: String,
    /// The impairment forwarder's settings and counters (totals over every contestant),
    /// when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<crate::impair::Stats>,
}

/// Settings of the deployment both contestants used.
#[derive(Debug, Clone, Serialize)]
pub struct Transport {
    /// Chunk size (from the dev-env edge config).
    pub chunk_size: u32,
    /// Chunks in flight.
    pub max_in_flight: usize,
    /// `[link]` of the edge config: rate the windows were sized for.
    pub tuned_rate_mbit: u64,
    /// `[link]`: RTT the windows were sized for.
    pub tuned_rtt_ms: u64,
    /// Congestion controller.
    pub congestion: String,
    /// `[link] receive_hold_ms` in effect (every contestant on QUIC uses it).
    pub receive_hold_ms: u64,
    /// Per-stream receive window.
    pub stream_window: u64,
    /// Connection receive window.
    pub connection_window: u64,
}

/// The whole JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Payload bytes per run.
    pub size_bytes: u64,
    /// Files per transfer.
    pub files: u32,
    /// Runs per contestant.
    pub runs: u32,
    /// Time box per run, seconds.
    pub time_limit_s: u64,
    /// The link.
    pub link: Link,
    /// Transport settings in force (absent when nothing ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The contestants.
    pub contestants: Contestants,
    /// The machine.
    pub machine: Machine,
    /// Why the bench did not run, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.decimals$}"))
}

/// The human table.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<12} {:>8} {:>7} {:>7}  {:>9} {:>9}  {:>9} {:>9}  {:>6} {:>8}\n",
        "contestant",
        "Gbit/s",
        "min",
        "max",
        "CPU snd",
        "CPU rcv",
        "chunk p50",
        "chunk p99",
        "cc",
        "retx"
    );
    out += &format!(
        "{:<12} {:>8} {:>7} {:>7}  {:>9} {:>9}  {:>9} {:>9}  {:>6} {:>8}\n",
        "", "median", "", "", "s/GiB", "s/GiB", "ms", "ms", "", "%payload"
    );
    let c = &report.contestants;
    for (name, entry) in [
        ("quinn", &c.quinn),
        ("quinn_sha256", &c.quinn_sha256),
        ("baylink", &c.baylink),
        ("scp_cubic", &c.scp_cubic),
        ("scp_bbr", &c.scp_bbr),
    ] {
        match entry {
            Entry::Skipped { skipped } => out += &format!("{name:<12} skipped: {skipped}\n"),
            Entry::Ran(s) => {
                out += &format!(
                    "{name:<12} {:>8} {:>7} {:>7}  {:>9} {:>9}  {:>9} {:>9}  {:>6} {:>8}",
                    cell(s.gbit_per_s, 2),
                    cell(s.gbit_per_s_min, 2),
                    cell(s.gbit_per_s_max, 2),
                    cell(s.cpu_seconds_per_gib.sender, 2),
                    cell(s.cpu_seconds_per_gib.receiver, 2),
                    cell(s.chunk_latency_ms.p50, 1),
                    cell(s.chunk_latency_ms.p99, 1),
                    s.congestion.as_deref().unwrap_or("-"),
                    cell(s.retransmit_ratio.map(|r| r * 100.0), 2),
                );
                if s.timed_out_runs + s.failed_runs > 0 {
                    out += &format!(
                        "  ({} timed out, {} failed)",
                        s.timed_out_runs, s.failed_runs
                    );
                }
                out += "\n";
            }
        }
    }
    if let Entry::Ran(b) = &c.baylink
        && let Some(extras) = &b.baylink
    {
        out += &format!(
            "baylink incl. sealing: {} Gbit/s; baylink / quinn: {}; baylink / quinn_sha256: {}; \
             quinn_sha256 / quinn: {}\n",
            cell(extras.gbit_per_s_including_seal, 2),
            cell(extras.ratio_vs_quinn, 3),
            cell(extras.ratio_vs_quinn_sha256, 3),
            cell(extras.quinn_sha256_vs_quinn, 3)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32, rate: Option<f64>, cpu: f64) -> RunRecord {
        RunRecord {
            run: n,
            gbit_per_s: rate,
            cpu_seconds_per_gib: Some(Sides {
                sender: Some(cpu),
                receiver: Some(cpu * 2.0),
            }),
            chunk_latency_ms: Some(LatencyMs {
                p50: Some(1.0 * f64::from(n)),
                p99: Some(10.0 * f64::from(n)),
                max: Some(100.0),
            }),
            ..RunRecord::default()
        }
    }

    #[test]
    fn medians_and_units() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([Some(4.0), Some(1.0)]), Some(2.5));
        assert_eq!(median([None, Some(f64::NAN)]), None);
        assert_eq!(gbit_per_s(1_000_000_000, 8.0), Some(1.0));
        assert_eq!(gbit_per_s(0, 8.0), None);
        assert_eq!(per_gib(3.0, 1 << 31), Some(1.5));
    }

    #[test]
    fn summary_takes_medians_and_ratio() {
        let quinn = ContestantSummary::from_runs(vec![
            run(1, Some(6.0), 1.0),
            run(2, Some(8.0), 3.0),
            run(3, Some(7.0), 2.0),
        ]);
        assert_eq!(quinn.gbit_per_s, Some(7.0));
        assert_eq!(
            (quinn.gbit_per_s_min, quinn.gbit_per_s_max),
            (Some(6.0), Some(8.0))
        );
        assert_eq!(quinn.cpu_seconds_per_gib.receiver, Some(4.0));
        assert_eq!(quinn.chunk_latency_ms.p99, Some(20.0));

        let mut failed = RunRecord::failed(3, &anyhow::anyhow!("boom"));
        failed.gbit_per_s_including_seal = None;
        let mut ok = run(1, Some(3.5), 1.0);
        ok.gbit_per_s_including_seal = Some(2.0);
        let baylink = ContestantSummary::from_runs(vec![ok, RunRecord::timed_out(2), failed])
            .with_baylink_extras(&OtherMedians {
                quinn: quinn.gbit_per_s,
                quinn_sha256: Some(5.0),
                scp_cubic: Some(7.0),
                scp_bbr: None,
            });
        assert_eq!(baylink.runs_gbit_per_s, vec![Some(3.5), None, None]);
        assert_eq!((baylink.timed_out_runs, baylink.failed_runs), (1, 1));
        let extras = baylink.baylink.as_ref().unwrap();
        assert_eq!(extras.ratio_vs_quinn, Some(0.5));
        assert_eq!(extras.ratio_vs_quinn_sha256, Some(0.7));
        assert_eq!(extras.quinn_sha256_vs_quinn, Some(5.0 / 7.0));
        assert_eq!(extras.gbit_per_s_including_seal, Some(2.0));

        let json = serde_json::to_value(&baylink).unwrap();
        assert_eq!(json["ratio_vs_quinn"], 0.5);
        assert_eq!(json["ratio_vs_scp_cubic"], 0.5);
        assert_eq!(
            json["ratio_vs_scp"], 0.5,
            "the faster scp is the only one measured"
        );
        assert!(json["ratio_vs_scp_bbr"].is_null());
        assert!(json.as_object().unwrap().contains_key("ratio_vs_scp_bbr"));
        assert_eq!(json["runs"][2]["error"], "boom");
        assert!(json["chunk_latency_ms"].get("max").is_none());

        let report = Report {
            size_bytes: 1,
            files: 1,
            runs: 3,
            time_limit_s: 300,
            link: Link {
                rtt_ms: 0.0,
                loss_pct: 0.0,
                rate_mbit: 0.0,
                impairment: "none (loopback)".to_owned(),
                forwarder: None,
            },
            transport: None,
            contestants: Contestants {
                quinn: Entry::Ran(Box::new(quinn)),
                quinn_sha256: Entry::skipped("not selected (--only)"),
                baylink: Entry::Ran(Box::new(baylink)),
                scp_cubic: Entry::skipped("not built"),
                scp_bbr: Entry::skipped("not built"),
            },
            machine: Machine::current(),
            error: None,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["contestants"]["scp_bbr"]["skipped"], "not built");
        assert_eq!(json["contestants"]["quinn"]["gbit_per_s"], 7.0);
        assert!(json["contestants"]["quinn"].get("ratio_vs_quinn").is_none());
        let text = table(&report);
        assert!(text.contains("quinn"), "{text}");
        assert!(text.contains("7.00"), "{text}");
        assert!(text.contains("scp_cubic    skipped: not built"), "{text}");
        assert!(
            text.contains("quinn_sha256 skipped: not selected (--only)"),
            "{text}"
        );
        assert!(text.contains("(1 timed out, 1 failed)"), "{text}");
        assert!(text.contains("baylink / quinn: 0.500"), "{text}");
        assert!(text.contains("baylink / quinn_sha256: 0.700"), "{text}");
    }
}
