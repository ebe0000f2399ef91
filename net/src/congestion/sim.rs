//! A simulated bottleneck for [`LinkRate`] (tests only), in the spirit of `proto::sim`.
//!
//! Deterministic from a seed and a virtual clock: flows send UDP-sized packets into one FIFO
//! bottleneck (a rate in bytes per second of IP packets and a queue of bounded bytes,
//! tail-dropped), then lose some at random, cross the propagation delay and are acknowledged
//! one by one after the return delay. A packet is declared lost once three later packets of
//! its flow are acknowledged (QUIC's packet threshold). The [`LinkRate`] flow is paced the
//! way quinn paces it (1.25 × window / smoothed RTT) and limited by its window; competitors
//! are a Reno flow (slow start, halving on loss, not paced) and a constant-rate flow that
//! ignores everything.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use super::*;

/// UDP payload per packet.
const PAYLOAD: u64 = 1452;
/// IPv4 and UDP headers (what the bottleneck's rate counts on top of the payload).
const IP_UDP: u64 = 28;

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d) | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Kind {
    Link(Box<LinkRate>),
    /// Reno: window, slow-start threshold, end of the current recovery (packet number).
    Reno {
        cwnd: f64,
        ssthresh: f64,
        recovery_until: u64,
    },
    /// Constant rate, bytes per second of payload.
    Constant(f64),
}

struct Flow {
    kind: Kind,
    start: Duration,
    stop: Duration,
    next_pn: u64,
    in_flight: u64,
    outstanding: BTreeMap<u64, Duration>,
    next_send: Duration,
    srtt: Option<Duration>,
    /// Payload bytes acknowledged, per 100 ms bucket.
    delivered: Vec<u64>,
    lost: u64,
}

impl Flow {
    fn new(kind: Kind, start: Duration, stop: Duration) -> Self {
        Flow {
            kind,
            start,
            stop,
            next_pn: 0,
            in_flight: 0,
            outstanding: BTreeMap::new(),
            next_send: start,
            srtt: None,
            delivered: Vec::new(),
            lost: 0,
        }
    }

    fn window(&self) -> u64 {
        match &self.kind {
            Kind::Link(c) => c.window(),
            Kind::Reno { cwnd, .. } => *cwnd as u64,
            Kind::Constant(_) => u64::MAX,
        }
    }

    /// Seconds between two packets.
    fn gap(&self) -> f64 {
        match &self.kind {
            // quinn's pacer: 1.25 × window per smoothed RTT (the first RTT guess before any).
            Kind::Link(c) => {
                let srtt = self.srtt.unwrap_or(c.min_rtt()).as_secs_f64();
                PAYLOAD as f64 * srtt / (1.25 * c.window() as f64)
            }
            Kind::Reno { .. } => 0.0,
            Kind::Constant(rate) => PAYLOAD as f64 / rate,
        }
    }
}

/// A packet on its way back as an acknowledgement: (arrival, flow, packet number).
type Ack = Reverse<(Duration, usize, u64)>;

/// The simulated network and its flows.
pub(super) struct Sim {
    t0: Instant,
    now: Duration,
    rng: Rng,
    /// Bottleneck rate, bytes per second of IP packets.
    capacity: f64,
    queue_bytes: u64,
    busy_until: Duration,
    /// Propagation RTT, and from when a new one applies (a delay step).
    rtt: Duration,
    rtt_step: Option<(Duration, Duration)>,
    loss: f64,
    acks: BinaryHeap<Ack>,
    flows: Vec<Flow>,
    pub queue_drops: u64,
    pub random_drops: u64,
    pub sent: u64,
    /// Largest queueing delay seen after `measure_from`.
    pub max_queue_delay: Duration,
    pub measure_from: Duration,
    /// Highest 1-s rate (bytes of IP packets per second) of flow 0 after `measure_from`.
    ceiling_check: Vec<u64>,
}

/// Unacknowledged this long, a packet is lost.
const TIMEOUT: Duration = Duration::from_secs(1);

const BUCKET: Duration = Duration::from_millis(100);

impl Sim {
    /// A bottleneck of `mbit` Mbit/s (IP packets), `queue_ms` of queue at that rate, `rtt`
    /// propagation delay and `loss` random loss.
    pub fn new(mbit: f64, queue_ms: u64, rtt: Duration, loss: f64, seed: u64) -> Self {
        let capacity = mbit * 1e6 / 8.0;
        Sim {
            t0: Instant::now(),
            now: Duration::ZERO,
            rng: Rng::new(seed),
            capacity,
            queue_bytes: (capacity * queue_ms as f64 / 1000.0) as u64,
            busy_until: Duration::ZERO,
            rtt,
            rtt_step: None,
            loss,
            acks: BinaryHeap::new(),
            flows: Vec::new(),
            queue_drops: 0,
            random_drops: 0,
            sent: 0,
            max_queue_delay: Duration::ZERO,
            measure_from: Duration::ZERO,
            ceiling_check: Vec::new(),
        }
    }

    /// From `at` on, the propagation RTT is `rtt`.
    pub fn delay_step(&mut self, at: Duration, rtt: Duration) {
        self.rtt_step = Some((at, rtt));
    }

    /// Adds a [`LinkRate`] flow with a ceiling of `mbit` and an RTT guess of `rtt_ms`.
    pub fn add_link(&mut self, mbit: u64, rtt_ms: u64, start: Duration, stop: Duration) -> usize {
        let config = LinkRateConfig::new(mbit, rtt_ms);
        let c = LinkRate::new(&config, self.t0 + start, PAYLOAD as u16);
        self.add(Kind::Link(Box::new(c)), start, stop)
    }

    /// Adds a Reno flow.
    pub fn add_reno(&mut self, start: Duration, stop: Duration) -> usize {
        let kind = Kind::Reno {
            cwnd: 10.0 * PAYLOAD as f64,
            ssthresh: f64::MAX,
            recovery_until: 0,
        };
        self.add(kind, start, stop)
    }

    /// Adds a flow of `mbit` Mbit/s of payload that ignores losses and delays.
    pub fn add_constant(&mut self, mbit: f64, start: Duration, stop: Duration) -> usize {
        self.add(Kind::Constant(mbit * 1e6 / 8.0), start, stop)
    }

    fn add(&mut self, kind: Kind, start: Duration, stop: Duration) -> usize {
        self.flows.push(Flow::new(kind, start, stop));
        self.flows.len() - 1
    }

    /// The [`LinkRate`] of flow `i`.
    pub fn link(&self, i: usize) -> &LinkRate {
        match &self.flows[i].kind {
            Kind::Link(c) => c,
            _ => panic!("flow {i} is not a LinkRate flow"),
        }
    }

    /// Flow `i`'s goodput between `from` and `to`, Mbit/s of payload.
    pub fn goodput(&self, i: usize, from: Duration, to: Duration) -> f64 {
        let a = (from.as_millis() / BUCKET.as_millis()) as usize;
        let b = (to.as_millis() / BUCKET.as_millis()) as usize;
        let d = &self.flows[i].delivered;
        let bytes: u64 = d[a.min(d.len())..b.min(d.len())].iter().sum();
        bytes as f64 * 8.0 / (to - from).as_secs_f64() / 1e6
    }

    /// The highest rate flow 0 put through the bottleneck in any whole second after
    /// `measure_from`, Mbit/s of IP packets.
    pub fn peak_rate_mbit(&self) -> f64 {
        self.ceiling_check.iter().copied().max().unwrap_or(0) as f64 * 8.0 / 1e6
    }

    /// The bottleneck's capacity in Mbit/s of payload (what goodput can reach).
    pub fn payload_capacity_mbit(&self) -> f64 {
        self.capacity * 8.0 / 1e6 * PAYLOAD as f64 / (PAYLOAD + IP_UDP) as f64
    }

    fn rtt_now(&self) -> Duration {
        match self.rtt_step {
            Some((at, rtt)) if self.now >= at => rtt,
            _ => self.rtt,
        }
    }

    /// Runs until `until`.
    pub fn run(&mut self, until: Duration) {
        while self.now < until {
            for i in 0..self.flows.len() {
                self.send_from(i);
            }
            let next_ack = self.acks.peek().map(|Reverse((t, _, _))| *t);
            let next_send = self
                .flows
                .iter()
                .filter(|f| self.now < f.stop && f.in_flight + PAYLOAD <= f.window())
                .map(|f| f.next_send.max(f.start))
                .min();
            let next_timeout = self
                .flows
                .iter()
                .filter_map(|f| f.outstanding.values().min().map(|&t| t + TIMEOUT))
                .min();
            let next = [next_ack, next_send, next_timeout]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until);
            self.now = next.max(self.now).min(until);
            for i in 0..self.flows.len() {
                self.expire(i);
            }
            while let Some(Reverse((t, flow, pn))) = self.acks.peek().copied() {
                if t > self.now {
                    break;
                }
                self.acks.pop();
                self.ack(flow, pn);
            }
        }
    }

    fn send_from(&mut self, i: usize) {
        loop {
            let f = &self.flows[i];
            if self.now < f.start
                || self.now >= f.stop
                || f.next_send > self.now
                || f.in_flight + PAYLOAD > f.window()
            {
                return;
            }
            let pn = f.next_pn;
            let gap = Duration::from_secs_f64(f.gap());
            let f = &mut self.flows[i];
            f.next_pn += 1;
            f.in_flight += PAYLOAD;
            f.outstanding.insert(pn, self.now);
            f.next_send = f.next_send.max(self.now - gap.min(self.now)) + gap;
            if let Kind::Link(c) = &mut f.kind {
                c.on_sent(self.t0 + self.now, pn);
            }
            self.transmit(i, pn);
        }
    }

    /// The packet enters the bottleneck now.
    fn transmit(&mut self, flow: usize, pn: u64) {
        self.sent += 1;
        let size = PAYLOAD + IP_UDP;
        let backlog = self.busy_until.saturating_sub(self.now);
        let backlog_bytes = (backlog.as_secs_f64() * self.capacity) as u64;
        if backlog_bytes + size > self.queue_bytes {
            self.queue_drops += 1;
            return;
        }
        if self.now >= self.measure_from {
            self.max_queue_delay = self.max_queue_delay.max(backlog);
        }
        let departure =
            self.busy_until.max(self.now) + Duration::from_secs_f64(size as f64 / self.capacity);
        self.busy_until = departure;
        if flow == 0 && departure >= self.measure_from {
            let second = (departure - self.measure_from).as_secs() as usize;
            if self.ceiling_check.len() <= second {
                self.ceiling_check.resize(second + 1, 0);
            }
            self.ceiling_check[second] += size;
        }
        if self.rng.unit() < self.loss {
            self.random_drops += 1;
            return;
        }
        let rtt = self.rtt_now();
        self.acks.push(Reverse((departure + rtt, flow, pn)));
    }

    /// Packets unacknowledged for [`TIMEOUT`] are lost (a crude PTO, so a flow whose every
    /// packet was lost starts again). Reno restarts from two packets.
    fn expire(&mut self, i: usize) {
        let now = self.now;
        let f = &mut self.flows[i];
        let expired: Vec<u64> = f
            .outstanding
            .iter()
            .filter(|&(_, &t)| t + TIMEOUT <= now)
            .map(|(&p, _)| p)
            .collect();
        if expired.is_empty() {
            return;
        }
        for p in &expired {
            f.outstanding.remove(p);
            f.in_flight -= PAYLOAD;
            f.lost += PAYLOAD;
        }
        let bytes = expired.len() as u64 * PAYLOAD;
        let next_pn = f.next_pn;
        match &mut f.kind {
            Kind::Link(c) => c.on_loss(false, bytes),
            Kind::Reno {
                cwnd,
                ssthresh,
                recovery_until,
            } => {
                *ssthresh = (*cwnd / 2.0).max(2.0 * PAYLOAD as f64);
                *cwnd = 2.0 * PAYLOAD as f64;
                *recovery_until = next_pn;
            }
            Kind::Constant(_) => {}
        }
    }

    fn ack(&mut self, i: usize, pn: u64) {
        let now = self.now;
        let at = self.t0 + now;
        let f = &mut self.flows[i];
        let Some(sent) = f.outstanding.remove(&pn) else {
            return;
        };
        f.in_flight -= PAYLOAD;
        let bucket = (now.as_millis() / BUCKET.as_millis()) as usize;
        if f.delivered.len() <= bucket {
            f.delivered.resize(bucket + 1, 0);
        }
        f.delivered[bucket] += PAYLOAD;
        let sample = now - sent;
        f.srtt = Some(f.srtt.map_or(sample, |s| (s * 7 + sample) / 8));
        let lost: Vec<u64> = f
            .outstanding
            .range(..pn.saturating_sub(2))
            .map(|(&p, _)| p)
            .collect();
        for p in &lost {
            f.outstanding.remove(p);
            f.in_flight -= PAYLOAD;
            f.lost += PAYLOAD;
        }
        let lost_bytes = lost.len() as u64 * PAYLOAD;
        let next_pn = f.next_pn;
        match &mut f.kind {
            Kind::Link(c) => {
                c.on_ack(at, self.t0 + sent, PAYLOAD, false);
                if lost_bytes > 0 {
                    c.on_loss(false, lost_bytes);
                }
                c.on_end_acks(at, Some(pn));
            }
            Kind::Reno {
                cwnd,
                ssthresh,
                recovery_until,
            } => {
                if lost_bytes > 0 && pn >= *recovery_until {
                    *ssthresh = (*cwnd / 2.0).max(2.0 * PAYLOAD as f64);
                    *cwnd = *ssthresh;
                    *recovery_until = next_pn;
                } else if *cwnd < *ssthresh {
                    *cwnd += PAYLOAD as f64;
                } else {
                    *cwnd += PAYLOAD as f64 * PAYLOAD as f64 / *cwnd;
                }
            }
            Kind::Constant(_) => {}
        }
    }
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

const FOREVER: Duration = Duration::from_secs(3600);
const RTT: Duration = Duration::from_millis(50);

/// Alone on a link as fast as the ceiling, `loss` random loss: goodput over 5..20 s and the sim.
fn alone(loss: f64, seed: u64) -> (f64, Sim) {
    let mut sim = Sim::new(50.0, 100, RTT, loss, seed);
    sim.measure_from = s(5);
    let flow = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    sim.run(s(20));
    (sim.goodput(flow, s(5), s(20)), sim)
}

#[test]
fn fills_a_dedicated_link_without_a_queue() {
    let (goodput, sim) = alone(0.0, 1);
    let line = sim.payload_capacity_mbit();
    assert!(goodput > 0.93 * line, "{goodput:.1} of {line:.1} Mbit/s");
    assert_eq!(sim.queue_drops, 0);
    assert!(
        sim.max_queue_delay < Duration::from_millis(5),
        "queue reached {:?}",
        sim.max_queue_delay
    );
    assert_eq!(sim.link(0).cuts(), 0);
    assert_eq!(sim.link(0).phase(), Phase::Steady);
}

#[test]
fn reaches_the_ceiling_within_a_few_round_trips() {
    let mut sim = Sim::new(50.0, 100, RTT, 0.0, 2);
    let flow = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    sim.run(Duration::from_millis(600));
    let line = sim.payload_capacity_mbit();
    let goodput = sim.goodput(flow, Duration::from_millis(400), Duration::from_millis(600));
    assert!(
        goodput > 0.85 * line,
        "{goodput:.1} of {line:.1} after 400 ms"
    );
}

#[test]
fn random_loss_is_not_congestion() {
    for (loss, min_share) in [(0.01, 0.9), (0.05, 0.85)] {
        let (goodput, sim) = alone(loss, 3);
        let line = sim.payload_capacity_mbit();
        assert!(
            goodput > min_share * line,
            "{loss}: {goodput:.1} of {line:.1} Mbit/s"
        );
        assert_eq!(
            sim.link(0).cuts(),
            0,
            "{loss}: cut for random loss (rate {:.1} Mbit/s, {:?})",
            sim.link(0).rate() * 8e-6,
            sim.link(0).phase()
        );
        assert_eq!(sim.queue_drops, 0, "{loss}");
    }
}

#[test]
fn never_above_the_ceiling_on_a_faster_link() {
    // A 200 Mbit/s bottleneck, a 50 Mbit/s ceiling.
    let mut sim = Sim::new(200.0, 100, RTT, 0.0, 4);
    sim.measure_from = s(1);
    let flow = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    sim.run(s(15));
    let peak = sim.peak_rate_mbit();
    assert!(
        peak <= 50.0,
        "peak {peak:.2} Mbit/s over a 50 Mbit/s ceiling"
    );
    let goodput = sim.goodput(flow, s(2), s(15));
    assert!(goodput > 0.9 * 50.0 * 1452.0 / 1500.0, "{goodput:.1}");
}

#[test]
fn a_ceiling_above_the_link_backs_off_on_the_queue() {
    // Configured 100 Mbit/s, the link carries 50: the queue tells.
    let mut sim = Sim::new(50.0, 200, RTT, 0.0, 5);
    sim.measure_from = s(5);
    let flow = sim.add_link(100, 50, Duration::ZERO, FOREVER);
    sim.run(s(30));
    let line = sim.payload_capacity_mbit();
    let goodput = sim.goodput(flow, s(5), s(30));
    assert!(goodput > 0.8 * line, "{goodput:.1} of {line:.1}");
    assert!(sim.link(0).cuts() > 0);
    assert_eq!(sim.queue_drops, 0);
    let limit = RTT / 2 + Duration::from_millis(5 + 25);
    assert!(
        sim.max_queue_delay < limit,
        "queue delay {:?}",
        sim.max_queue_delay
    );
}

#[test]
fn delay_step_up_then_recovers_and_step_down_is_free() {
    let mut sim = Sim::new(50.0, 200, RTT, 0.0, 6);
    let flow = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    sim.delay_step(s(10), Duration::from_millis(100));
    sim.run(s(10));
    assert_eq!(sim.link(flow).cuts(), 0);
    sim.run(s(12));
    // A longer route looks like a queue at first...
    assert!(sim.link(flow).cuts() > 0);
    // ... and is the new minimum after the 10-s window.
    sim.run(s(30));
    let min = sim.link(flow).min_rtt();
    assert!(
        min >= Duration::from_millis(100) && min < Duration::from_millis(102),
        "{min:?}"
    );
    let line = sim.payload_capacity_mbit();
    let goodput = sim.goodput(flow, s(26), s(30));
    assert!(
        goodput > 0.9 * line,
        "{goodput:.1} of {line:.1} after the step"
    );

    // Shorter again: a new minimum at once, no cut.
    // (The step reorders a round trip's packets, which quinn and this simulation take for
    // a burst of loss: at most one cut.)
    let cuts = sim.link(flow).cuts();
    sim.delay_step(s(30), RTT);
    sim.run(s(35));
    assert!(sim.link(flow).cuts() <= cuts + 1);
    assert!(sim.link(flow).min_rtt() < RTT + Duration::from_millis(2));
    assert!(sim.goodput(flow, s(31), s(35)) > 0.9 * line);
}

#[test]
fn yields_to_a_reno_flow_filling_the_queue() {
    // A queue of one BDP, a Reno flow arriving at 5 s.
    let mut sim = Sim::new(50.0, 50, RTT, 0.0, 7);
    let ours = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    let reno = sim.add_reno(s(5), s(40));
    sim.run(s(50));
    let line = sim.payload_capacity_mbit();
    let (a, b) = (
        sim.goodput(ours, s(15), s(40)),
        sim.goodput(reno, s(15), s(40)),
    );
    assert!(b > 0.25 * line, "reno {b:.1}, ours {a:.1} of {line:.1}");
    assert!(a + b > 0.8 * line, "reno {b:.1}, ours {a:.1} of {line:.1}");
    assert!(a >= line * FLOOR_FRACTION * 0.9, "ours {a:.1}");
    // Once it is gone the link is ours again.
    let after = sim.goodput(ours, s(45), s(50));
    assert!(after > 0.9 * line, "{after:.1} after reno left");
}

#[test]
fn shares_with_a_constant_rate_flow_without_filling_the_queue() {
    // 40 % of the link taken by a flow that ignores congestion, from 5 s to 30 s.
    let mut sim = Sim::new(50.0, 100, RTT, 0.0, 8);
    let ours = sim.add_link(50, 50, Duration::ZERO, FOREVER);
    let other = sim.add_constant(20.0, s(5), s(30));
    sim.measure_from = s(8);
    sim.run(s(30));
    let line = sim.payload_capacity_mbit();
    let (a, b) = (
        sim.goodput(ours, s(10), s(30)),
        sim.goodput(other, s(10), s(30)),
    );
    assert!(b > 19.5, "the constant flow got {b:.1} of 20");
    assert!(
        a > 0.75 * (line - 20.0),
        "ours {a:.1} beside 20 of {line:.1}"
    );
    assert_eq!(sim.queue_drops, 0);
    assert!(
        sim.max_queue_delay < RTT,
        "queue delay {:?}",
        sim.max_queue_delay
    );
    sim.run(s(36));
    let after = sim.goodput(ours, s(33), s(36));
    assert!(
        after > 0.9 * line,
        "{after:.1} after the other flow stopped"
    );
}
