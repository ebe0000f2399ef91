//! Receive moderation for a QUIC endpoint's UDP socket: after a read that drained the socket,
//! the next read waits a moment, so packets that arrive spread out are read in batches.
//!
//! A sender paced to a link's rate spreads its packets out evenly (at 400 Mbit/s and
//! 1500-byte packets, one every 30 µs). A receiver that reads as soon as anything arrives
//! then wakes, reads one or two packets, processes them, acknowledges and sleeps again, once
//! per packet or two; the wake-ups and the system calls around them cost more than the
//! packets themselves. A NIC avoids the same cost with interrupt moderation. This does it in
//! the socket: once a read returns fewer datagrams than asked for (the socket is empty), the
//! next read is held back for [`BatchedRecv::hold`]; the datagrams that arrive meanwhile
//! wait in the socket's receive buffer and are read together.
//!
//! The price is latency: a packet may wait up to the hold (plus the timer's granularity,
//! 1 ms in tokio) before it is read, and its acknowledgement that much later. On a link whose
//! round trip is tens of milliseconds that is noise; on a LAN or loopback it is not, which is
//! why [`crate::transport::LinkTuning::default_receive_hold`] turns it off below
//! [`crate::transport::RECEIVE_HOLD_MIN_RTT_MS`]. The first datagram after a quiet spell is
//! read at once (the hold starts only after a read); a flight of several datagrams (the
//! post-quantum ClientHello spans two) may be split by one hold. The hold belongs to the
//! socket, so on a gateway it is shared by every connection. Sending is untouched.
//!
//! "Drained" is a read that returned fewer datagrams than it had room for, which is what
//! `recvmmsg` on a non-blocking socket does when the queue runs dry. Where quinn-udp reads
//! one datagram at a time (not on Linux), no read looks drained and nothing is held.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// A UDP socket whose reads are moderated (see the module documentation).
pub struct BatchedRecv {
    inner: Arc<dyn AsyncUdpSocket>,
    hold: Duration,
    /// Set after a read that drained the socket: no read before it fires.
    held: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl fmt::Debug for BatchedRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchedRecv")
            .field("inner", &self.inner)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl BatchedRecv {
    /// Wraps `inner`, holding reads back for `hold` after each read that drained it. Call
    /// inside a tokio runtime (the hold is a tokio timer).
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, hold: Duration) -> BatchedRecv {
        BatchedRecv {
            inner,
            hold,
            held: Mutex::new(None),
        }
    }

    /// How long a read waits after one that drained the socket.
    pub fn hold(&self) -> Duration {
        self.hold
    }
}

impl AsyncUdpSocket for BatchedRecv {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Only the endpoint's driver task reads, so the lock is never contended.
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sleep) = held.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *held = None;
        }
        let res = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = res
            && n < bufs.len()
            && !self.hold.is_zero()
        {
            // Fewer datagrams than room for: the socket is empty for now.
            *held = Some(Box::pin(tokio::time::sleep(self.hold)));
        }
        res
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::UdpSocket;
    use std::time::Instant;

    use quinn::Runtime;

    use super::*;

    /// Reads once from `socket` into 8 slots; returns how many datagrams came.
    async fn read(socket: &dyn AsyncUdpSocket) -> usize {
        let mut storage = [[0u8; 64]; 8];
        let mut meta = [RecvMeta::default(); 8];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
            .await
            .unwrap()
    }

    fn pair(hold: Duration) -> (BatchedRecv, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(rx).unwrap();
        (BatchedRecv::new(inner, hold), tx)
    }

    /// A lost wake-up fails the test instead of hanging it.
    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_read_after_one_that_emptied_the_socket_waits_and_takes_a_batch() {
        tokio::time::timeout(LIMIT, waits_and_takes_a_batch())
            .await
            .expect("within the time limit");
    }

    async fn waits_and_takes_a_batch() {
        let hold = Duration::from_millis(200);
        let (rx, tx) = pair(hold);

        // A datagram on a quiet socket is read at once: nothing was read before it.
        let start = Instant::now();
        tx.send(b"first").unwrap();
        assert_eq!(read(&rx).await, 1);
        let emptied = Instant::now();
        assert!(
            emptied - start < hold,
            "the first read waited {:?}",
            emptied - start
        );

        // That read emptied the socket, so the next one waits out the hold, and what arrived
        // meanwhile comes in one read.
        for i in 0..5u8 {
            tx.send(&[i]).unwrap();
        }
        assert_eq!(read(&rx).await, 5);
        // The hold started inside the read, a moment before `emptied` was taken.
        assert!(
            emptied.elapsed() >= hold - Duration::from_millis(50),
            "read after {:?}, before the {hold:?} hold",
            emptied.elapsed()
        );
    }

    #[tokio::test]
    async fn without_a_hold_nothing_is_held() {
        let (rx, tx) = pair(Duration::ZERO);
        tx.send(b"first").unwrap();
        assert_eq!(read(&rx).await, 1);
        // The read emptied the socket, yet no timer stands between it and the next.
        assert!(rx.held.lock().unwrap().is_none());
        let (held, tx2) = pair(Duration::from_secs(60));
        tx2.send(b"first").unwrap();
        assert_eq!(read(&held).await, 1);
        assert!(held.held.lock().unwrap().is_some());
    }
}
