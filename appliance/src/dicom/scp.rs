//! The Storage SCP: DICOM associations over TCP (dicom-ul, tokio), C-ECHO and C-STORE.
//!
//! One task per association. Each instance's P-DATA is written to the association's scratch
//! file as it arrives (gathered in a bounded buffer: memory per association does not grow with
//! the instance; the one file is rewritten in place for each instance), behind a Part-10
//! header the SCP builds from the C-STORE command. When the last fragment is in, the file is
//! checked (dicom-rs reads the meta group and the data set up to the PatientID), the consent
//! checkpoint runs, and the instance is handed to the [`AssociationSink`] or refused with a
//! failure status. Success is answered only once the sink holds the instance durably. However
//! the association ends (A-RELEASE, A-ABORT, a dropped connection, the idle time-out, a
//! protocol error), the sink is told how, and seals the instances answered Success as one
//! transfer before the SCP answers the release or closes the connection.
//!
//! Two doors, one SCP (shared slots, limits and sink). On the plain port
//! (`ingest.dicom_listen`) a peer is identified by its calling AE title and source address
//! (`ingest.dicom_peers`). On the TLS port (`ingest.dicom_tls_listen`) the TLS handshake comes
//! first, with the hospital door's rustls configuration (client certificate required, verified
//! against `tls.ca`); the certificate's subject CN is the hospital, and the calling AE title
//! must be a `dicom_peers` entry of that hospital: the certificate replaces the address check.
//! The handshake and the negotiation share one `ingest.handshake_timeout`, and the connection
//! counts against its source address (never a slot) until the association is identified.
//!
//! The decrypted bytes of a TLS connection reach the association code through a socket pair
//! relayed by a task (`bridge`), so that both doors run the same negotiation: dicom-ul
//! 0.10's own TLS (`establish_tls_async`) performs the handshake and reads the A-ASSOCIATE-RQ
//! in one call, which leaves no point at which the certificate's hospital and a free slot
//! could be checked before it answers (a busy edge must answer rejected-transient, and a
//! certificate of the wrong hospital a real A-ASSOCIATE-RJ), and its non-TLS negotiation
//! accepts only a `TcpStream`.
//!
//! Drain (SIGTERM, [`crate::drain::Drain`]): when it starts, both listeners are closed (new
//! associations are refused by the kernel) while running associations go on, C-STOREs
//! included; when it ends (`drain.timeout`), an association still open is aborted
//! (`edge-shutdown`) after its instances answered Success are sealed, exactly as for any other
//! end.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dicom_ul::association::Association as _;
use dicom_ul::association::server::AccessControl;
use dicom_ul::association::{AsyncServerAssociation, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType, Pdu,
    PresentationContextResultReason, UserIdentity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span, warn};

use super::dimse::{self, Command, status};
use super::part10::{self, Part10Error};
use super::reader::{ReadError, Reader};
use super::settings::DicomPeer;
use super::sink::{AssociationEnd, AssociationSink, Origin, SinkError};
use super::{STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION};
use crate::admission::{SourceLimiter, Unidentified, canonical};
use crate::drain::{Activity, Drain, Flag};
use crate::policy::{Decision, Declaration, SharedPolicy};

/// What the SCP needs to know, typed.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// TCP address of the plain port (`ingest.dicom_listen`), if any.
    pub listen: Option<SocketAddr>,
    /// The TLS port (`ingest.dicom_tls_listen`), if any.
    pub tls: Option<TlsDoor>,
    /// The SCP's AE title; other called AE titles are rejected.
    pub ae_title: String,
    /// Known SCUs (calling AE title + address -> hospital); others are rejected.
    pub peers: Vec<DicomPeer>,
    /// Largest PDU accepted (announced at association; larger PDUs abort it).
    pub max_pdu_bytes: u32,
    /// Associations of identified peers served at once; a further identified peer is
    /// answered A-ASSOCIATE-RJ rejected-transient.
    pub max_associations: usize,
    /// Time allowed from the TCP accept to the end of the A-ASSOCIATE negotiation
    /// (`ingest.handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Most connections from one source address still negotiating
    /// (`ingest.max_unidentified_per_source`); more are closed at once.
    pub max_unidentified_per_source: usize,
    /// An association silent for this long is aborted (what it stored is still sent).
    pub idle_timeout: Duration,
    /// Where instances are written while they arrive (one sub-directory per association).
    pub scratch_dir: PathBuf,
    /// Most instances accepted in one association.
    pub max_instances: usize,
    /// Most bytes (instance files, headers included) accepted in one association.
    pub max_association_bytes: u64,
    /// Declaration fields other than the patient, for the consent checkpoint.
    pub category: String,
    /// Destination system.
    pub destination: String,
    /// The Storage Commitment SCP, if served (Push Model accepted in negotiation).
    pub commitment: Option<Arc<super::commitment::Commitments>>,
}

/// The TLS port: its address and the rustls configuration of its handshake (the hospital
/// door's: a client certificate from `tls.ca` is required).
#[derive(Debug, Clone)]
pub struct TlsDoor {
    /// TCP address to listen on (`ingest.dicom_tls_listen`).
    pub listen: SocketAddr,
    /// The server configuration in force: each handshake takes the current one, and a
    /// SIGHUP reload replaces it ([`crate::tls_reload`]).
    pub config: crate::tls_reload::Swap<rustls::ServerConfig>,
}

/// The SCP could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScpError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The config key naming the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The scratch directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Scratch {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bound Storage SCP, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct StorageScp<S> {
    inner: Arc<Inner<S>>,
    listener: Option<TcpListener>,
    tls: Option<TcpListener>,
}

#[derive(Debug)]
struct Inner<S> {
    cfg: ScpConfig,
    policy: SharedPolicy,
    sink: S,
    slots: Arc<Semaphore>,
    sources: SourceLimiter,
}

impl<S: AssociationSink> StorageScp<S> {
    /// Binds the listener and clears the scratch directory (whatever is there belongs to
    /// associations of an earlier run, which were never released).
    pub async fn bind(
        cfg: ScpConfig,
        policy: SharedPolicy,
        sink: S,
    ) -> Result<StorageScp<S>, ScpError> {
        let scratch = cfg.scratch_dir.clone();
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        tokio::fs::create_dir_all(&scratch)
            .await
            .map_err(|source| ScpError::Scratch {
                path: scratch.clone(),
                source,
            })?;
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ScpError::Bind { key, addr, source })
        };
        let listener = match cfg.listen {
            Some(addr) => Some(bind("ingest.dicom_listen", addr).await?),
            None => None,
        };
        let tls = match &cfg.tls {
            Some(door) => Some(bind("ingest.dicom_tls_listen", door.listen).await?),
            None => None,
        };
        let slots = Arc::new(Semaphore::new(cfg.max_associations));
        let sources = SourceLimiter::new(cfg.max_unidentified_per_source);
        Ok(StorageScp {
            inner: Arc::new(Inner {
                cfg,
                policy,
                sink,
                slots,
                sources,
            }),
            listener,
            tls,
        })
    }

    /// The bound address of the plain port.
    pub fn local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.listener.as_ref().map(TcpListener::local_addr)
    }

    /// The bound address of the TLS port.
    pub fn tls_local_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls.as_ref().map(TcpListener::local_addr)
    }

    /// Accepts associations until the drain starts, then closes the listener and returns.
    /// Each association counts in `active` until it has ended (its instances sealed);
    /// associations still open when the drain ends are aborted.
    pub async fn serve(self, drain: Drain, active: Activity) {
        if let Some(listen) = self.inner.cfg.listen {
            info!(%listen, ae_title = %self.inner.cfg.ae_title, "DICOM C-STORE SCP listening");
        }
        if let Some(door) = &self.inner.cfg.tls {
            info!(listen = %door.listen, ae_title = %self.inner.cfg.ae_title, "DICOM C-STORE SCP listening over TLS");
        }
        // Each connection to the TLS port is handshaken with the configuration in force when
        // it was accepted (a reload replaces it for the connections after).
        let acceptor = || {
            self.inner
                .cfg
                .tls
                .as_ref()
                .map(|door| tokio_rustls::TlsAcceptor::from(door.config.current()))
        };
        loop {
            let (accepted, over_tls) = tokio::select! {
                () = drain.started.wait() => break,
                r = accept(self.listener.as_ref()) => (r, false),
                r = accept(self.tls.as_ref()) => (r, true),
            };
            let door = if over_tls { DOOR_TLS } else { DOOR_PLAIN };
            match accepted {
                Ok((socket, peer)) => {
                    // Every answer is a small PDU the SCU waits for: with Nagle's algorithm
                    // one written behind an unacknowledged segment would wait for the SCU's
                    // delayed ACK (about 40 ms on Linux).
                    let _ = socket.set_nodelay(true);
                    // No slot yet: a connection still negotiating counts only against its
                    // own address.
                    let Some(pending) = self.inner.sources.admit(peer.ip()) else {
                        info!(%peer, door, "connection closed: ingest.max_unidentified_per_source reached for its address");
                        metrics::counter!("baylink_ingest_connections_refused_total", "door" => door, "reason" => "unidentified-per-source").increment(1);
                        drop(socket);
                        continue;
                    };
                    let inner = self.inner.clone();
                    let id = uuid::Uuid::now_v7();
                    let span = info_span!("association", id = %id, peer = %peer, door);
                    let (counted, stop) = (active.enter(), drain.ended.clone());
                    let acceptor = if over_tls { acceptor() } else { None };
                    let deadline = tokio::time::Instant::now() + inner.cfg.handshake_timeout;
                    tokio::spawn(
                        async move {
                            let _counted = counted;
                            match acceptor {
                                Some(tls) => {
                                    inner
                                        .serve_tls(id, socket, pending, stop, tls, deadline)
                                        .await;
                                }
                                None => {
                                    let caller = Caller::Address(canonical(peer.ip()));
                                    inner
                                        .serve_connection(
                                            id, socket, caller, pending, stop, deadline,
                                        )
                                        .await;
                                }
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "DICOM accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Closing the listeners makes the kernel refuse new associations at once.
        drop(self.listener);
        drop(self.tls);
        info!("DICOM C-STORE SCP: listener closed for the drain (both ports)");
    }
}

/// The `door` label of the plain port's metrics and log lines.
const DOOR_PLAIN: &str = "dicom";
/// The `door` label of the TLS port's.
const DOOR_TLS: &str = "dicom-tls";

/// The next connection on `listener`; never, if there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// How a peer is told apart besides its calling AE title: by its source address on the plain
/// port, by its client certificate's hospital (subject CN) on the TLS port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// The plain port: the (canonical) source address.
    Address(IpAddr),
    /// The TLS port: the hospital the verified client certificate names.
    Certificate(String),
}

impl Caller {
    fn door(&self) -> &'static str {
        match self {
            Caller::Address(_) => DOOR_PLAIN,
            Caller::Certificate(_) => DOOR_TLS,
        }
    }
}

/// A connected socket pair: the end the association code reads (as a [`TcpStream`], which
/// is what dicom-ul negotiates on; plain reads, writes, peeks and shutdowns on a Unix stream
/// socket behave alike) and the end the relay writes the decrypted bytes into.
fn bridge() -> std::io::Result<(TcpStream, tokio::net::UnixStream)> {
    let (assoc, relay) = std::os::unix::net::UnixStream::pair()?;
    assoc.set_nonblocking(true)?;
    relay.set_nonblocking(true)?;
    let assoc = std::net::TcpStream::from(std::os::fd::OwnedFd::from(assoc));
    Ok((
        TcpStream::from_std(assoc)?,
        tokio::net::UnixStream::from_std(relay)?,
    ))
}

/// How long the relay of a TLS connection may still run after its association ended, to
/// pass on the last answer (A-RELEASE-RP, A-ABORT, A-ASSOCIATE-RJ) and the TLS close.
const RELAY_LINGER: Duration = Duration::from_secs(2);

/// The relay's buffer per direction.
const RELAY_BUFFER: usize = 64 * 1024;

/// Association access control: the called AE title must be ours, and the calling AE title
/// must be a configured peer from this source address (plain port) or of this certificate's
/// hospital (TLS port). (The slot is taken before, by [`Inner::identify`], so that a full
/// house can be answered rejected-transient.)
struct PeerAccess {
    caller: Caller,
    peers: Vec<DicomPeer>,
}

impl PeerAccess {
    fn peer<'p>(peers: &'p [DicomPeer], calling: &str, caller: &Caller) -> Option<&'p DicomPeer> {
        let calling = calling.trim();
        peers.iter().find(|p| {
            p.ae_title.trim() == calling
                && match caller {
                    Caller::Address(ip) => p.address == canonical(*ip),
                    Caller::Certificate(hospital) => &p.hospital == hospital,
                }
        })
    }
}

/// Bytes of an A-ASSOCIATE-RQ up to the end of its calling AE title: PDU type, reserved,
/// length (4), protocol version (2), reserved (2), called AE title (16), calling AE title (16).
const RQ_PREFIX: usize = 42;

/// The A-ASSOCIATE-RJ of a busy edge: rejected-transient (2), by the service provider's
/// presentation function (3), local limit exceeded (2) (PS3.8 9.3.4).
fn busy_rejection() -> Pdu {
    Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    })
}

/// The called and calling AE titles of an A-ASSOCIATE-RQ's first [`RQ_PREFIX`] bytes, or
/// `None` if they are not the start of one.
fn rq_titles(prefix: &[u8]) -> Option<(String, String)> {
    if prefix.len() < RQ_PREFIX || prefix[0] != 0x01 {
        return None;
    }
    let title = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_owned()
    };
    Some((title(&prefix[10..26]), title(&prefix[26..42])))
}

impl AccessControl for PeerAccess {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let caller = &self.caller;
        if called_ae_title.trim() != this_ae_title.trim() {
            match caller {
                Caller::Address(ip) => {
                    warn!(calling_ae = calling_ae_title, called_ae = called_ae_title, %ip, "association rejected: called AE title is not ours")
                }
                Caller::Certificate(hospital) => {
                    warn!(calling_ae = calling_ae_title, called_ae = called_ae_title, certificate_cn = %hospital, "association rejected: called AE title is not ours")
                }
            }
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if Self::peer(&self.peers, calling_ae_title, caller).is_none() {
            match caller {
                Caller::Address(ip) => {
                    warn!(calling_ae = calling_ae_title, %ip, "association rejected: unknown calling AE title / address (not in ingest.dicom_peers)")
                }
                Caller::Certificate(hospital) => {
                    warn!(calling_ae = calling_ae_title, certificate_cn = %hospital, "association rejected: the calling AE title is not an ingest.dicom_peers entry of the certificate's hospital")
                }
            }
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// How the association loop ended.
#[derive(Debug)]
enum End {
    /// A-RELEASE between instances.
    Released,
    /// Anything else.
    Stopped(Stop),
}

/// Why the association stops without a release: how (for the transfer's status) and the
/// detail (for the log).
#[derive(Debug)]
struct Stop {
    end: AssociationEnd,
    why: String,
}

/// A protocol error the edge aborts the association for.
impl From<String> for Stop {
    fn from(why: String) -> Stop {
        Stop {
            end: AssociationEnd::AbortedByEdge,
            why,
        }
    }
}

impl From<&str> for Stop {
    fn from(why: &str) -> Stop {
        Stop::from(why.to_owned())
    }
}

/// How a failed receive or send ended the association: silence past the idle time-out, the
/// connection gone, or (anything else) a PDU the edge could not accept.
fn stop(what: &str, e: &dicom_ul::association::Error) -> Stop {
    use dicom_ul::association::Error as E;
    let end = match e {
        E::Timeout { .. } => AssociationEnd::IdleTimeout,
        E::ConnectionClosed { .. } | E::WireSend { .. } => AssociationEnd::ConnectionLost,
        E::ReceivePdu {
            source: dicom_ul::pdu::ReadError::ReadPdu { .. },
            ..
        } => AssociationEnd::ConnectionLost,
        _ => AssociationEnd::AbortedByEdge,
    };
    Stop {
        end,
        why: format!("{what}: {e}"),
    }
}

/// An instance being received; `I` is the sink's [`AssociationSink::Instance`].
struct Incoming<I> {
    cmd: Command,
    context_id: u8,
    name: String,
    path: PathBuf,
    /// Where its bytes go; `None` once it failed (the rest of its bytes are only counted).
    dest: Option<Dest<I>>,
    /// Bytes of the instance written so far (the scratch file may be longer: it is
    /// rewritten in place for each instance).
    len: u64,
    failure: Option<(u16, String)>,
    /// The instance (the header written for it, then its data set) walked as it arrives, to
    /// its end.
    walker: Reader,
}

/// Where an arriving instance's bytes go.
enum Dest<I> {
    /// The association's scratch file: the first instance, whose PatientID and declaration
    /// open the transfer once it is whole and checked.
    Scratch(tokio::io::BufWriter<tokio::fs::File>),
    /// Straight into the association's open transfer (every later instance, unless the sink
    /// takes the transfer's instances only whole): hashed and written as it arrives, and part
    /// of the transfer only once kept.
    Transfer(I),
    /// The sink failed or refused it while it arrived: what it took is discarded, the rest is
    /// only walked, and the failure is answered once the SCP's own checks pass, as when the
    /// instance was handed over whole after them (a data set of another patient is still
    /// refused as such, and recorded).
    Failed((u16, String)),
}

impl<I> Incoming<I> {
    /// Gives the instance up: its scratch file is removed, or what the sink took of it is
    /// discarded (by dropping it).
    async fn discard(self) {
        if let Some(Dest::Scratch(_)) = self.dest {
            let _ = tokio::fs::remove_file(&self.path).await;
        }
    }
}

/// Why an instance is not stored: the status and error comment its SCU is answered, and
/// what the log says instead when the comment names the patient (a policy refusal).
struct Failure {
    code: u16,
    comment: String,
    logged: Option<String>,
}

impl From<(u16, String)> for Failure {
    fn from((code, comment): (u16, String)) -> Failure {
        Failure {
            code,
            comment,
            logged: None,
        }
    }
}

/// State of one association.
struct Association<'a, S: AssociationSink> {
    inner: &'a Inner<S>,
    id: uuid::Uuid,
    hospital: String,
    /// The purpose the calling peer declares (`ingest.dicom_peers.purpose`).
    purpose: String,
    scratch: PathBuf,
    /// Set when the drain ends: the association is aborted between PDUs.
    stop: Flag,
    patient: Option<String>,
    transfer: Option<S::Transfer>,
    names: HashSet<String>,
    bytes: u64,
    accepted: usize,
    refused: usize,
    /// Storage Commitment on this association, if served.
    commitment: Option<super::commitment::OnAssociation>,
}

impl<S: AssociationSink> Inner<S> {
    fn options(
        &self,
        caller: Caller,
    ) -> ServerAssociationOptions<'static, PeerAccess, super::commitment::Roles> {
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(PeerAccess {
                caller,
                peers: self.cfg.peers.clone(),
            })
            .ae_title(self.cfg.ae_title.clone())
            .max_pdu_length(self.cfg.max_pdu_bytes)
            .strict(true)
            .read_timeout(self.cfg.idle_timeout)
            .write_timeout(self.cfg.idle_timeout)
            .with_abstract_syntax(VERIFICATION)
            .with_negotiation(super::commitment::Roles);
        if self.cfg.commitment.is_some() {
            options = options.with_abstract_syntax(super::commitment::STORAGE_COMMITMENT_PUSH);
        }
        for (uid, _) in STORAGE_SOP_CLASSES {
            options = options.with_abstract_syntax(*uid);
        }
        for (uid, _) in TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(*uid);
        }
        options
    }

    /// Reads (without consuming) the start of the A-ASSOCIATE-RQ and, if it names a
    /// configured peer calling our AE title, takes a slot for it. `Err(())`: the connection
    /// ended or sent less than the prefix; `Ok(None)`: not an identified peer (the
    /// negotiation rejects it, naming why).
    async fn identify(
        &self,
        socket: &TcpStream,
        caller: &Caller,
    ) -> Result<Option<Result<tokio::sync::OwnedSemaphorePermit, ()>>, ()> {
        let mut prefix = [0u8; RQ_PREFIX];
        loop {
            let n = socket.peek(&mut prefix).await.map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            if n >= RQ_PREFIX || prefix[0] != 0x01 {
                break;
            }
            // A request trickling in: look again shortly (the caller's time-box bounds this).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Some((called, calling)) = rq_titles(&prefix) else {
            return Ok(None);
        };
        if called != self.cfg.ae_title.trim()
            || PeerAccess::peer(&self.cfg.peers, &calling, caller).is_none()
        {
            return Ok(None);
        }
        Ok(Some(self.slots.clone().try_acquire_owned().map_err(|_| ())))
    }

    /// Answers a busy edge: reads the A-ASSOCIATE-RQ to its end (so that the peer reads the
    /// answer rather than a reset) and sends A-ASSOCIATE-RJ rejected-transient.
    async fn reject_busy(&self, mut socket: TcpStream) -> std::io::Result<()> {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        // An A-ASSOCIATE-RQ is a few KiB; anything longer is not read, only closed.
        if len <= 1024 * 1024 {
            let mut rest = (&mut socket).take(u64::from(len));
            tokio::io::copy(&mut rest, &mut tokio::io::sink()).await?;
        }
        let mut out = Vec::with_capacity(16);
        dicom_ul::pdu::write_pdu(&mut out, &busy_rejection())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        socket.write_all(&out).await?;
        socket.shutdown().await
    }

    /// The negotiation, up to an established association holding a slot: the peer is
    /// identified from its A-ASSOCIATE-RQ, takes a slot (none free: rejected-transient), and
    /// the association is negotiated. `None`: it was not established (already answered).
    async fn negotiate(
        &self,
        socket: TcpStream,
        caller: &Caller,
    ) -> Option<(
        AsyncServerAssociation<TcpStream>,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let door = caller.door();
        let permit = match self.identify(&socket, caller).await {
            Err(()) => {
                info!("connection closed before an A-ASSOCIATE-RQ");
                return None;
            }
            Ok(Some(Ok(permit))) => Some(permit),
            Ok(Some(Err(()))) => {
                match caller {
                    Caller::Address(ip) => {
                        warn!(%ip, "association rejected (transient): ingest.dicom_max_associations reached")
                    }
                    Caller::Certificate(hospital) => {
                        warn!(certificate_cn = %hospital, "association rejected (transient): ingest.dicom_max_associations reached")
                    }
                }
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => door, "reason" => "busy").increment(1);
                if let Err(e) = self.reject_busy(socket).await {
                    info!(error = %e, "could not answer the busy rejection");
                }
                return None;
            }
            Ok(None) => None,
        };
        let options = self.options(caller.clone());
        let assoc = match options.establish_async(socket).await {
            Ok(a) => a,
            Err(e) => {
                info!(error = %e, "association not established");
                return None;
            }
        };
        match permit {
            Some(p) => Some((assoc, p)),
            None => {
                // Access control accepted what `identify` did not (never expected): no slot.
                warn!("association accepted without a slot; aborting");
                let assoc = assoc;
                let _ = assoc.abort().await;
                None
            }
        }
    }

    /// A connection to the TLS port: the TLS handshake (by `deadline`, the connection
    /// still counted against its source address), the hospital from the client certificate,
    /// then the association over the decrypted stream, exactly as on the plain port.
    async fn serve_tls(
        &self,
        id: uuid::Uuid,
        socket: TcpStream,
        pending: Unidentified,
        stop: Flag,
        tls: tokio_rustls::TlsAcceptor,
        deadline: tokio::time::Instant,
    ) {
        // Pinned here, not a temporary of the `timeout_at`: the socket it owns is closed when
        // this function returns, after a time-out is counted, so a client that sees the close
        // finds the count.
        let accept = tls.accept(socket);
        tokio::pin!(accept);
        let stream = match tokio::time::timeout_at(deadline, accept.as_mut()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(error = %e, "DICOM TLS handshake refused");
                return;
            }
            Err(_) => {
                info!(
                    "DICOM TLS handshake timed out (ingest.handshake_timeout); connection closed"
                );
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => DOOR_TLS, "reason" => "handshake-timeout").increment(1);
                return;
            }
        };
        let Some(hospital) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(baylink_net::transport::common_name)
        else {
            info!("client certificate has no usable common name; connection closed");
            return;
        };
        let (assoc_end, relay_end) = match bridge() {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "cannot create the socket pair for a TLS association; connection closed");
                return;
            }
        };
        let relay = tokio::spawn(async move {
            let (mut tls, mut plain) = (stream, relay_end);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut tls,
                &mut plain,
                RELAY_BUFFER,
                RELAY_BUFFER,
            )
            .await;
        });
        let caller = Caller::Certificate(hospital);
        self.serve_connection(id, assoc_end, caller, pending, stop, deadline)
            .await;
        // The association's end of the pair is closed: the relay passes on what is left and
        // closes the TLS session, unless the client keeps it open.
        let abort = relay.abort_handle();
        if tokio::time::timeout(RELAY_LINGER, relay).await.is_err() {
            abort.abort();
        }
    }

    async fn serve_connection(
        &self,
        id: uuid::Uuid,
        socket: TcpStream,
        caller: Caller,
        pending: Unidentified,
        stop: Flag,
        deadline: tokio::time::Instant,
    ) {
        let door = caller.door();
        // Pinned here, so the socket it holds is closed when this function returns, after
        // a time-out is counted: a client that sees the close finds the count.
        let negotiate = self.negotiate(socket, &caller);
        tokio::pin!(negotiate);
        let negotiated = match tokio::time::timeout_at(deadline, negotiate.as_mut()).await {
            Ok(n) => n,
            Err(_) => {
                info!(
                    "association negotiation timed out (ingest.handshake_timeout); connection closed"
                );
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => door, "reason" => "handshake-timeout").increment(1);
                return;
            }
        };
        // Identified or gone: it no longer counts against its address.
        drop(pending);
        let Some((mut assoc, permit)) = negotiated else {
            return;
        };
        let calling = assoc.peer_ae_title().trim().to_owned();
        let Some(peer) = PeerAccess::peer(&self.cfg.peers, &calling, &caller).cloned() else {
            // Access control already refused this; never reached.
            let _ = assoc.abort().await;
            return;
        };
        let (hospital, purpose) = (peer.hospital.clone(), peer.purpose.clone());
        info!(calling_ae = %calling, %hospital, door, "association accepted");
        let scratch = self.cfg.scratch_dir.join(id.to_string());
        if let Err(e) = tokio::fs::create_dir_all(&scratch).await {
            warn!(path = %scratch.display(), error = %e, "cannot create the scratch directory; aborting");
            let _ = assoc.abort().await;
            return;
        }
        let mut state = Association {
            inner: self,
            id,
            hospital,
            purpose,
            scratch: scratch.clone(),
            stop,
            patient: None,
            transfer: None,
            names: HashSet::new(),
            bytes: 0,
            accepted: 0,
            refused: 0,
            commitment: self.cfg.commitment.clone().map(|c| {
                let scp_role = assoc
                    .requestor_roles_for(super::commitment::STORAGE_COMMITMENT_PUSH)
                    .scp;
                super::commitment::OnAssociation::new(
                    c,
                    peer,
                    door,
                    assoc.presentation_contexts(),
                    scp_role,
                )
            }),
        };
        let (end, why) = match state.run(&mut assoc).await {
            End::Released => (AssociationEnd::Released, None),
            End::Stopped(s) => (s.end, Some(s.why)),
        };
        let (accepted, refused) = (state.accepted, state.refused);
        // Hand on first, however the association ended (the sink seals what was answered
        // Success, or drops a transfer holding none), then free the scratch space and the
        // slot, and only then answer the peer: once it sees the association end, all of it is
        // settled.
        let handed_on = match state.transfer.take() {
            Some(t) => self.sink.finish(t, end).await.map_err(|e| e.to_string()),
            None => Ok(()),
        };
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        drop(permit);
        metrics::counter!("baylink_dicom_associations_total", "end" => end.as_str()).increment(1);
        let sent = if accepted == 0 {
            "nothing was answered Success, nothing is sent"
        } else {
            "the instances answered Success are sealed and sent"
        };
        match (why, handed_on) {
            (None, Ok(())) => {
                let _ = assoc.send(&Pdu::ReleaseRP).await;
                info!(accepted, refused, association_end = %end, "association released; {sent}");
            }
            (why, Err(e)) => {
                warn!(reason = why.as_deref().unwrap_or("released"), error = %e, accepted, refused, association_end = %end, "association ended but its instances could not be sealed; they stay in the spool");
                let _ = assoc.abort().await;
            }
            (Some(why), Ok(())) => {
                warn!(reason = %why, accepted, refused, association_end = %end, "association aborted; {sent}");
                let _ = assoc.abort().await;
            }
        }
    }
}

impl<S: AssociationSink> Association<'_, S> {
    async fn run(&mut self, assoc: &mut AsyncServerAssociation<TcpStream>) -> End {
        let contexts: Vec<_> = assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .collect();
        let mut command: Vec<u8> = Vec::new();
        let mut incoming: Option<Incoming<S::Instance>> = None;
        let drain_ended = self.stop.clone();
        loop {
            let received = tokio::select! {
                biased;
                () = drain_ended.wait() => {
                    // The drain ended: an instance still arriving is dropped (never answered);
                    // those answered Success are sealed by the caller, as for any end.
                    if let Some(i) = incoming.take() {
                        i.discard().await;
                    }
                    return End::Stopped(Stop {
                        end: AssociationEnd::EdgeShutdown,
                        why: "the edge is shutting down (drain.timeout reached)".into(),
                    });
                }
                job = super::commitment::OnAssociation::next_job(self.commitment.as_mut()) => {
                    // A report for a request of this association (the modality took the SCP
                    // role): sent between PDUs; its answer arrives as a command.
                    let max = assoc.peer_max_pdu_length();
                    let pdus = match self.commitment.as_mut() {
                        Some(c) => c.pdus(job, max),
                        None => Vec::new(),
                    };
                    for pdu in pdus {
                        if let Err(e) = assoc.send(&pdu).await {
                            return End::Stopped(stop("cannot send a storage commitment report", &e));
                        }
                    }
                    continue;
                }
                r = assoc.receive() => r,
            };
            let pdu = match received {
                Ok(p) => p,
                Err(e) => {
                    if let Some(i) = incoming.take() {
                        i.discard().await;
                    }
                    return End::Stopped(stop("receive", &e));
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for pv in data {
                        let result = match pv.value_type {
                            PDataValueType::Command => {
                                self.on_command(assoc, &contexts, &mut command, &mut incoming, pv)
                                    .await
                            }
                            PDataValueType::Data => match self.commitment.as_mut() {
                                Some(c) if c.collecting() => match c.data(pv).await {
                                    Ok(Some(a)) => {
                                        send_response(
                                            assoc,
                                            a.context_id,
                                            &a.cmd,
                                            a.status,
                                            a.comment.as_deref(),
                                        )
                                        .await
                                    }
                                    Ok(None) => Ok(()),
                                    Err(e) => Err(e.into()),
                                },
                                _ => self.on_data(assoc, &mut incoming, pv).await,
                            },
                        };
                        if let Err(s) = result {
                            if let Some(i) = incoming.take() {
                                i.discard().await;
                            }
                            return End::Stopped(s);
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if let Some(i) = incoming.take() {
                        i.discard().await;
                        return End::Stopped("A-RELEASE in the middle of an instance".into());
                    }
                    return End::Released;
                }
                Pdu::AbortRQ { source } => {
                    if let Some(i) = incoming.take() {
                        i.discard().await;
                    }
                    return End::Stopped(Stop {
                        end: AssociationEnd::AbortedByPeer,
                        why: format!("A-ABORT by the peer ({source:?})"),
                    });
                }
                other => {
                    return End::Stopped(format!("unexpected PDU {}", pdu_name(&other)).into());
                }
            }
        }
    }

    async fn on_command(
        &mut self,
        assoc: &mut AsyncServerAssociation<TcpStream>,
        contexts: &[dicom_ul::pdu::PresentationContextNegotiated],
        buf: &mut Vec<u8>,
        incoming: &mut Option<Incoming<S::Instance>>,
        pv: PDataValue,
    ) -> Result<(), Stop> {
        if incoming.is_some() || self.commitment.as_ref().is_some_and(|c| c.collecting()) {
            return Err("a command arrived before the previous data set was complete".into());
        }
        if buf.len() + pv.data.len() > dimse::MAX_COMMAND_BYTES {
            return Err(format!("command set over {} bytes", dimse::MAX_COMMAND_BYTES).into());
        }
        buf.extend_from_slice(&pv.data);
        if !pv.is_last {
            return Ok(());
        }
        let bytes = std::mem::take(buf);
        if let Some(c) = self.commitment.as_mut()
            && c.response(&bytes)
        {
            return Ok(());
        }
        let cmd = dimse::parse_command(&bytes).map_err(|e| e.to_string())?;
        let Some(pc) = contexts
            .iter()
            .find(|pc| pc.id == pv.presentation_context_id)
        else {
            return Err(format!(
                "presentation context {} was not accepted",
                pv.presentation_context_id
            )
            .into());
        };
        match cmd.field {
            dimse::C_ECHO_RQ => send_response(assoc, pc.id, &cmd, status::SUCCESS, None).await,
            dimse::C_STORE_RQ => {
                let failure = self.admit(&cmd, pc);
                if !cmd.has_data_set {
                    let (code, why) = failure.unwrap_or((
                        status::CANNOT_UNDERSTAND,
                        "C-STORE without a data set".into(),
                    ));
                    self.refused += 1;
                    return send_response(assoc, pc.id, &cmd, code, Some(&why)).await;
                }
                // One scratch file per association, rewritten in place for each instance:
                // a file created and removed per instance costs ext4 an inode allocation
                // that scans past every recently removed one (measured: a sixth of the
                // edge's CPU during a 1000-slice C-STORE).
                let path = self.scratch.join(SCRATCH_FILE);
                let mut i = Incoming {
                    name: format!("{}.dcm", cmd.affected_sop_instance_uid),
                    cmd,
                    context_id: pc.id,
                    path,
                    dest: None,
                    len: 0,
                    failure,
                    walker: Reader::new(None),
                };
                if i.failure.is_none() {
                    match self
                        .open_instance(&i.name, &i.cmd, &i.path, &pc.transfer_syntax)
                        .await
                    {
                        Ok((dest, header)) => {
                            if let Dest::Failed((_, why)) = &dest {
                                warn!(sop_instance = %i.cmd.affected_sop_instance_uid, error = %why,
                                      "the store failed the instance as it began; answered once it is whole");
                            }
                            i.dest = Some(dest);
                            i.len = header.len() as u64;
                            if let Err(e) = i.walker.feed(&header) {
                                i.failure = Some(not_well_formed(&e));
                            }
                        }
                        Err(e) => i.failure = Some(e),
                    }
                    if i.failure.is_some() {
                        // Nothing of an instance refused at its header is kept: what the
                        // sink took is discarded (dropped), the scratch file when it is answered.
                        i.dest = None;
                    }
                }
                *incoming = Some(i);
                Ok(())
            }
            dimse::N_ACTION_RQ if self.commitment.is_some() => {
                let c = self.commitment.as_mut().expect("checked by the guard");
                match c.begin(cmd, pc.id) {
                    Some(a) => {
                        send_response(assoc, a.context_id, &a.cmd, a.status, a.comment.as_deref())
                            .await
                    }
                    None => Ok(()),
                }
            }
            other => Err(format!("unsupported DIMSE command 0x{other:04X}").into()),
        }
    }

    /// Checks a C-STORE request before its data set arrives; `Some` is the failure status.
    fn admit(
        &mut self,
        cmd: &Command,
        pc: &dicom_ul::pdu::PresentationContextNegotiated,
    ) -> Option<(u16, String)> {
        if cmd.affected_sop_class_uid != pc.abstract_syntax {
            return Some((
                status::DATA_SET_MISMATCH,
                "SOP class differs from the presentation context".into(),
            ));
        }
        if let Err(e) = part10::validate_uid(&cmd.affected_sop_instance_uid) {
            return Some((status::CANNOT_UNDERSTAND, format!("SOP Instance UID: {e}")));
        }
        let name = format!("{}.dcm", cmd.affected_sop_instance_uid);
        if let Err(e) = baylink_net::proto::validate_file_name(&name) {
            return Some((status::CANNOT_UNDERSTAND, format!("file name: {e}")));
        }
        if self.names.contains(&name) {
            return Some((
                status::DUPLICATE_SOP_INSTANCE,
                "SOP instance already sent in this association".into(),
            ));
        }
        if self.accepted >= self.inner.cfg.max_instances {
            return Some((
                status::OUT_OF_RESOURCES,
                "too many instances in one association".into(),
            ));
        }
        None
    }

    /// Starts instance `name` of command `cmd`: its Part-10 header (returned) goes into the
    /// open transfer, or, for the association's first instance, into the `scratch` file.
    async fn open_instance(
        &mut self,
        name: &str,
        cmd: &Command,
        scratch: &Path,
        transfer_syntax: &str,
    ) -> Result<(Dest<S::Instance>, Vec<u8>), (u16, String)> {
        let oor = |e: String| (status::OUT_OF_RESOURCES, e);
        let header = part10::file_header(
            &cmd.affected_sop_class_uid,
            &cmd.affected_sop_instance_uid,
            transfer_syntax,
            "",
        )
        .map_err(|e| oor(e.to_string()))?;
        self.bytes += header.len() as u64;
        if let Some(t) = self.transfer.as_mut() {
            let sink = &self.inner.sink;
            match sink.open_instance(t, name).await {
                Ok(Some(mut instance)) => {
                    let dest = match sink
                        .write_instance(&mut instance, bytes::Bytes::from(header.clone()))
                        .await
                    {
                        Ok(()) => Dest::Transfer(instance),
                        Err(e) => Dest::Failed(sink_failure(e)),
                    };
                    return Ok((dest, header));
                }
                // Taken whole: through the scratch file, as the first instance.
                Ok(None) => {}
                Err(e) => return Ok((Dest::Failed(sink_failure(e)), header)),
            }
        }
        // The data arrive in PDUs of at most `ingest.dicom_max_pdu_bytes`: each write of
        // `tokio::fs` is a trip to a blocking thread, so they are gathered first.
        // Not truncated: the instance is written over the previous one from the start, and
        // `Incoming::len` (from the header on) says where it ends.
        let mut f = tokio::io::BufWriter::with_capacity(
            SCRATCH_BUFFER,
            tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(scratch)
                .await
                .map_err(|e| oor(format!("scratch file: {e}")))?,
        );
        f.write_all(&header)
            .await
            .map_err(|e| oor(format!("scratch file: {e}")))?;
        Ok((Dest::Scratch(f), header))
    }

    async fn on_data(
        &mut self,
        assoc: &mut AsyncServerAssociation<TcpStream>,
        incoming: &mut Option<Incoming<S::Instance>>,
        pv: PDataValue,
    ) -> Result<(), Stop> {
        let Some(i) = incoming.as_mut() else {
            return Err("data without a C-STORE command".into());
        };
        if pv.presentation_context_id != i.context_id {
            return Err("data on another presentation context than its command".into());
        }
        // Counted even for an instance already refused, whose bytes are only read and dropped.
        self.bytes += pv.data.len() as u64;
        if i.failure.is_none() {
            if self.bytes > self.inner.cfg.max_association_bytes {
                i.failure = Some((
                    status::OUT_OF_RESOURCES,
                    "association over ingest.max_upload_bytes".into(),
                ));
            } else if let Err(e) = i.walker.feed(&pv.data) {
                i.failure = Some(not_well_formed(&e));
            } else {
                let n = pv.data.len() as u64;
                let written = match i.dest.as_mut() {
                    Some(Dest::Scratch(f)) => f
                        .write_all(&pv.data)
                        .await
                        .map_err(|e| (status::OUT_OF_RESOURCES, format!("scratch file: {e}"))),
                    Some(Dest::Transfer(instance)) => {
                        if let Err(e) = self
                            .inner
                            .sink
                            .write_instance(instance, bytes::Bytes::from(pv.data))
                            .await
                        {
                            warn!(sop_instance = %i.cmd.affected_sop_instance_uid, error = %e,
                                  "the store failed the instance while it arrived; answered once it is whole");
                            // Dropping the instance discards what the sink took.
                            i.dest = Some(Dest::Failed(sink_failure(e)));
                        }
                        Ok(())
                    }
                    Some(Dest::Failed(_)) | None => Ok(()),
                };
                match written {
                    Ok(()) => i.len += n,
                    Err(f) => i.failure = Some(f),
                }
            }
            // A failed instance's bytes go no further: the scratch file is removed, what the
            // sink took is discarded (dropped).
            if i.failure.is_some()
                && let Some(Dest::Scratch(_)) = i.dest.take()
            {
                let _ = tokio::fs::remove_file(&i.path).await;
            }
        }
        if !pv.is_last {
            return Ok(());
        }
        let Some(mut i) = incoming.take() else {
            return Err("instance state lost".into());
        };
        let outcome = match i.failure.take() {
            Some(f) => Err(Failure::from(f)),
            None => self.complete(&mut i).await,
        };
        match outcome {
            Ok(()) => {
                self.accepted += 1;
                metrics::counter!("baylink_dicom_instances_total", "outcome" => "accepted")
                    .increment(1);
                info!(sop_instance = %i.cmd.affected_sop_instance_uid, "instance accepted");
                send_response(assoc, i.context_id, &i.cmd, status::SUCCESS, None).await
            }
            Err(f) => {
                self.refused += 1;
                metrics::counter!("baylink_dicom_instances_total", "outcome" => "refused")
                    .increment(1);
                let logged = f.logged.as_deref().unwrap_or(&f.comment);
                warn!(sop_instance = %i.cmd.affected_sop_instance_uid, status = format!("0x{:04X}", f.code), reason = %logged, "instance refused");
                let _ = tokio::fs::remove_file(&i.path).await;
                send_response(assoc, i.context_id, &i.cmd, f.code, Some(&f.comment)).await
            }
        }
    }

    /// Checks a complete instance and hands it to the sink.
    async fn complete(&mut self, i: &mut Incoming<S::Instance>) -> Result<(), Failure> {
        let oor = |e: String| (status::OUT_OF_RESOURCES, e);
        let mut dest = i.dest.take();
        if let Some(Dest::Scratch(f)) = dest.as_mut() {
            f.flush()
                .await
                .map_err(|e| oor(format!("scratch file: {e}")))?;
        }
        // Walked to its end as it arrived: it must end where its last element does.
        i.walker
            .finish()
            .map_err(|e| Failure::from(not_well_formed(&e)))?;
        let info = part10::instance_info(i.walker.facts()).map_err(|e| match e {
            Part10Error::Mismatch { .. } => (status::DATA_SET_MISMATCH, e.to_string()).into(),
            // The comment quotes the PatientID back to its sender; the log does not.
            Part10Error::BadPatientId(_) => Failure {
                code: status::CANNOT_UNDERSTAND,
                comment: e.to_string(),
                logged: Some("the PatientID is not usable".into()),
            },
            _ => (status::CANNOT_UNDERSTAND, e.to_string()).into(),
        })?;
        // What the record store files an instance under (a Type 1 attribute of every
        // storage IOD): without it the data set does not match its SOP class.
        crate::ingest::stow::missing_uids(i.walker.facts())
            .map_err(|m| Failure::from((status::DATA_SET_MISMATCH, m)))?;
        if let Some(p) = &self.patient
            && p != &info.patient_id
        {
            let refusal = crate::policy::Refusal::new(
                crate::dicom::deid::RULE_PATIENT_MISMATCH,
                "the instance's PatientID differs from the association's transfer",
            );
            if let Some(t) = &self.transfer {
                // audit: the refusal is durable before it is answered.
                self.inner
                    .sink
                    .refuse_instance(t, &i.name, &info.patient_id, &refusal)
                    .await
                    .map_err(|e| oor(e.to_string()))?;
            }
            return Err(Failure::from((
                status::NOT_AUTHORIZED,
                format!("{} (rule {})", refusal.reason, refusal.rule),
            )));
        }
        let cfg = &self.inner.cfg;
        let declaration = Declaration {
            patient_id: info.patient_id.clone(),
            category: cfg.category.clone(),
            purpose: self.purpose.clone(),
            destination: cfg.destination.clone(),
            consent_ref: None,
        };
        if let Decision::Refuse(r) = self
            .inner
            .policy
            .current()
            .check(&declaration, SystemTime::now())
        {
            // audit: the refusal is durable before it is answered, as on the HTTPS door.
            self.inner
                .sink
                .refuse_declaration(&self.hospital, &declaration, &i.name, &r)
                .await
                .map_err(|e| oor(e.to_string()))?;
            // The SCU is answered as the hospital's API would be; the log names the rule.
            return Err(Failure {
                code: status::NOT_AUTHORIZED,
                comment: r.answer().to_owned(),
                logged: Some(format!("{} (rule {})", r.reason, r.rule)),
            });
        }
        if self.transfer.is_none() {
            let origin = Origin {
                association: self.id,
                hospital: self.hospital.clone(),
                declaration,
            };
            let t = self
                .inner
                .sink
                .begin(origin)
                .await
                .map_err(|e| oor(e.to_string()))?;
            self.transfer = Some(t);
            self.patient = Some(info.patient_id.clone());
        }
        let t = self.transfer.as_mut().expect("set just above");
        let sink = &self.inner.sink;
        match dest {
            Some(Dest::Transfer(instance)) => sink.keep_instance(t, instance).await,
            Some(Dest::Scratch(_)) => sink.add_instance(t, &i.name, &i.path, i.len).await,
            Some(Dest::Failed(f)) => {
                // A size limit the instance breaks is answered (and recorded) first.
                sink.check_room(t, &i.name, i.len)
                    .await
                    .map_err(sink_failure)?;
                return Err(f.into());
            }
            None => return Err(oor("the instance was not written".into()).into()),
        }
        .map_err(sink_failure)?;
        self.names.insert(i.name.clone());
        Ok(())
    }
}

/// The failure status of an instance the sink would not take.
fn sink_failure(e: SinkError) -> (u16, String) {
    match e {
        // A rule refused it (and it is audited): not a resource problem.
        SinkError::Refused(_) => (status::NOT_AUTHORIZED, e.to_string()),
        _ => (status::OUT_OF_RESOURCES, e.to_string()),
    }
}

/// The scratch file of an association (in its own directory under [`scratch_dir`]).
const SCRATCH_FILE: &str = "instance";

/// Bytes of an arriving instance gathered before they are written to its scratch file.
const SCRATCH_BUFFER: usize = 1 << 20;

/// The failure status of an instance whose bytes the reader refuses (cut in the middle of an
/// element, or malformed).
fn not_well_formed(e: &ReadError) -> (u16, String) {
    (
        status::CANNOT_UNDERSTAND,
        format!("the data set is not well formed: {e}"),
    )
}

async fn send_response(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    context_id: u8,
    cmd: &Command,
    code: u16,
    comment: Option<&str>,
) -> Result<(), Stop> {
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context_id,
            value_type: PDataValueType::Command,
            is_last: true,
            data: dimse::response(cmd, code, comment),
        }],
    };
    assoc
        .send(&pdu)
        .await
        .map_err(|e| stop("cannot send the response", &e))
}

fn pdu_name(p: &Pdu) -> &'static str {
    match p {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "unknown",
    }
}

/// The scratch directory of a spool: `spool.dir/.incoming`.
pub fn scratch_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join(".incoming")
}
