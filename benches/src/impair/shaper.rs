//! What happens to one packet on one direction of the emulated link, without any I/O: loss,
//! the rate limit with its bounded queue, delay, jitter, reordering and duplication. The
//! forwarder feeds it packet lengths and timestamps and gets back a release time (or a drop),
//! so the link model is unit-tested here with a virtual clock.

use std::time::{Duration, Instant};

/// The impairment of one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way delay (half the round-trip time).
    pub delay: Duration,
    /// Uniform jitter: each packet's delay is `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability in 0..=1 that a packet is dropped.
    pub loss: f64,
    /// Probability in 0..=1 that a packet skips the delay and so overtakes the ones in flight.
    pub reorder: f64,
    /// Probability in 0..=1 that a packet is delivered twice.
    pub duplicate: f64,
    /// Link rate in bits per second of IP packets, `None` for unlimited.
    pub rate_bps: Option<u64>,
    /// Bytes that may wait for the rate limit; a packet that would exceed it is dropped.
    pub queue_bytes: u64,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Random loss.
    Loss,
    /// The rate limit's queue was full.
    Queue,
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Drop it.
    Drop(Drop),
    /// Write it out at `at`; `copies` is 1, or 2 when duplicated.
    Release {
        /// When to write it into the other namespace.
        at: Instant,
        /// 1, or 2 for a duplicated packet.
        copies: u8,
        /// It skipped the delay (counted as reordered).
        reordered: bool,
    },
}

/// SplitMix64: small, fast, and reproducible from a seed (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// The state of one direction: the random generator and when the rate limit frees up.
#[derive(Debug)]
pub struct Shaper {
    cfg: Impairment,
    rng: Rng,
    /// When the emulated wire finishes sending what is queued; `None` before the first packet.
    link_free_at: Option<Instant>,
}

impl Shaper {
    /// A shaper for one direction, seeded.
    pub fn new(cfg: Impairment, seed: u64) -> Shaper {
        Shaper {
            cfg,
            rng: Rng::new(seed),
            link_free_at: None,
        }
    }

    /// The fate of a packet of `len` bytes that arrived at `now`.
    pub fn admit(&mut self, now: Instant, len: usize) -> Fate {
        if self.rng.chance(self.cfg.loss) {
            return Fate::Drop(Drop::Loss);
        }
        let departs = match self.cfg.rate_bps {
            None => now,
            Some(rate) => {
                let start = self.link_free_at.map_or(now, |free| free.max(now));
                let backlog = start.duration_since(now);
                let backlog_bytes = (backlog.as_secs_f64() * rate as f64 / 8.0) as u64;
                if backlog_bytes + len as u64 > self.cfg.queue_bytes {
                    return Fate::Drop(Drop::Queue);
                }
                let wire = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
                let done = start + wire;
                self.link_free_at = Some(done);
                done
            }
        };
        let reordered = !self.cfg.delay.is_zero() && self.rng.chance(self.cfg.reorder);
        let at = if reordered {
            departs
        } else {
            departs + self.delay_sample()
        };
        let copies = if self.rng.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        Fate::Release {
            at,
            copies,
            reordered,
        }
    }

    fn delay_sample(&mut self) -> Duration {
        if self.cfg.jitter.is_zero() {
            return self.cfg.delay;
        }
        let spread = self.cfg.jitter.as_secs_f64() * (2.0 * self.rng.unit() - 1.0);
        Duration::from_secs_f64((self.cfg.delay.as_secs_f64() + spread).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Impairment {
        Impairment {
            delay: Duration::from_millis(25),
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
            rate_bps: None,
            queue_bytes: 1 << 20,
        }
    }

    fn release_at(f: Fate) -> Instant {
        match f {
            Fate::Release { at, .. } => at,
            Fate::Drop(d) => panic!("dropped: {d:?}"),
        }
    }

    #[test]
    fn delay_is_applied_exactly_without_jitter() {
        let mut s = Shaper::new(plain(), 1);
        let t0 = Instant::now();
        assert_eq!(
            release_at(s.admit(t0, 1500)),
            t0 + Duration::from_millis(25)
        );
    }

    #[test]
    fn loss_rate_matches_and_the_seed_reproduces_it() {
        let cfg = Impairment {
            loss: 0.01,
            ..plain()
        };
        let t0 = Instant::now();
        let count = |seed| {
            let mut s = Shaper::new(cfg.clone(), seed);
            (0..100_000)
                .filter(|_| s.admit(t0, 100) == Fate::Drop(Drop::Loss))
                .count()
        };
        let lost = count(7);
        assert!((800..1200).contains(&lost), "{lost} of 100000 lost at 1%");
        assert_eq!(lost, count(7), "same seed, same losses");
        assert_ne!(lost, count(8), "another seed, other losses");
    }

    #[test]
    fn rate_spaces_packets_and_the_queue_is_bounded() {
        // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms on the wire.
        let cfg = Impairment {
            delay: Duration::ZERO,
            rate_bps: Some(12_000_000),
            queue_bytes: 15_000,
            ..plain()
        };
        let mut s = Shaper::new(cfg, 1);
        let t0 = Instant::now();
        let mut released = Vec::new();
        let mut queue_drops = 0;
        for _ in 0..20 {
            match s.admit(t0, 1500) {
                Fate::Release { at, .. } => released.push(at),
                Fate::Drop(Drop::Queue) => queue_drops += 1,
                Fate::Drop(d) => panic!("{d:?}"),
            }
        }
        assert_eq!(released.len(), 10, "10 packets fit a 15000-byte queue");
        assert_eq!(queue_drops, 10);
        for (i, at) in released.iter().enumerate() {
            let want = Duration::from_millis(i as u64 + 1);
            let got = at.duration_since(t0);
            assert!(
                got.abs_diff(want) < Duration::from_micros(2),
                "{i}: {got:?}"
            );
        }
        // Once the wire has drained, packets go again.
        assert!(matches!(
            s.admit(t0 + Duration::from_millis(20), 1500),
            Fate::Release { .. }
        ));
    }

    #[test]
    fn jitter_stays_in_bounds_and_reorder_skips_the_delay() {
        let cfg = Impairment {
            jitter: Duration::from_millis(5),
            reorder: 0.1,
            duplicate: 0.05,
            ..plain()
        };
        let mut s = Shaper::new(cfg, 3);
        let t0 = Instant::now();
        let (mut reordered, mut dups) = (0, 0);
        for _ in 0..10_000 {
            match s.admit(t0, 100) {
                Fate::Release {
                    at,
                    copies,
                    reordered: r,
                } => {
                    let d = at.duration_since(t0);
                    if r {
                        reordered += 1;
                        assert_eq!(d, Duration::ZERO);
                    } else {
                        assert!(d >= Duration::from_millis(20) && d <= Duration::from_millis(30));
                    }
                    if copies == 2 {
                        dups += 1;
                    }
                }
                Fate::Drop(d) => panic!("{d:?}"),
            }
        }
        assert!((800..1200).contains(&reordered), "{reordered}");
        assert!((350..650).contains(&dups), "{dups}");
    }
}
