//! Admission of hospital connections before they are identified.
//!
//! Both doors (HTTPS and C-STORE) accept every TCP connection at once, without a slot: a
//! connection first has `ingest.handshake_timeout` to identify itself (TLS handshake with a
//! client certificate, or an A-ASSOCIATE-RQ naming a configured peer), and only then takes one
//! of the door's slots (`ingest.max_connections`, `ingest.dicom_max_associations`). Until
//! then it counts against its source address: at most `ingest.max_unidentified_per_source`
//! connections from one address may be unidentified at once, and a further one is closed as
//! soon as it is accepted. So idle or slow sockets cost their sender its own budget and a few
//! seconds, never another client's slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts the unidentified connections of each source address of one door.
#[derive(Debug, Clone)]
pub struct SourceLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cap: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection not yet identified; dropping it (identified, or closed) frees its place.
#[derive(Debug)]
pub struct Unidentified {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl SourceLimiter {
    /// A limiter allowing `cap` unidentified connections per source address.
    pub fn new(cap: usize) -> SourceLimiter {
        SourceLimiter {
            inner: Arc::new(Inner {
                cap,
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts a new connection from `ip`, or `None` if that address already has `cap`
    /// unidentified connections (the caller closes the new one).
    pub fn admit(&self, ip: IpAddr) -> Option<Unidentified> {
        let ip = canonical(ip);
        let mut counts = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.inner.cap {
            return None;
        }
        *n += 1;
        Some(Unidentified {
            inner: self.inner.clone(),
            ip,
        })
    }

    /// Unidentified connections from `ip` now.
    pub fn pending(&self, ip: IpAddr) -> usize {
        let counts = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&canonical(ip)).copied().unwrap_or(0)
    }
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        let mut counts = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses count as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_own_cap_and_a_dropped_guard_frees_its_place() {
        let l = SourceLimiter::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none());
        // The mapped form is the same source.
        assert!(l.admit("::ffff:127.0.0.2".parse().unwrap()).is_none());
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.pending(a), 2);
        drop(a1);
        assert_eq!(l.pending(a), 1);
        assert!(l.admit(a).is_some());
        assert_eq!(l.pending(a), 1);
    }
}
