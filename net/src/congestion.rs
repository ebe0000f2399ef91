//! `link`: a congestion controller for a dedicated link of known rate.
//!
//! quinn's CUBIC halves its window on every loss event, so random loss on a long path (1 % at
//! 50 ms) keeps it far below the line; its BBRv1 reaches the line but overfills the
//! bottleneck's queue while probing. baylink runs over a link whose rate the operator
//! configures (`link.rate_mbit`), so this controller does not search for the rate from zero
//! and does not read loss as congestion:
//!
//! - **Ceiling.** It never sends faster than the configured rate (counted in IP packets:
//!   the UDP payload rate is scaled by `mtu / (mtu + 48)`).
//! - **Rate.** It keeps a target rate. At the start the rate is an eighth of the ceiling and
//!   doubles every round trip while the queueing delay stays low, so it reaches the ceiling
//!   within three or four round trips.
//! - **Window.** quinn paces at 1.25 × window / smoothed RTT and never has more than the
//!   window in flight, so the window is what sets the rate: `rate × (1.25 × min RTT + 4 ms)`,
//!   and never more than `ceiling × mean RTT` (what the ceiling delivers in one measured
//!   round trip, ACK delays included). On a link at least as fast as the ceiling no queue
//!   forms; on a slower one the standing queue is bounded by the headroom.
//! - **Delay, not loss.** Each round trip (from a sent packet to its acknowledgement) it
//!   compares the smallest RTT sample of the round with the minimum RTT of the path. When
//!   the difference (queueing delay) is more than `min RTT / 2 + 5 ms`, someone is filling
//!   the bottleneck's queue (another flow on a shared link, or a ceiling above the real
//!   rate): the rate drops to 85 % of the smaller of the rate and the measured delivery rate
//!   (bytes acknowledged in the round over its duration), and the next round, which still
//!   carries packets sent before the cut, is not judged. While the queueing delay is under
//!   half the threshold the rate grows by 1/32 of the ceiling per round trip back to the
//!   ceiling.
//! - **Loss.** Lost packets are retransmitted by quinn; the rate ignores them unless more
//!   than 15 % of a round's packets are lost (no queue to see, yet clearly too fast: a
//!   shallow buffer at a bottleneck slower than the ceiling), which counts like a queue.
//!   Persistent congestion (everything lost for several PTOs) restarts from the floor.
//! - **Floor.** The rate never drops below 1/64 of the ceiling, so a long transfer keeps
//!   moving beside a flow that fills the queue, and keeps sampling the RTT.
//! - **Minimum RTT.** The smallest sample, confirmed by any sample within 1/64 (or 0.25 ms)
//!   of it. Unconfirmed for 10 s, the window is halved for two round trips (a drain, as in
//!   BBR's ProbeRTT) and the second round's minimum becomes the minimum: a longer route (a
//!   delay step) is accepted within about 10 s instead of being taken for a queue forever.
//!
//! The state machine is sans-IO: [`LinkRate`]'s methods take the time as an argument and the
//! unit tests drive it over a simulated bottleneck (`congestion::sim`).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// IPv6 and UDP headers: a link MTU less this is the UDP payload (QUIC packet) it carries.
/// Over IPv4 this leaves 20 bytes unused, which is the safe side. (Here because the
/// ceiling counts IP bytes; `transport` re-exports it.)
pub const IP_UDP_OVERHEAD: u16 = 48;

/// Rate at the start, as a fraction of the ceiling (then doubled every round trip).
const START_FRACTION: f64 = 1.0 / 8.0;
/// Lowest rate, as a fraction of the ceiling.
const FLOOR_FRACTION: f64 = 1.0 / 64.0;
/// Rate added per uncongested round trip after the start, as a fraction of the ceiling.
const STEP_FRACTION: f64 = 1.0 / 32.0;
/// Multiplicative decrease when the queue builds.
const BACKOFF: f64 = 0.85;
/// Window headroom over one minimum RTT, as a fraction of the minimum RTT.
const HEADROOM_RTT_FRACTION: f64 = 0.25;
/// Window headroom over one minimum RTT, fixed part (ACK delays, scheduling, GSO batches).
const HEADROOM_FIXED: Duration = Duration::from_millis(4);
/// Queueing delay that counts as congestion, fixed part (added to half the minimum RTT).
const QUEUE_THRESHOLD_FIXED: Duration = Duration::from_millis(5);
/// Fraction of a round's bytes lost above which the round counts as congested.
const LOSS_CONGESTED: f64 = 0.15;
/// A round must carry this many packets for its loss fraction to count.
const LOSS_MIN_PACKETS: u64 = 100;
/// A sample this close to the minimum RTT (or within 1/64 of it) confirms it.
const MIN_RTT_TOLERANCE: Duration = Duration::from_micros(250);
/// How long the minimum RTT is trusted without a new sample at or below it.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Smallest window, in packets.
const MIN_WINDOW_PACKETS: u64 = 4;
/// Weight of a new sample in the mean RTT (per acknowledged packet).
const MEAN_RTT_GAIN: f64 = 1.0 / 64.0;

/// Where the controller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Doubling every round trip from `START_FRACTION` (1/8) of the ceiling.
    Start,
    /// At or near the ceiling, or backed off and recovering linearly.
    Steady,
}

/// [`ControllerFactory`] for [`LinkRate`]: the link's configured rate and RTT.
#[derive(Debug, Clone)]
pub struct LinkRateConfig {
    /// Ceiling in bits per second of IP packets (`link.rate_mbit` × 10⁶).
    pub ceiling_bps: u64,
    /// RTT assumed before the first sample (`link.rtt_ms`).
    pub initial_rtt: Duration,
}

impl LinkRateConfig {
    /// A ceiling of `rate_mbit` Mbit/s and a first RTT guess of `rtt_ms`.
    pub fn new(rate_mbit: u64, rtt_ms: u64) -> Self {
        LinkRateConfig {
            ceiling_bps: rate_mbit.saturating_mul(1_000_000).max(1_000_000),
            initial_rtt: Duration::from_millis(rtt_ms.max(1)),
        }
    }
}

impl ControllerFactory for LinkRateConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LinkRate::new(&self, now, current_mtu))
    }
}

/// The controller's state (see the module documentation).
#[derive(Debug, Clone)]
pub struct LinkRate {
    /// Ceiling, bytes per second of IP packets.
    ceiling_ip: f64,
    /// Current UDP payload size (quinn's MTU).
    mtu: u64,
    /// Target rate, bytes per second of UDP payload.
    rate: f64,
    phase: Phase,
    initial_rtt: Duration,
    /// Minimum RTT and when it was last confirmed.
    min_rtt: Option<(Duration, Instant)>,
    /// Mean of the per-packet RTT samples (ACK delay included).
    mean_rtt: Option<f64>,
    // The round trip being measured: it ends when a packet numbered `round_end` or later is
    // acknowledged.
    round_end: Option<u64>,
    round_start: Instant,
    round_delivered: u64,
    round_lost: u64,
    round_min_rtt: Option<Duration>,
    round_app_limited: bool,
    /// Rounds still to pass before the next verdict (the one after a cut).
    skip_rounds: u8,
    /// Rounds left of a drain to measure the minimum RTT afresh (window halved).
    probe_rounds: u8,
    last_sent: u64,
    /// Rounds judged congested and cuts made (for tests and metrics).
    cuts: u64,
}

impl LinkRate {
    /// A controller for `config`, created at `now` with packets of `mtu` bytes of UDP payload.
    pub fn new(config: &LinkRateConfig, now: Instant, mtu: u16) -> Self {
        let mut me = LinkRate {
            ceiling_ip: config.ceiling_bps as f64 / 8.0,
            mtu: u64::from(mtu.max(1200)),
            rate: 0.0,
            phase: Phase::Start,
            initial_rtt: config.initial_rtt,
            min_rtt: None,
            mean_rtt: None,
            round_end: None,
            round_start: now,
            round_delivered: 0,
            round_lost: 0,
            round_min_rtt: None,
            round_app_limited: false,
            skip_rounds: 0,
            probe_rounds: 0,
            last_sent: 0,
            cuts: 0,
        };
        me.rate = me.ceiling() * START_FRACTION;
        me
    }

    /// The ceiling in bytes per second of UDP payload at the current packet size.
    pub fn ceiling(&self) -> f64 {
        let mtu = self.mtu as f64;
        self.ceiling_ip * mtu / (mtu + f64::from(IP_UDP_OVERHEAD))
    }

    /// Target rate, bytes per second of UDP payload.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How many times the rate was cut for a queue (or heavy loss).
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// Minimum RTT in use (the configured guess before the first sample).
    pub fn min_rtt(&self) -> Duration {
        self.min_rtt.map_or(self.initial_rtt, |(rtt, _)| rtt)
    }

    fn floor(&self) -> f64 {
        self.ceiling() * FLOOR_FRACTION
    }

    /// Queueing delay above which a round counts as congested.
    pub fn queue_threshold(&self) -> Duration {
        self.min_rtt() / 2 + QUEUE_THRESHOLD_FIXED
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        let min_rtt = self.min_rtt().as_secs_f64();
        let headroom = min_rtt * HEADROOM_RTT_FRACTION + HEADROOM_FIXED.as_secs_f64();
        let by_rate = self.rate * (min_rtt + headroom);
        let mean = self.mean_rtt.unwrap_or(min_rtt).max(min_rtt);
        let by_ceiling = self.ceiling() * mean;
        let window = by_rate.min(by_ceiling);
        let window = if self.probe_rounds > 0 {
            self.rate * min_rtt / 2.0
        } else {
            window
        };
        (window as u64).max(MIN_WINDOW_PACKETS * self.mtu)
    }

    /// Packets up to number `packet` were sent.
    pub fn on_sent(&mut self, now: Instant, packet: u64) {
        self.last_sent = packet;
        if self.round_end.is_none() {
            self.round_end = Some(packet);
            self.round_start = now;
        }
    }

    /// `bytes` sent at `sent` were acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let sample = now.saturating_duration_since(sent);
        match self.min_rtt {
            // Within a little of the minimum still confirms it.
            Some((min, _)) if sample <= min + (min / 64).max(MIN_RTT_TOLERANCE) => {
                self.min_rtt = Some((min.min(sample), now));
            }
            Some(_) => {}
            None => self.min_rtt = Some((sample, now)),
        }
        self.round_min_rtt = Some(self.round_min_rtt.map_or(sample, |m| m.min(sample)));
        let s = sample.as_secs_f64();
        self.mean_rtt = Some(match self.mean_rtt {
            None => s,
            Some(m) => m + (s - m) * MEAN_RTT_GAIN,
        });
        self.round_delivered += bytes;
        self.round_app_limited |= app_limited;
    }

    /// A batch of acknowledgements ended; `largest` is the largest packet number acknowledged.
    pub fn on_end_acks(&mut self, now: Instant, largest: Option<u64>) {
        if let (Some(end), Some(largest)) = (self.round_end, largest)
            && largest >= end
        {
            self.end_round(now);
        }
    }

    /// `bytes` were declared lost (`persistent`: persistent congestion).
    pub fn on_loss(&mut self, persistent: bool, bytes: u64) {
        self.round_lost += bytes;
        if persistent {
            self.rate = self.floor();
            self.phase = Phase::Start;
            self.cuts += 1;
        }
    }

    /// The UDP payload size changed.
    pub fn on_mtu(&mut self, mtu: u16) {
        let before = self.ceiling();
        self.mtu = u64::from(mtu.max(1200));
        // Keep the rate's share of the ceiling.
        self.rate = (self.rate * self.ceiling() / before).min(self.ceiling());
    }

    fn end_round(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.round_start)
            .as_secs_f64();
        let delivered = self.round_delivered;
        let lost = self.round_lost;
        let delivery_rate = if elapsed > 0.0 {
            delivered as f64 / elapsed
        } else {
            self.rate
        };
        let min_rtt = self.min_rtt();
        let round_min = self.round_min_rtt.unwrap_or(min_rtt);
        let queue = round_min.saturating_sub(min_rtt);
        let threshold = self.queue_threshold();
        let lossy = delivered + lost >= LOSS_MIN_PACKETS * self.mtu
            && lost as f64 > LOSS_CONGESTED * (delivered + lost) as f64;

        if self.probe_rounds > 0 {
            // Draining: the second round's minimum is the path's, without our queue.
            self.probe_rounds -= 1;
            if self.probe_rounds == 0 {
                if let Some(round_min) = self.round_min_rtt {
                    self.min_rtt = Some((round_min, now));
                }
                self.skip_rounds = 0;
            }
        } else if self.skip_rounds > 0 {
            self.skip_rounds -= 1;
        } else if queue > threshold || lossy {
            let basis = if self.round_app_limited {
                self.rate
            } else {
                self.rate.min(delivery_rate)
            };
            self.rate = (basis * BACKOFF).max(self.floor());
            self.phase = Phase::Steady;
            self.skip_rounds = 1;
            self.cuts += 1;
        } else if queue <= threshold / 2 {
            let ceiling = self.ceiling();
            self.rate = match self.phase {
                Phase::Start => self.rate * 2.0,
                Phase::Steady => self.rate + ceiling * STEP_FRACTION,
            }
            .min(ceiling);
            if self.rate >= ceiling {
                self.phase = Phase::Steady;
            }
        }

        // A minimum not seen for the window: drain for two rounds and take what is left
        // (a longer route, or a queue someone else keeps standing).
        if self.probe_rounds == 0
            && let Some((_, since)) = self.min_rtt
            && now.saturating_duration_since(since) > MIN_RTT_WINDOW
        {
            self.probe_rounds = 2;
        }

        self.round_end = Some(self.last_sent);
        self.round_start = now;
        self.round_delivered = 0;
        self.round_lost = 0;
        self.round_min_rtt = None;
        self.round_app_limited = false;
    }
}

impl Controller for LinkRate {
    fn on_sent(&mut self, now: Instant, _bytes: u64, last_packet_number: u64) {
        LinkRate::on_sent(self, now, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        LinkRate::on_ack(self, now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        _app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        LinkRate::on_end_acks(self, now, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.on_loss(is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        LinkRate::window(self)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = LinkRate::window(self);
        metrics.pacing_rate = Some((self.rate * 8.0) as u64);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        LinkRate::window(self)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod sim;
