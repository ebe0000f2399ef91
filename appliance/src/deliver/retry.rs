//! When a failed delivery is tried again: exponential backoff with full jitter, at least as
//! long as the store's `Retry-After`, and why it is retried (for the log and the metrics).
//!
//! Only failures that a later attempt can fix come here: the store's 5xx, 408, 425 and 429
//! answers, a connection that cannot be made or breaks, a time-out, an answer that does not
//! confirm every instance, and local trouble (a spool read, an audit record). An answer the
//! store will repeat (any other 4xx, a 3xx, a refused instance) is
//! [`Undeliverable`](super::Undeliverable) instead, set aside at once.

use std::time::{Duration, SystemTime};

use crate::setting::SettingError;

/// Default `delivery.retry_base`: the ceiling of the first wait.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(500);
/// Default `delivery.retry_max`: the most any wait may be.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);

/// Waits between delivery attempts of one transfer: before attempt `n + 1` (the first retry
/// is `n = 0`) a uniformly random time in `[0, min(max, base · 2ⁿ)]` ("full jitter"), so
/// gateways that failed together do not come back together; a store's `Retry-After` is a
/// floor, itself bounded by `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// `delivery.retry_base`: the ceiling of the first wait.
    pub base: Duration,
    /// `delivery.retry_max`: the ceiling of every wait, `Retry-After` included.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: DEFAULT_RETRY_BASE,
            max: DEFAULT_RETRY_MAX,
        }
    }
}

impl Backoff {
    /// The waits of `delivery.retry_base` and `delivery.retry_max` (`None`: the default): the
    /// base above 0, the most not below the base.
    pub fn from_settings(
        base: Option<Duration>,
        max: Option<Duration>,
    ) -> Result<Backoff, SettingError> {
        let base = base.unwrap_or(DEFAULT_RETRY_BASE);
        let max = max.unwrap_or(DEFAULT_RETRY_MAX);
        if base.is_zero() {
            return Err(SettingError::Invalid {
                key: "delivery.retry_base",
                message: "must be more than 0s".to_owned(),
            });
        }
        if max < base {
            return Err(SettingError::Invalid {
                key: "delivery.retry_max",
                message: format!(
                    "{} is less than delivery.retry_base ({})",
                    humantime::format_duration(max),
                    humantime::format_duration(base)
                ),
            });
        }
        Ok(Backoff { base, max })
    }

    /// The ceiling of the wait after failed attempt `n` (0-based): `min(max, base · 2ⁿ)`.
    pub fn ceiling(&self, n: u32) -> Duration {
        self.base
            .checked_mul(1u32 << n.min(31))
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }

    /// The wait after failed attempt `n`, with `random` a uniform 64-bit number: full
    /// jitter under [`Backoff::ceiling`], raised to `retry_after` (bounded by `max`) when the
    /// store named one.
    pub fn wait_with(&self, n: u32, retry_after: Option<Duration>, random: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(n).as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(match ceiling.checked_add(1) {
            Some(span) => random % span,
            None => random,
        });
        match retry_after {
            Some(floor) => jittered.max(floor.min(self.max)),
            None => jittered,
        }
    }

    /// [`Backoff::wait_with`] with a fresh random number from the system's generator.
    pub fn wait(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let mut bytes = [0u8; 8];
        // The system generator does not fail on Linux; should it, the full ceiling is a safe
        // (if unjittered) wait.
        let random = match aws_lc_rs::rand::fill(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => u64::MAX,
        };
        self.wait_with(n, retry_after, random)
    }
}

/// Why a delivery is tried again: the `cause` label of `baylink_delivery_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No connection, a refused or failed TLS handshake, a connection that broke.
    Connection,
    /// No connection, handshake or answer in time.
    Timeout,
    /// The store answered 5xx.
    ServerError,
    /// The store answered 429 Too Many Requests (or 408, 425).
    Throttled,
    /// The store answered 200 without confirming every instance of the request.
    Incomplete,
    /// Anything else: local trouble (a spool read, an audit record), a dir store.
    Other,
}

impl Cause {
    /// Every cause, for the series created at start.
    pub const ALL: [Cause; 6] = [
        Cause::Connection,
        Cause::Timeout,
        Cause::ServerError,
        Cause::Throttled,
        Cause::Incomplete,
        Cause::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connection => "connection",
            Cause::Timeout => "timeout",
            Cause::ServerError => "server_error",
            Cause::Throttled => "throttled",
            Cause::Incomplete => "incomplete",
            Cause::Other => "other",
        }
    }
}

/// A delivery failure worth another attempt, and how soon the store said to make it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Transient {
    /// Why.
    pub cause: Cause,
    /// The store's `Retry-After`, if it gave one.
    pub retry_after: Option<Duration>,
    /// What happened.
    pub message: String,
}

impl Transient {
    /// A failure of `cause` described by `message`.
    pub fn new(cause: Cause, message: impl Into<String>) -> Transient {
        Transient {
            cause,
            retry_after: None,
            message: message.into(),
        }
    }
}

/// What a retry makes of an HTTP answer other than 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Another attempt may succeed.
    Retry(Cause),
    /// The store will answer the same again: set the transfer aside.
    Final,
}

/// Judges a non-200 status: 5xx, 408 Request Timeout, 425 Too Early and 429 Too Many
/// Requests are worth a retry; every other 4xx (400, 401, 403, 404, 409, 413, 415, ...), a
/// redirect (not followed) and any other status are answers the store will repeat.
pub fn classify(status: u16) -> Verdict {
    match status {
        500..=599 => Verdict::Retry(Cause::ServerError),
        408 | 425 | 429 => Verdict::Retry(Cause::Throttled),
        _ => Verdict::Final,
    }
}

/// Reads a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP-date (how long
/// from `now`; a past date is no wait). `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits that overflow u64 are still "a very long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_from_base_up_to_max() {
        let b = Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
        };
        let ceilings: Vec<u64> = (0..9).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60), "no overflow");
        let huge = Backoff {
            base: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(40), Duration::MAX, "saturates");
    }

    #[test]
    fn jitter_stays_within_zero_and_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for n in 0..12 {
            let ceiling = b.ceiling(n);
            assert_eq!(b.wait_with(n, None, 0), Duration::ZERO);
            assert_eq!(b.wait_with(n, None, u64::MAX), {
                let span = ceiling.as_nanos() as u64 + 1;
                Duration::from_nanos(u64::MAX % span)
            });
            for _ in 0..200 {
                let w = b.wait(n, None);
                assert!(w <= ceiling, "attempt {n}: {w:?} > {ceiling:?}");
            }
        }
        // Spread, not a constant: 200 draws under 5 s are not all the same.
        let draws: std::collections::HashSet<Duration> =
            (0..200).map(|_| b.wait(10, None)).collect();
        assert!(draws.len() > 100, "{}", draws.len());
        // A ceiling of u64::MAX nanoseconds and more still yields a wait.
        let wide = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(wide.wait_with(0, None, 7), Duration::from_nanos(7));
    }

    #[test]
    fn retry_after_is_a_floor_bounded_by_max() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let two = Some(Duration::from_secs(2));
        for random in [0, 1, u64::MAX] {
            assert!(b.wait_with(0, two, random) >= Duration::from_secs(2));
        }
        assert_eq!(b.wait_with(0, two, 0), Duration::from_secs(2));
        assert_eq!(
            b.wait_with(0, Some(Duration::from_secs(3600)), 0),
            Duration::from_secs(10),
            "bounded by max"
        );
        // A jittered wait above the floor stays as it is.
        assert_eq!(
            b.wait_with(10, Some(Duration::from_secs(1)), 9_000_000_000),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn only_answers_a_retry_can_fix_are_retried() {
        for s in [500, 502, 503, 504, 599] {
            assert_eq!(classify(s), Verdict::Retry(Cause::ServerError), "{s}");
        }
        for s in [408, 425, 429] {
            assert_eq!(classify(s), Verdict::Retry(Cause::Throttled), "{s}");
        }
        for s in [
            400, 401, 403, 404, 405, 409, 410, 411, 413, 414, 415, 422, 451, 301, 302, 307,
        ] {
            assert_eq!(classify(s), Verdict::Final, "{s}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21T07:28:00Z
        let p = |v: &str| parse_retry_after(v, now);
        assert_eq!(p("120"), Some(Duration::from_secs(120)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            p("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // IMF-fixdate, and the two obsolete forms RFC 9110 still asks recipients to read.
        assert_eq!(
            p("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p("Wednesday, 21-Oct-15 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(p("Wed Oct 21 07:28:05 2015"), Some(Duration::from_secs(5)));
        assert_eq!(
            p("Wed, 21 Oct 2015 07:00:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past is no wait"
        );
        for bad in ["", "-1", "1.5", "soon", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }
}
