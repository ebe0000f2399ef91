//! One forwarder thread per direction: read packets from one TUN device, decide their fate
//! with a [`Shaper`], hold them in a heap ordered by release time, write them into the other
//! TUN device when due. Wake-ups are batched (at least [`BATCH`] apart) so waiting does not
//! cost a core; the threads run with `SCHED_FIFO` (through `chrt`) and a 1 ns timer slack so
//! releases are on time on a busy machine.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;
use serde::Serialize;

use super::shaper::{Drop as DropReason, Fate, Shaper};

/// Shortest sleep between wake-ups; packets due within it are released together.
pub const BATCH: Duration = Duration::from_micros(100);

/// Longest sleep, so the stop flag is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// Bound on bytes held in the delay heap whatever the rate (memory bound).
const HEAP_LIMIT_BYTES: usize = 256 << 20;

/// Packets read in one go before due releases get a turn.
const READ_BURST: usize = 256;

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the ingress device.
    pub received: AtomicU64,
    /// Packets written to the egress device (duplicates included).
    pub forwarded: AtomicU64,
    /// IP bytes written to the egress device.
    pub forwarded_bytes: AtomicU64,
    /// Dropped by random loss.
    pub dropped_loss: AtomicU64,
    /// Dropped because the rate limit's queue (or the heap bound) was full.
    pub dropped_queue: AtomicU64,
    /// Dropped while the link was cut.
    pub dropped_cut: AtomicU64,
    /// Extra copies written.
    pub duplicated: AtomicU64,
    /// Packets that skipped the delay.
    pub reordered: AtomicU64,
    /// Writes into the egress device that failed.
    pub write_errors: AtomicU64,
}

/// A snapshot of [`Counters`], as printed at exit.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Packets read from the ingress device.
    pub received: u64,
    /// Packets written to the egress device (duplicates included).
    pub forwarded: u64,
    /// IP bytes written to the egress device.
    pub forwarded_bytes: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped because the queue was full.
    pub dropped_queue: u64,
    /// Dropped while the link was cut.
    pub dropped_cut: u64,
    /// Extra copies written.
    pub duplicated: u64,
    /// Packets that skipped the delay.
    pub reordered: u64,
    /// Failed writes into the egress device.
    pub write_errors: u64,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            received: v(&self.received),
            forwarded: v(&self.forwarded),
            forwarded_bytes: v(&self.forwarded_bytes),
            dropped_loss: v(&self.dropped_loss),
            dropped_queue: v(&self.dropped_queue),
            dropped_cut: v(&self.dropped_cut),
            duplicated: v(&self.duplicated),
            reordered: v(&self.reordered),
            write_errors: v(&self.write_errors),
        }
    }
}

/// Flags shared by the threads and the signal loop.
#[derive(Debug, Default)]
pub struct Switches {
    /// While set, every packet is dropped (both directions).
    pub cut: AtomicBool,
    /// Set to end the threads.
    pub stop: AtomicBool,
}

struct Held {
    at: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap and the earliest release must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Forwards from `ingress` to `egress` until `switches.stop`.
pub fn run_direction(
    ingress: &tun_rs::SyncDevice,
    egress: &tun_rs::SyncDevice,
    mut shaper: Shaper,
    switches: &Switches,
    counters: &Counters,
) {
    let mut heap: BinaryHeap<Held> = BinaryHeap::new();
    let mut held_bytes = 0usize;
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65_536];
    while !switches.stop.load(Ordering::Relaxed) {
        // Release everything due (within half a batch).
        let now = Instant::now();
        while heap.peek().is_some_and(|h| h.at <= now + BATCH / 2) {
            let Some(held) = heap.pop() else { break };
            held_bytes -= held.packet.len();
            if switches.cut.load(Ordering::Relaxed) {
                counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
            } else if egress.send(&held.packet).is_ok() {
                counters.forwarded.fetch_add(1, Ordering::Relaxed);
                counters
                    .forwarded_bytes
                    .fetch_add(held.packet.len() as u64, Ordering::Relaxed);
            } else {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            pool.push(held.packet);
        }
        // Sleep until the next release or a packet arrives.
        let sleep = heap.peek().map_or(MAX_SLEEP, |h| {
            h.at.saturating_duration_since(Instant::now())
                .clamp(BATCH, MAX_SLEEP)
        });
        let mut fds = [PollFd::new(ingress.as_fd(), PollFlags::POLLIN)];
        let ready = ppoll(&mut fds, Some(TimeSpec::from_duration(sleep)), None).unwrap_or(0);
        if ready == 0 {
            continue;
        }
        for _ in 0..READ_BURST {
            let len = match ingress.recv(&mut buf) {
                Ok(len) => len,
                Err(_) => break, // WouldBlock: drained.
            };
            counters.received.fetch_add(1, Ordering::Relaxed);
            if switches.cut.load(Ordering::Relaxed) {
                counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            match shaper.admit(now, len) {
                Fate::Drop(DropReason::Loss) => {
                    counters.dropped_loss.fetch_add(1, Ordering::Relaxed);
                }
                Fate::Drop(DropReason::Queue) => {
                    counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
                }
                Fate::Release {
                    at,
                    copies,
                    reordered,
                } => {
                    if held_bytes + len * usize::from(copies) > HEAP_LIMIT_BYTES {
                        counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if reordered {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    if copies > 1 {
                        counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    for copy in 0..copies {
                        let mut packet = pool.pop().unwrap_or_default();
                        packet.clear();
                        packet.extend_from_slice(&buf[..len]);
                        held_bytes += len;
                        seq += 1;
                        heap.push(Held {
                            // A duplicate follows its original by a microsecond.
                            at: at + Duration::from_micros(u64::from(copy)),
                            seq,
                            packet,
                        });
                    }
                }
            }
        }
    }
}

/// Lowers this thread's timer slack to 1 ns and asks `chrt` for `SCHED_FIFO` priority 50.
/// Returns a warning when either fails (the forwarder still works, with later releases).
pub fn make_realtime() -> Option<String> {
    let mut warnings = Vec::new();
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        warnings.push(format!("timer slack: {e}"));
    }
    let tid = nix::unistd::gettid().to_string();
    match std::process::Command::new("chrt")
        .args(["-f", "-p", "50", &tid])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => warnings.push(format!(
            "chrt: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => warnings.push(format!("chrt: {e}")),
    }
    (!warnings.is_empty()).then(|| warnings.join("; "))
}

/// Shared state of a running forwarder.
#[derive(Debug, Default)]
pub struct Shared {
    /// Cut and stop.
    pub switches: Switches,
    /// A to B.
    pub a_to_b: Counters,
    /// B to A.
    pub b_to_a: Counters,
}

/// Starts both directions on their own threads.
pub fn spawn(
    tun_a: Arc<tun_rs::SyncDevice>,
    tun_b: Arc<tun_rs::SyncDevice>,
    shapers: (Shaper, Shaper),
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let (ab, ba) = shapers;
    let mut handles = Vec::new();
    for (name, ingress, egress, shaper) in [
        ("impair-a-to-b", tun_a.clone(), tun_b.clone(), ab),
        ("impair-b-to-a", tun_b, tun_a, ba),
    ] {
        let shared = shared.clone();
        let a_to_b = name == "impair-a-to-b";
        handles.push(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Some(warning) = make_realtime() {
                        eprintln!("impair: {name}: {warning}");
                    }
                    let counters = if a_to_b {
                        &shared.a_to_b
                    } else {
                        &shared.b_to_a
                    };
                    run_direction(&ingress, &egress, shaper, &shared.switches, counters);
                })?,
        );
    }
    Ok(handles)
}
