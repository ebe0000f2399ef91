//! A simulated network for a [`Sender`] and a [`Receiver`] (tests only).
//!
//! Deterministic from a seed: a tiny xorshift generator drives every choice
//! and a virtual clock orders the deliveries. Control frames travel encoded
//! and are fed to a [`FrameDecoder`] in random pieces; each chunk travels as
//! its own data stream (header, then body, after random delays). The network
//! delays, reorders and duplicates both, corrupts chunk payloads, resets
//! data streams, and loses the whole connection; after a loss both ends are
//! rebuilt the way the appliance does it: a new `Sender` from the same
//! manifest, a new `Receiver` whose `offer_accepted` gets the chunks the
//! previous receivers recorded as good, over the same partially written
//! files.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::manifest::tests::build;
use super::*;
use crate::merkle;

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn per_mille(&mut self, p: u32) -> bool {
        self.next() % 1000 < u64::from(p)
    }
}

/// How hostile the network is. Probabilities are per mille.
#[derive(Debug, Clone, Copy)]
struct NetConfig {
    max_delay: u64,
    dup: u32,
    corrupt: u32,
    reset: u32,
    /// Per delivered event: the connection is lost.
    drop: u32,
    max_drops: u32,
    /// Lose the connection once, right after this many chunk bodies arrived.
    drop_after_bodies: Option<u64>,
    /// Lose the connection once, right after the first commit.
    drop_after_commit: bool,
    sender: SenderConfig,
    receiver: ReceiverConfig,
}

impl NetConfig {
    fn calm() -> Self {
        Self {
            max_delay: 20,
            dup: 0,
            corrupt: 0,
            reset: 0,
            drop: 0,
            max_drops: 0,
            drop_after_bodies: None,
            drop_after_commit: false,
            sender: SenderConfig {
                max_in_flight: 4,
                max_chunk_retries: 3,
            },
            receiver: ReceiverConfig {
                max_chunk_retries: 3,
            },
        }
    }

    fn hostile() -> Self {
        Self {
            max_delay: 50,
            dup: 60,
            corrupt: 60,
            reset: 30,
            drop: 4,
            max_drops: 4,
            sender: SenderConfig {
                max_in_flight: 6,
                max_chunk_retries: 12,
            },
            receiver: ReceiverConfig {
                max_chunk_retries: 12,
            },
            ..Self::calm()
        }
    }
}

enum Msg {
    ToReceiver(Bytes),
    ToSender(Bytes),
    Header {
        stream: u64,
        header: [u8; ChunkHeader::LEN],
    },
    Body {
        stream: u64,
        payload: Vec<u8>,
    },
    /// The stream was reset in transit: the receiver sees it end early.
    Reset {
        stream: u64,
    },
    /// Sender side: the data stream finished.
    Written {
        index: u32,
    },
    /// Sender side: the data stream failed.
    StreamFailed {
        index: u32,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    msg: Msg,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so `BinaryHeap` pops the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One connection's worth of state.
struct Session {
    sender: Sender,
    receiver: Receiver,
    to_receiver: FrameDecoder,
    to_sender: FrameDecoder,
    /// The have-set the receiver announced, once it did.
    have: Option<ChunkSet>,
    /// Accepted data streams: stream id -> (chunk index, where it goes).
    streams: HashMap<u64, (u32, ChunkLocation)>,
}

#[derive(Debug, Default)]
struct Report {
    sessions: u32,
    drops: u32,
    /// `Sender::wire_bytes` of each session.
    wire_bytes: Vec<u64>,
    commits: u32,
    events: u64,
    bodies: u64,
    corrupted: u64,
    duplicated: u64,
    resets: u64,
    busy: u64,
    receipt: Option<Receipt>,
    sender_failure: Option<ProtoError>,
    receiver_failure: Option<ProtoError>,
}

struct Sim {
    rng: Rng,
    cfg: NetConfig,
    clock: u64,
    seq: u64,
    next_stream: u64,
    manifest: Arc<Manifest>,
    manifest_bytes: Bytes,
    files: Vec<Vec<u8>>,
    /// The receiver's partially written files; they survive connection loss.
    disk: Vec<Vec<u8>>,
    /// Chunks the receivers recorded as good; survives connection loss.
    durable: ChunkSet,
    queue: BinaryHeap<Scheduled>,
    session: Session,
    report: Report,
    dropped_after_bodies: bool,
    dropped_after_commit: bool,
}

const EDGE_SIGNATURE: &[u8] = b"edge-signature";
const GATEWAY_SIGNATURE: &[u8] = b"gateway-signature";

impl Sim {
    fn new(seed: u64, sizes: &[u64], chunk_size: u32, cfg: NetConfig) -> Self {
        let (manifest, files) = build(sizes, chunk_size);
        let disk = files.iter().map(|f| vec![0u8; f.len()]).collect();
        let manifest_bytes = Bytes::from(manifest.to_bytes());
        let durable = ChunkSet::new(manifest.chunk_count());
        let manifest = Arc::new(manifest);
        let session = Self::session(&manifest, &manifest_bytes, &cfg);
        Self {
            rng: Rng::new(seed),
            cfg,
            clock: 0,
            seq: 0,
            next_stream: 0,
            manifest,
            manifest_bytes,
            files,
            disk,
            durable,
            queue: BinaryHeap::new(),
            session,
            report: Report::default(),
            dropped_after_bodies: false,
            dropped_after_commit: false,
        }
    }

    fn session(manifest: &Arc<Manifest>, bytes: &Bytes, cfg: &NetConfig) -> Session {
        Session {
            sender: Sender::new(
                manifest.clone(),
                bytes.clone(),
                Bytes::from_static(EDGE_SIGNATURE),
                cfg.sender,
            ),
            receiver: Receiver::new(Limits::default(), cfg.receiver),
            to_receiver: FrameDecoder::new(Limits::default()),
            to_sender: FrameDecoder::new(Limits::default()),
            have: None,
            streams: HashMap::new(),
        }
    }

    /// (Re)connects: everything in flight is lost, both ends start afresh.
    fn connect(&mut self) {
        if let Some(last) = self.report.wire_bytes.last_mut() {
            *last = self.session.sender.wire_bytes();
        }
        self.queue.clear();
        self.session = Self::session(&self.manifest, &self.manifest_bytes, &self.cfg);
        self.report.sessions += 1;
        self.report.wire_bytes.push(0);
        let hello = |id: &str| Frame::Hello {
            version: PROTOCOL_VERSION,
            appliance_id: id.into(),
        };
        self.send_control(true, hello("edge"));
        self.send_control(false, hello("gateway"));
        self.pump();
    }

    fn schedule(&mut self, delay: u64, msg: Msg) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.clock + delay,
            seq: self.seq,
            msg,
        });
    }

    fn delay(&mut self) -> u64 {
        self.rng.range(1, self.cfg.max_delay)
    }

    fn send_control(&mut self, to_receiver: bool, frame: Frame) {
        let copies = if self.rng.per_mille(self.cfg.dup) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let bytes = frame.to_bytes();
            let msg = if to_receiver {
                Msg::ToReceiver(bytes)
            } else {
                Msg::ToSender(bytes)
            };
            let d = self.delay();
            self.schedule(d, msg);
        }
    }

    fn send_chunk(&mut self, index: u32) {
        let have = self.session.have.as_ref().expect("no chunk before Have");
        assert!(
            !have.contains(index),
            "chunk {index} sent although the receiver announced it"
        );
        let loc = self.manifest.chunk(index).expect("chunk in range");
        let start = loc.offset as usize;
        let payload = self.files[loc.file][start..start + loc.len as usize].to_vec();
        let header = ChunkHeader {
            transfer_id: self.manifest.transfer_id,
            index,
            len: loc.len,
        }
        .encode();
        let copies = if self.rng.per_mille(self.cfg.dup) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for copy in 0..copies {
            let stream = self.next_stream;
            self.next_stream += 1;
            let mut payload = payload.clone();
            if self.rng.per_mille(self.cfg.corrupt) {
                self.report.corrupted += 1;
                let at = self.rng.range(0, payload.len() as u64 - 1) as usize;
                payload[at] ^= 1 << self.rng.range(0, 7);
            }
            let t_header = self.delay();
            self.schedule(t_header, Msg::Header { stream, header });
            let t_body = t_header + self.delay();
            if copy == 0 && self.rng.per_mille(self.cfg.reset) {
                self.report.resets += 1;
                self.schedule(t_body, Msg::Reset { stream });
                let t = self.delay();
                self.schedule(t, Msg::StreamFailed { index });
                continue;
            }
            self.schedule(t_body, Msg::Body { stream, payload });
            if copy == 0 {
                self.schedule(t_body, Msg::Written { index });
            }
        }
    }

    fn on_sender_action(&mut self, action: SenderAction) {
        match action {
            SenderAction::SendFrame(f) => self.send_control(true, f),
            SenderAction::SendChunk { index } => self.send_chunk(index),
            SenderAction::Done { receipt, signature } => {
                assert_eq!(signature.as_ref(), GATEWAY_SIGNATURE);
                let receipt = Receipt::from_bytes(&receipt).expect("receipt decodes");
                self.report.receipt = Some(receipt);
            }
            SenderAction::Failed(e) => self.report.sender_failure = Some(e),
        }
    }

    fn on_receiver_action(&mut self, action: ReceiverAction) {
        match action {
            // The simulated sender never announces.
            ReceiverAction::Stage { .. } => unreachable!("no Announce in the simulation"),
            ReceiverAction::VerifyOffer {
                manifest,
                manifest_bytes,
                signature,
            } => {
                assert_eq!(manifest_bytes, self.manifest_bytes);
                assert_eq!(*manifest, *self.manifest);
                assert_eq!(signature.as_ref(), EDGE_SIGNATURE);
                self.session.have = Some(self.durable.clone());
                self.session.receiver.offer_accepted(self.durable.clone());
            }
            ReceiverAction::SendFrame(f) => {
                if let Frame::ChunkOk { index } = f {
                    // Good means the right bytes are on disk, now.
                    let loc = self.manifest.chunk(index).expect("in range");
                    let range = loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize;
                    assert_eq!(
                        self.disk[loc.file][range.clone()],
                        self.files[loc.file][range],
                        "chunk {index} counted good with wrong bytes"
                    );
                    self.durable.insert(index);
                }
                self.send_control(false, f);
            }
            ReceiverAction::Commit => {
                assert!(self.session.receiver.good().is_full());
                assert!(
                    self.disk == self.files,
                    "committed bytes differ from the sent ones"
                );
                self.report.commits += 1;
                let receipt = Receipt {
                    transfer_id: self.manifest.transfer_id,
                    merkle_root: merkle::root(&self.manifest.chunk_digests),
                    manifest_digest: sha256(&self.manifest_bytes),
                    process_id: self.manifest.process_id.clone(),
                    receiver: "gateway".into(),
                    committed_unix_ms: self.clock,
                };
                self.session.receiver.committed(
                    receipt.to_bytes().into(),
                    Bytes::from_static(GATEWAY_SIGNATURE),
                );
            }
            ReceiverAction::Failed(e) => self.report.receiver_failure = Some(e),
        }
    }

    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(a) = self.session.sender.poll_action() {
                progressed = true;
                self.on_sender_action(a);
            }
            while let Some(a) = self.session.receiver.poll_action() {
                progressed = true;
                self.on_receiver_action(a);
            }
            if !progressed {
                break;
            }
        }
    }

    /// Feeds one encoded frame to a decoder in up to three pieces.
    fn deliver_control(&mut self, to_receiver: bool, bytes: Bytes) {
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        let mut pieces = 0;
        while !rest.is_empty() {
            pieces += 1;
            let n = if pieces >= 3 {
                rest.len()
            } else {
                self.rng.range(1, rest.len() as u64) as usize
            };
            let dec = if to_receiver {
                &mut self.session.to_receiver
            } else {
                &mut self.session.to_sender
            };
            dec.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(f) = dec.next_frame().expect("our own frames decode") {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 1, "one message is one frame");
        for f in frames {
            // Failures also arrive as actions; the Err is for `?` users.
            let _ = if to_receiver {
                self.session.receiver.handle_frame(f)
            } else {
                self.session.sender.handle_frame(f)
            };
        }
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::ToReceiver(b) => self.deliver_control(true, b),
            Msg::ToSender(b) => self.deliver_control(false, b),
            Msg::Header { stream, header } => {
                let h = ChunkHeader::decode(&header).expect("our own headers decode");
                match self.session.receiver.chunk_header(&h) {
                    Ok(loc) => {
                        self.session.streams.insert(stream, (h.index, loc));
                    }
                    // A copy of a chunk already good: discarded silently.
                    Err(ProtoError::Duplicate { .. }) => {}
                    // The receiver stops the stream; the sender sees it fail.
                    Err(ProtoError::ChunkBusy { index }) => {
                        self.report.busy += 1;
                        let d = self.delay();
                        self.schedule(d, Msg::StreamFailed { index });
                    }
                    Err(_) if self.session.receiver.is_failed() => {}
                    Err(e) => panic!("header for chunk {} refused: {e}", h.index),
                }
            }
            Msg::Body { stream, payload } => {
                self.report.bodies += 1;
                if let Some((index, loc)) = self.session.streams.remove(&stream) {
                    assert_eq!(payload.len(), loc.len as usize);
                    let start = loc.offset as usize;
                    self.disk[loc.file][start..start + payload.len()].copy_from_slice(&payload);
                    self.session
                        .receiver
                        .chunk_received(index, sha256(&payload));
                }
            }
            Msg::Reset { stream } => {
                if let Some((index, _)) = self.session.streams.remove(&stream) {
                    self.session.receiver.chunk_aborted(index);
                }
            }
            Msg::Written { index } => self.session.sender.chunk_written(index),
            Msg::StreamFailed { index } => self.session.sender.chunk_stream_failed(index),
        }
    }

    fn failed(&self) -> bool {
        self.report.sender_failure.is_some() || self.report.receiver_failure.is_some()
    }

    fn run(mut self) -> (Report, Sim) {
        self.connect();
        loop {
            if self.report.receipt.is_some() {
                break;
            }
            let Some(ev) = self.queue.pop() else {
                assert!(
                    self.failed(),
                    "stalled: nothing in flight and no outcome ({:?})",
                    self.report
                );
                break;
            };
            self.report.events += 1;
            assert!(self.report.events < 2_000_000, "runaway simulation");
            self.clock = ev.at;
            if !self.failed() && self.should_drop() {
                self.report.drops += 1;
                self.connect();
                continue;
            }
            self.deliver(ev.msg);
            self.pump();
        }
        if let Some(last) = self.report.wire_bytes.last_mut() {
            *last = self.session.sender.wire_bytes();
        }
        let report = std::mem::take(&mut self.report);
        (report, self)
    }

    fn should_drop(&mut self) -> bool {
        if let Some(n) = self.cfg.drop_after_bodies
            && !self.dropped_after_bodies
            && self.report.bodies >= n
        {
            self.dropped_after_bodies = true;
            return true;
        }
        if self.cfg.drop_after_commit && !self.dropped_after_commit && self.report.commits > 0 {
            self.dropped_after_commit = true;
            return true;
        }
        self.report.drops < self.cfg.max_drops && self.rng.per_mille(self.cfg.drop)
    }

    fn bytes_of(&self, set: &ChunkSet) -> u64 {
        set.iter()
            .map(|i| u64::from(self.manifest.chunk(i).expect("in range").len))
            .sum()
    }
}

fn assert_complete(report: &Report, sim: &Sim) {
    assert!(
        report.sender_failure.is_none() && report.receiver_failure.is_none(),
        "{report:?}"
    );
    let receipt = report.receipt.as_ref().expect("receipt");
    assert_eq!(receipt.transfer_id, sim.manifest.transfer_id);
    assert_eq!(receipt.merkle_root, sim.manifest.merkle_root);
    assert!(sim.session.receiver.is_committed());
    assert!(sim.session.receiver.good().is_full());
    assert!(sim.durable.is_full());
    assert_eq!(sim.disk, sim.files);
    assert!(report.commits >= 1);
}

#[test]
fn calm_network_transfers_once_without_waste() {
    let cs = 64;
    let (report, sim) = Sim::new(1, &[1000, 0, 64, 63, 65], cs, NetConfig::calm()).run();
    assert_complete(&report, &sim);
    assert_eq!(report.sessions, 1);
    assert_eq!(report.wire_bytes, vec![sim.manifest.total_bytes()]);
    assert_eq!(report.commits, 1);
}

#[test]
fn edge_case_sizes_transfer() {
    let cs = 64u32;
    let c = u64::from(cs);
    let cases: &[&[u64]] = &[
        &[0],
        &[0, 0],
        &[1],
        &[c - 1],
        &[c],
        &[c + 1],
        &[0, 1, c - 1, c, c + 1, 3 * c, 0],
    ];
    for (i, sizes) in cases.iter().enumerate() {
        for seed in 0..20 {
            let (report, sim) =
                Sim::new(seed * 100 + i as u64, sizes, cs, NetConfig::hostile()).run();
            assert_complete(&report, &sim);
        }
    }
}

#[test]
fn many_seeds_survive_a_hostile_network() {
    let started = Instant::now();
    let mut totals = Report::default();
    let seeds = 500;
    for seed in 0..seeds {
        let mut rng = Rng::new(seed ^ 0xabcdef);
        let chunk_size = [16u32, 64, 100, 256][rng.range(0, 3) as usize];
        let files = rng.range(1, 4) as usize;
        let sizes: Vec<u64> = (0..files)
            .map(|_| match rng.range(0, 5) {
                0 => 0,
                1 => u64::from(chunk_size),
                _ => rng.range(1, 1500),
            })
            .collect();
        let mut cfg = NetConfig::hostile();
        cfg.sender.max_in_flight = rng.range(1, 8) as usize;
        eprintln!("seed {seed}: sizes {sizes:?}, chunk size {chunk_size}, {cfg:?}");
        let (report, sim) = Sim::new(seed, &sizes, chunk_size, cfg).run();
        assert_complete(&report, &sim);
        totals.sessions += report.sessions;
        totals.drops += report.drops;
        totals.corrupted += report.corrupted;
        totals.duplicated += report.duplicated;
        totals.resets += report.resets;
        totals.busy += report.busy;
        totals.bodies += report.bodies;
        totals.events += report.events;
        totals.commits += report.commits;
    }
    let elapsed = started.elapsed();
    // The impairments were actually exercised.
    assert!(totals.drops > 50, "{totals:?}");
    assert!(totals.corrupted > 100 && totals.duplicated > 100 && totals.resets > 50);
    assert!(totals.sessions > seeds as u32);
    assert!(
        elapsed < Duration::from_secs(20),
        "{seeds} seeds took {elapsed:?}"
    );
    eprintln!("{seeds} seeds, {totals:?}, in {elapsed:?}");
}

#[test]
fn resumed_sessions_send_only_missing_chunks() {
    let cs = 100u32;
    let sizes = [2000u64, 550, 0, 1];
    for after in [1u64, 5, 13, 20] {
        let cfg = NetConfig {
            drop_after_bodies: Some(after),
            ..NetConfig::calm()
        };
        let mut sim = Sim::new(after, &sizes, cs, cfg);
        // Run until the drop, then look at what the first session achieved.
        sim.connect();
        while !sim.dropped_after_bodies {
            let ev = sim.queue.pop().expect("drop before the end");
            sim.clock = ev.at;
            if sim.should_drop() {
                break;
            }
            sim.deliver(ev.msg);
            sim.pump();
        }
        let held = sim.durable.clone();
        assert!(
            held.count() > 0 && !held.is_full(),
            "after {after}: {held:?}"
        );
        let missing_bytes = sim.manifest.total_bytes() - sim.bytes_of(&held);
        sim.report.drops += 1;
        sim.connect();
        let (report, sim) = sim.run_on();
        assert_complete(&report, &sim);
        assert_eq!(report.sessions, 2);
        // The second session sent exactly the missing chunks, once each.
        assert_eq!(report.wire_bytes[1], missing_bytes, "after {after}");
    }
}

impl Sim {
    /// Continues an already connected simulation to its end.
    fn run_on(mut self) -> (Report, Sim) {
        while self.report.receipt.is_none() {
            let ev = self.queue.pop().expect("not stalled");
            self.clock = ev.at;
            self.deliver(ev.msg);
            self.pump();
        }
        if let Some(last) = self.report.wire_bytes.last_mut() {
            *last = self.session.sender.wire_bytes();
        }
        let report = std::mem::take(&mut self.report);
        (report, self)
    }
}

#[test]
fn a_connection_lost_after_commit_resumes_to_a_receipt_without_resending() {
    let cfg = NetConfig {
        drop_after_commit: true,
        ..NetConfig::calm()
    };
    let (report, sim) = Sim::new(7, &[500, 20], 64, cfg).run();
    assert_complete(&report, &sim);
    assert_eq!(report.sessions, 2);
    assert_eq!(report.commits, 2, "the commit is repeated idempotently");
    assert_eq!(report.wire_bytes[1], 0);
}

#[test]
fn bounded_retries_fail_with_a_clear_error() {
    let cfg = NetConfig {
        corrupt: 1000,
        ..NetConfig::calm()
    };
    let (report, sim) = Sim::new(3, &[300], 64, cfg).run();
    assert!(report.receipt.is_none());
    assert_eq!(report.commits, 0);
    assert_eq!(sim.durable.count(), 0, "a corrupted chunk is never good");
    assert_eq!(sim.session.receiver.good().count(), 0);
    let sender = report.sender_failure.expect("sender failed");
    let receiver = report.receiver_failure.expect("receiver failed");
    // The receiver hit its limit first (it counts every bad copy) and told
    // the sender.
    assert!(
        matches!(
            receiver,
            ProtoError::TooManyRetries {
                attempts: 4,
                limit: 3,
                ..
            }
        ),
        "{receiver:?}"
    );
    let text = receiver.to_string();
    assert!(
        text.contains("failed 4 times, over the retry limit of 3: digest mismatch"),
        "{text}"
    );
    assert_eq!(sender.code(), ErrorCode::TooManyRetries);
    assert!(sender.to_string().contains("retry limit"), "{sender}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let (r, _) = Sim::new(seed, &[3000, 7], 64, NetConfig::hostile()).run();
        (
            r.events,
            r.sessions,
            r.wire_bytes,
            r.corrupted,
            r.duplicated,
        )
    };
    assert_eq!(run(42), run(42));
}
