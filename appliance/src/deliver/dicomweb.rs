//! Delivery by DICOMweb STOW-RS (PS3.18 §10.5) into the health-record store.
//!
//! A committed transfer is POSTed to `{url}/studies` as `multipart/related;
//! type="application/dicom"`, one part per file, in requests of at most `delivery.batch_bytes`
//! of files (a file larger than that goes alone), `delivery.requests_in_flight` of them at
//! once: while the store files one request's instances, the next one's body is already
//! arriving. Each body streams from the spool (through the io_uring spool thread, `O_DIRECT`,
//! pooled buffers handed to hyper without a copy) with an exact `Content-Length`.
//!
//! The store's answer decides, request by request, instance by instance: HTTP 200 with every
//! instance of the request in ReferencedSOPSequence (0008,1199) and none in FailedSOPSequence
//! (0008,1198) confirms the request. When the store refuses instances (202, 409, 400 or 422
//! with a STOW-RS answer, a 200 listing failures, or a 400, 409, 413 or 422 without one), the
//! instances it names as stored (by SOP Instance UID, read from each file's meta header) count
//! as confirmed, those it names as failed are refused with its FailureReason (0008,1197), and
//! the rest are sent again one request each, so that one bad instance cannot sink its
//! neighbours; an instance the store refuses when sent alone is refused with the store's
//! status and words. A file that is not DICOM Part 10 is refused without being sent. The
//! other batches are sent all the same: the transfer ends `delivered` when every instance is
//! stored, delivered with refusals when some were refused, and [`Undeliverable`] (set aside)
//! when the store holds none. An answer about the request as a whole that the store will
//! repeat (401, 403, 404, 405, 415, another 4xx, a redirect) makes the transfer
//! [`Undeliverable`] at once, as sending any instance again cannot help. What a retry can fix
//! is [`Transient`] and retried with jittered backoff by the worker: no connection, a
//! time-out, 5xx, 408, 425, 429 (after the store's `Retry-After`), or a 200 that does not
//! confirm every instance.
//!
//! Each answer is recorded durably in the transfer's `stow.acked` as it arrives, before
//! another request takes its place (written atomically: temporary file, fsync, rename,
//! directory fsync): the files of
//! each confirmed request with the RetrieveURL it gave, and each refused instance with its
//! reason. A retry after a later request failed, or a restart, sends only what the store has
//! neither confirmed nor refused. Once the transfer's outcome is recorded (`ended`), a new
//! delivery of it (an operator's retry) sends the refused instances again. The delivery's
//! location is the first RetrieveURL of the whole transfer, whichever attempt got it.
//!
//! `https://` stores are verified against `delivery.ca` only (no system roots) and may ask
//! for the gateway's client certificate (`delivery.cert`, `delivery.key`: a PEM file or a
//! key pair on the HSM token, opened by the caller); TLS 1.3 or 1.2,
//! aws-lc-rs with X25519MLKEM768 preferred, like every other TLS endpoint of baylink.
//!
//! Sending instances the store already holds again is harmless (STOW-RS stores by SOP
//! Instance UID), so a request interrupted by a crash before its confirmation was recorded
//! is simply repeated.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use baylink_net::spool::{Spool, SpoolFile};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

use super::retry::{Cause, Transient, Verdict, classify, parse_retry_after};
use super::{Deliver, Delivered, Undeliverable};
use crate::dicom::part10;
use crate::key_source::TlsKeySource;
use crate::setting::SettingError;
use crate::tls_reload::Swap;
use crate::transfer_dir::{TransferDir, write_atomic};
use baylink_net::proto::{Manifest, RefusedInstance};
use baylink_net::transport::{TlsIdentity, load_ca, root_store};
use rustls_pki_types::ServerName;

/// Default most file bytes per STOW-RS request (`delivery.batch_bytes`). Small enough that
/// the store starts filing a study's first instances while the rest are on their way: a
/// 1000-slice CT study (501 MiB) in 32 MiB requests, two at a time, reached Orthanc whole
/// about a second sooner than in one request (`docs/benchmarks.md`, "Into Orthanc").
pub const DEFAULT_BATCH_BYTES: u64 = 32 << 20;
/// Default STOW-RS requests open at once (`delivery.requests_in_flight`).
pub const DEFAULT_REQUESTS_IN_FLIGHT: u64 = 2;
/// Most `delivery.requests_in_flight`.
pub const MAX_REQUESTS_IN_FLIGHT: u64 = 16;
/// Largest `delivery.batch_bytes`: Orthanc refuses request bodies of 4 GiB and more.
pub const MAX_BATCH_BYTES: u64 = (4 << 30) - (16 << 20);
/// Time to open the TCP connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request may take this long plus one second per [`SLOWEST_BYTES_PER_SECOND`] of body,
/// times the requests open at once (they share the store's pace).
const BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest store throughput tolerated before a request counts as hung.
const SLOWEST_BYTES_PER_SECOND: u64 = 10 * 1024 * 1024;
/// Largest store response read (the DICOM JSON of a batch's references).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// `[delivery]` of kind `dicomweb`: where STOW-RS requests go, how large they are, and TLS
/// to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowSettings {
    /// Base URL, e.g. `http://127.0.0.1:8042/dicom-web` (`delivery.url`).
    pub url: String,
    /// Most file bytes per STOW-RS request (`delivery.batch_bytes`).
    pub batch_bytes: u64,
    /// STOW-RS requests open at once (`delivery.requests_in_flight`).
    pub requests_in_flight: u64,
    /// TLS to the store, for an `https://` URL.
    pub tls: Option<DeliveryTls>,
}

/// How the gateway authenticates the store, and itself to it, over https.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTls {
    /// CA certificate(s) the store's certificate must chain to (`delivery.ca`); no system
    /// roots are trusted.
    pub ca: PathBuf,
    /// Client certificate and key presented to the store (`delivery.cert`, `delivery.key`:
    /// a PEM file or a key pair on the `[hsm]` token), when it asks for one.
    pub identity: Option<(PathBuf, TlsKeySource)>,
}

impl StowSettings {
    /// Checks the `[delivery]` keys of a DICOMweb store (the paths already resolved against
    /// the config file's directory): `delivery.url` is given and a [`StowUrl`];
    /// `delivery.cert` and `delivery.key` come together; an `https://` URL names
    /// `delivery.ca`, a plain `http://` one none of the three; `delivery.batch_bytes`
    /// (default [`DEFAULT_BATCH_BYTES`]) is in `1..=`[`MAX_BATCH_BYTES`];
    /// `delivery.requests_in_flight` (default [`DEFAULT_REQUESTS_IN_FLIGHT`]) in
    /// `1..=`[`MAX_REQUESTS_IN_FLIGHT`].
    pub fn from_section(
        url: Option<String>,
        (batch_bytes, requests_in_flight): (Option<u64>, Option<u64>),
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<TlsKeySource>,
    ) -> Result<StowSettings, SettingError> {
        let invalid = |key: &'static str, message: String| SettingError::Invalid { key, message };
        let url = url.ok_or(SettingError::Missing("delivery.url"))?;
        let parsed = StowUrl::parse(&url).map_err(|e| invalid("delivery.url", format!("{e:#}")))?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(SettingError::Missing("delivery.key")),
            (None, Some(_)) => return Err(SettingError::Missing("delivery.cert")),
        };
        let tls = match (parsed.is_https(), ca) {
            (true, Some(ca)) => Some(DeliveryTls { ca, identity }),
            (true, None) => {
                return Err(invalid(
                    "delivery.ca",
                    format!(
                        "`{url}` is https: name the CA that signs the store's \
                         certificate (no system roots are trusted)"
                    ),
                ));
            }
            (false, ca) => {
                if ca.is_some() || identity.is_some() {
                    return Err(invalid(
                        "delivery.ca",
                        format!(
                            "delivery.ca, cert and key apply to https:// URLs; \
                             `{url}` is plain http"
                        ),
                    ));
                }
                None
            }
        };
        let batch_bytes = batch_bytes.unwrap_or(DEFAULT_BATCH_BYTES);
        if !(1..=MAX_BATCH_BYTES).contains(&batch_bytes) {
            return Err(invalid(
                "delivery.batch_bytes",
                format!("{batch_bytes} is not in 1..={MAX_BATCH_BYTES}"),
            ));
        }
        let requests_in_flight = requests_in_flight.unwrap_or(DEFAULT_REQUESTS_IN_FLIGHT);
        if !(1..=MAX_REQUESTS_IN_FLIGHT).contains(&requests_in_flight) {
            return Err(invalid(
                "delivery.requests_in_flight",
                format!("{requests_in_flight} is not in 1..={MAX_REQUESTS_IN_FLIGHT}"),
            ));
        }
        Ok(StowSettings {
            url,
            batch_bytes,
            requests_in_flight,
            tls,
        })
    }
}

/// Where STOW-RS requests go: `http[s]://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowUrl {
    https: bool,
    /// `host[:port]` as written: the `Host` header.
    authority: String,
    /// The host without brackets: the TLS server name.
    host: String,
    /// `host:port` with the scheme's default port: where to connect.
    connect: String,
    /// The STOW-RS endpoint path: the base path + `/studies`.
    studies_path: String,
}

impl StowUrl {
    /// Parses and checks `delivery.url`, the DICOMweb base (e.g.
    /// `http://127.0.0.1:8042/dicom-web`).
    pub fn parse(url: &str) -> anyhow::Result<StowUrl> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("`{url}` must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .with_context(|| format!("`{url}` names no host"))?;
        if authority.as_str().contains('@') {
            bail!("`{url}`: credentials in the URL are not supported");
        }
        if uri.query().is_some() {
            bail!("`{url}`: the DICOMweb base URL takes no query");
        }
        let base = uri.path().trim_end_matches('/');
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(StowUrl {
            https,
            authority: authority.as_str().to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            connect: format!("{host}:{port}"),
            studies_path: format!("{base}/studies"),
        })
    }

    /// Whether the store is reached over TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    fn studies_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.studies_path)
    }
}

/// Delivery into a DICOMweb store by STOW-RS.
#[derive(Clone)]
pub struct DicomWebDelivery {
    url: StowUrl,
    /// Set for an `https://` store: the client configuration in force (replaced by a
    /// SIGHUP reload, [`DicomWebDelivery::tls_config`]) and the store's name.
    tls: Option<(Swap<rustls::ClientConfig>, ServerName<'static>)>,
    /// Most file bytes per request (`delivery.batch_bytes`).
    batch_bytes: u64,
    /// Requests open at once (`delivery.requests_in_flight`).
    requests_in_flight: usize,
    /// Reads the files (pooled buffers, `O_DIRECT`).
    spool: Spool,
    /// The runtime the blocking delivery worker drives its requests on.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for DicomWebDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomWebDelivery")
            .field("url", &self.url.studies_url())
            .field("tls", &self.tls.is_some())
            .field("batch_bytes", &self.batch_bytes)
            .field("requests_in_flight", &self.requests_in_flight)
            .finish()
    }
}

impl DicomWebDelivery {
    /// Delivers to the DICOMweb base `url` (with `tls` for an `https://` one, and `identity`,
    /// the certificate and key of `tls.identity` opened by the caller, to present), reading
    /// the files through `spool` and driving requests on `runtime`.
    pub fn new(
        url: &str,
        tls: Option<&DeliveryTls>,
        identity: Option<TlsIdentity>,
        spool: Spool,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<DicomWebDelivery> {
        let url = StowUrl::parse(url)?;
        let tls = match (url.https, tls) {
            (true, Some(tls)) => {
                match (&tls.identity, &identity) {
                    (Some(_), None) => bail!("delivery.cert and delivery.key were not opened"),
                    (None, Some(_)) => {
                        bail!("a client identity without delivery.cert and delivery.key")
                    }
                    _ => {}
                }
                let name = ServerName::try_from(url.host.clone())
                    .with_context(|| format!("`{}` is not a valid TLS server name", url.host))?;
                let config = store_client_config(tls, identity.as_ref())?;
                Some((Swap::new(config), name))
            }
            (true, None) => bail!("an https:// store needs delivery.ca"),
            (false, Some(_)) => bail!("delivery.ca, cert and key apply to https:// URLs"),
            (false, None) => None,
        };
        Ok(DicomWebDelivery {
            url,
            tls,
            batch_bytes: DEFAULT_BATCH_BYTES,
            requests_in_flight: DEFAULT_REQUESTS_IN_FLIGHT as usize,
            spool,
            runtime,
        })
    }

    /// The TLS client configuration of an `https://` store, which each connection reads
    /// when it starts: [`Swap::replace`] puts a renewed one in force
    /// ([`store_client_config`] builds it) without touching a request in flight.
    pub fn tls_config(&self) -> Option<Swap<rustls::ClientConfig>> {
        self.tls.as_ref().map(|(config, _)| config.clone())
    }

    /// Sets the most file bytes per request.
    pub fn with_batch_bytes(mut self, bytes: u64) -> DicomWebDelivery {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// Sets how many requests may be open at once (at least one).
    pub fn with_requests_in_flight(mut self, requests: u64) -> DicomWebDelivery {
        self.requests_in_flight = usize::try_from(requests.max(1)).unwrap_or(usize::MAX);
        self
    }

    async fn deliver_async(
        &self,
        dir: &TransferDir,
        manifest: &Manifest,
    ) -> anyhow::Result<Delivered> {
        let acked_path = dir.stow_acked();
        let mut acked = Acked::load(&acked_path);
        if acked.ended {
            // The transfer's outcome was recorded and it is delivered again (an operator's
            // retry): the instances refused then are tried again.
            acked.refused.clear();
            acked.ended = false;
        }
        let record = |acked: &Acked| -> anyhow::Result<()> {
            // Durable before the next request: a later failure or a crash does not send a
            // confirmed instance again. Not recorded: the error retries the delivery, and
            // the batch is sent again (harmless).
            let json = serde_json::to_vec(acked).context("encoding stow.acked")?;
            write_atomic(&acked_path, &json)
                .with_context(|| format!("cannot record {}", acked_path.display()))
        };
        let done: HashSet<String> = acked
            .batches
            .iter()
            .flat_map(|b| b.files.iter().cloned())
            .chain(acked.refused.iter().map(|r| r.file.clone()))
            .collect();
        let mut files = Vec::with_capacity(manifest.files.len());
        let mut not_dicom = false;
        for f in &manifest.files {
            if done.contains(&f.name) {
                continue;
            }
            let path = dir.data_file(&f.name);
            match inspect(&path).await? {
                None => {
                    tracing::warn!(transfer = %manifest.transfer_id, file = %f.name, "STOW-RS: not a DICOM Part 10 file; refused without sending it");
                    acked.refused.push(RefusedRecord {
                        file: f.name.clone(),
                        reason: "not a DICOM Part 10 file (no DICM prefix); a dicomweb \
                                 delivery carries DICOM instances only"
                            .to_owned(),
                        ..RefusedRecord::default()
                    });
                    not_dicom = true;
                }
                Some(uids) => files.push(Part {
                    path,
                    name: f.name.clone(),
                    len: f.size,
                    uids,
                }),
            }
        }
        if not_dicom {
            record(&acked)?;
        }
        let skipped = done.len();
        if skipped > 0 {
            tracing::info!(
                transfer = %manifest.transfer_id,
                confirmed = skipped,
                left = files.len(),
                "STOW-RS: instances the store already confirmed or refused are not sent again"
            );
        }
        let mut queue: VecDeque<Vec<Part>> = batches(&files, self.batch_bytes)
            .into_iter()
            .map(<[Part]>::to_vec)
            .collect();
        // Up to `requests_in_flight` requests open; each answer is judged and recorded as it
        // comes, and its place taken by the next batch. A request that fails (no answer, or
        // one the delivery cannot go on after) fails the delivery: no request is started
        // after it, the answers of those still open are recorded, then its error is
        // returned.
        let mut in_flight = FuturesUnordered::new();
        let mut failed: Option<anyhow::Error> = None;
        loop {
            while failed.is_none() && in_flight.len() < self.requests_in_flight {
                let Some(batch) = queue.pop_front() else {
                    break;
                };
                in_flight.push(async move {
                    let judged = self.post(&batch).await;
                    (batch, judged)
                });
            }
            let Some((batch, judged)) = futures_util::StreamExt::next(&mut in_flight).await else {
                break;
            };
            let judged = match judged {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(
                        transfer = %manifest.transfer_id,
                        instances = batch.len(),
                        error = format!("{e:#}"),
                        "STOW-RS: a request failed; no more are sent in this attempt, the open ones are answered first"
                    );
                    // A final answer outweighs one a retry might fix: the retry would get it
                    // again.
                    let keep = match &failed {
                        None => true,
                        Some(f) => !f.is::<Undeliverable>() && e.is::<Undeliverable>(),
                    };
                    if keep {
                        failed = Some(e);
                    }
                    continue;
                }
            };
            match judged {
                Judged::Confirmed(retrieve_url) => acked.batches.push(AckedBatch {
                    files: batch.iter().map(|p| p.name.clone()).collect(),
                    retrieve_url,
                }),
                Judged::Refusals(r) => {
                    tracing::warn!(
                        transfer = %manifest.transfer_id,
                        instances = batch.len(),
                        stored = r.stored.len(),
                        refused = r.refused.len(),
                        sent_again_one_by_one = if batch.len() > 1 { r.unaccounted.len() } else { 0 },
                        answer = %r.why,
                        "STOW-RS: the store refused instances of a request; the rest of the transfer is delivered"
                    );
                    if !r.stored.is_empty() {
                        acked.batches.push(AckedBatch {
                            files: r.stored.iter().map(|&i| batch[i].name.clone()).collect(),
                            retrieve_url: r.retrieve_url,
                        });
                    }
                    for (i, failure) in r.refused {
                        acked.refused.push(RefusedRecord::of(&batch[i], failure));
                    }
                    if batch.len() == 1 {
                        if let Some(&i) = r.unaccounted.first() {
                            acked.refused.push(RefusedRecord::of(
                                &batch[i],
                                Failure {
                                    sop_class_uid: None,
                                    code: None,
                                    reason: r.why.clone(),
                                },
                            ));
                        }
                    } else {
                        // Alone, each instance gets an answer of its own.
                        for &i in r.unaccounted.iter().rev() {
                            queue.push_front(vec![batch[i].clone()]);
                        }
                    }
                }
            }
            record(&acked)?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        acked.ended = true;
        record(&acked)?;
        let refused: Vec<RefusedInstance> =
            acked.refused.iter().map(RefusedRecord::to_notice).collect();
        let stored = acked.batches.iter().any(|b| !b.files.is_empty());
        if !stored {
            return Err(Undeliverable(format!(
                "the store holds no instance of the transfer; {}",
                summary(&refused)
            ))
            .into());
        }
        let location = acked
            .batches
            .iter()
            .find_map(|b| b.retrieve_url.clone())
            .unwrap_or_else(|| self.url.studies_url());
        Ok(Delivered { location, refused })
    }

    /// One STOW-RS request: what the store did with each instance of it.
    async fn post(&self, parts: &[Part]) -> anyhow::Result<Judged> {
        let boundary = format!("baylink-{}", uuid::Uuid::now_v7().simple());
        let body = Multipart::new(parts, boundary.clone(), self.spool.clone());
        let length = body.len();
        let request = Request::post(&self.url.studies_path)
            .header(HOST, &self.url.authority)
            .header(
                CONTENT_TYPE,
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .header(ACCEPT, "application/dicom+json")
            .header(CONTENT_LENGTH, length)
            .body(StreamBody::new(body.stream()))
            .context("cannot build the STOW-RS request")?;

        let shared = u64::try_from(self.requests_in_flight).unwrap_or(u64::MAX);
        let limit = BASE_TIMEOUT
            + Duration::from_secs((length / SLOWEST_BYTES_PER_SECOND).saturating_mul(shared));
        let studies = self.url.studies_url();
        let exchange = async {
            let tcp = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(&self.url.connect),
            )
            .await
            .map_err(|_| {
                Transient::new(
                    Cause::Timeout,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| Transient::new(Cause::Connection, format!("cannot connect: {e}")))?;
            tcp.set_nodelay(true)
                .map_err(|e| Transient::new(Cause::Connection, format!("TCP_NODELAY: {e}")))?;
            let broken = |e: anyhow::Error| Transient::new(Cause::Connection, format!("{e:#}"));
            match &self.tls {
                None => exchange(TokioIo::new(tcp), request).await.map_err(broken),
                Some((config, name)) => {
                    let connector = tokio_rustls::TlsConnector::from(config.current());
                    let tls =
                        tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                            .await
                            .map_err(|_| {
                                Transient::new(
                                    Cause::Timeout,
                                    format!("no TLS handshake within {CONNECT_TIMEOUT:?}"),
                                )
                            })?
                            .map_err(|e| {
                                Transient::new(
                                    Cause::Connection,
                                    format!("TLS handshake with the store: {e}"),
                                )
                            })?;
                    exchange(TokioIo::new(tls), request).await.map_err(broken)
                }
            }
        };
        let (status, retry_after, answer) = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| {
                Transient::new(
                    Cause::Timeout,
                    format!("POST {studies}: no answer within {limit:?}"),
                )
            })?
            .map_err(|e| anyhow::Error::new(e).context(format!("POST {studies}")))?;
        judge(status, retry_after, &answer, parts).with_context(|| format!("POST {studies}"))
    }
}

impl Deliver for DicomWebDelivery {
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<Delivered> {
        self.runtime.block_on(self.deliver_async(dir, manifest))
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io`; the answer's status, its
/// `Retry-After` (if any and readable) and its body.
async fn exchange<T, B>(
    io: T,
    request: Request<B>,
) -> anyhow::Result<(StatusCode, Option<Duration>, Bytes)>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, retry_after, body))
}

/// The rustls client configuration for an `https://` store: `delivery.ca` only, TLS 1.3 or
/// 1.2, ALPN `http/1.1`, presenting `identity` (`delivery.cert` with `delivery.key`) when
/// there is one.
pub fn store_client_config(
    tls: &DeliveryTls,
    identity: Option<&TlsIdentity>,
) -> anyhow::Result<rustls::ClientConfig> {
    let roots = root_store(&load_ca(&tls.ca).context("delivery.ca")?).with_context(|| {
        format!(
            "delivery.ca: CA certificate in {} refused",
            tls.ca.display()
        )
    })?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder.with_client_cert_resolver(id.resolver()),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One file of a request.
#[derive(Debug, Clone)]
struct Part {
    path: std::path::PathBuf,
    name: String,
    len: u64,
    /// Its SOP Instance and Class UIDs, from its meta header, where readable.
    uids: Uids,
}

/// The SOP Instance UID (0002,0003) and SOP Class UID (0002,0002) of a file's meta header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Uids {
    instance: Option<String>,
    class: Option<String>,
}

/// Groups `parts` into requests of at most `limit` file bytes, in order; a file larger than
/// `limit` is a request of its own.
fn batches(parts: &[Part], limit: u64) -> Vec<&[Part]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, p) in parts.iter().enumerate() {
        if i > start && bytes + p.len > limit {
            out.push(&parts[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += p.len;
    }
    if start < parts.len() {
        out.push(&parts[start..]);
    }
    out
}

/// How much of a file is read for its meta header.
const META_READ: usize = 16 * 1024;

/// `None` for a file that is not DICOM Part 10 (no `DICM` after the 128-byte preamble);
/// otherwise the UIDs its meta header names.
async fn inspect(path: &Path) -> anyhow::Result<Option<Uids>> {
    let mut head = vec![0u8; META_READ];
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut got = 0;
    while got < head.len() {
        let n = file.read(&mut head[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    head.truncate(got);
    if !part10::has_prefix(&head) {
        return Ok(None);
    }
    Ok(Some(meta_uids(&head)))
}

/// The SOP UIDs of the meta group (explicit VR little endian, PS3.10 7.1) in `head`, read by
/// the one Part-10 reader ([`crate::dicom::reader`]); a UID that is absent, cut off or
/// malformed is `None`. Reads only within `head`.
fn meta_uids(head: &[u8]) -> Uids {
    // Stop at the first data set element: only the meta group is wanted.
    let mut reader = crate::dicom::reader::Reader::new(Some((0, 0)));
    // A malformed meta group still yields the UIDs read before the problem.
    let _ = reader.feed(head);
    let facts = reader.facts();
    let uid = |v: &Option<String>| {
        v.as_deref()
            .filter(|t| part10::validate_uid(t).is_ok())
            .map(str::to_owned)
    };
    Uids {
        class: uid(&facts.media_sop_class),
        instance: uid(&facts.media_sop_instance),
    }
}

/// The multipart/related body of one request.
struct Multipart {
    parts: Vec<Part>,
    boundary: String,
    spool: Spool,
}

/// Where the body stream is.
struct Cursor {
    /// The next part to open.
    next: usize,
    /// The part being read: its file, the offset of the next read, the bytes left.
    file: Option<(SpoolFile, u64, u64, usize)>,
    done: bool,
}

impl Multipart {
    fn new(parts: &[Part], boundary: String, spool: Spool) -> Multipart {
        Multipart {
            parts: parts.to_vec(),
            boundary,
            spool,
        }
    }

    fn part_head(&self) -> Bytes {
        Bytes::from(format!(
            "--{}\r\nContent-Type: application/dicom\r\n\r\n",
            self.boundary
        ))
    }

    fn tail(&self) -> Bytes {
        Bytes::from(format!("--{}--\r\n", self.boundary))
    }

    /// Exact body length.
    fn len(&self) -> u64 {
        let head = self.part_head().len() as u64;
        self.parts.iter().map(|p| head + p.len + 2).sum::<u64>() + self.tail().len() as u64
    }

    /// The body as a stream of frames, reading each file through the spool as it goes
    /// (`O_DIRECT` where the file system allows it: the committed files were written that
    /// way and are not in the page cache, and copying them through it costs more CPU than
    /// the whole STOW-RS request otherwise does). A file that is not the length the manifest
    /// says ends the stream with an error, which aborts the request.
    fn stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + 'static
    {
        let cursor = Cursor {
            next: 0,
            file: None,
            done: false,
        };
        futures_util::stream::unfold((self, cursor), |(body, mut at)| async move {
            if at.done {
                return None;
            }
            match body.step(&mut at).await {
                Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), (body, at))),
                Ok(None) => None,
                Err(e) => {
                    at.done = true;
                    Some((Err(e), (body, at)))
                }
            }
        })
    }

    /// The next piece of the body: a part head, file bytes, a part's closing CRLF, the tail.
    async fn step(&self, at: &mut Cursor) -> std::io::Result<Option<Bytes>> {
        if let Some((file, offset, left, index)) = &mut at.file {
            if *left == 0 {
                at.file = None;
                return Ok(Some(Bytes::from_static(b"\r\n")));
            }
            let buf = self.spool.buffer().await;
            let want = usize::try_from((*left).min(buf.capacity() as u64))
                .expect("bounded by the buffer size");
            let buf = self
                .spool
                .read_at(file, *offset, buf, want)
                .await
                .map_err(std::io::Error::other)?;
            if buf.len() != want {
                return Err(std::io::Error::other(format!(
                    "{} is shorter than its manifest says",
                    self.parts[*index].name
                )));
            }
            *offset += want as u64;
            *left -= want as u64;
            // The pool buffer goes to hyper as is (no copy) and back to the pool once sent.
            return Ok(Some(buf.into_detached_bytes()));
        }
        if let Some(part) = self.parts.get(at.next) {
            let len = tokio::fs::metadata(&part.path).await?.len();
            if len != part.len {
                return Err(std::io::Error::other(format!(
                    "{} has {len} bytes, its manifest says {}",
                    part.name, part.len
                )));
            }
            let file = self
                .spool
                .open_direct(&part.path)
                .await
                .map_err(std::io::Error::other)?;
            at.file = Some((file, 0, part.len, at.next));
            at.next += 1;
            return Ok(Some(self.part_head()));
        }
        if at.next == self.parts.len() {
            at.next += 1;
            return Ok(Some(self.tail()));
        }
        Ok(None)
    }
}

/// What the store did with a transfer's instances so far (`stow.acked`): the requests it
/// confirmed, in the order their answers came, and the instances it refused.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Acked {
    batches: Vec<AckedBatch>,
    /// Instances the store refused (or that are not DICOM), not sent again in this delivery.
    #[serde(default)]
    refused: Vec<RefusedRecord>,
    /// Every instance has its answer: the transfer's outcome follows from this record.
    #[serde(default)]
    ended: bool,
}

/// One confirmed request: the names of its files (those the store confirmed) and the
/// RetrieveURL the store gave.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AckedBatch {
    files: Vec<String>,
    retrieve_url: Option<String>,
}

/// One instance the store refused, as `stow.acked` keeps it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct RefusedRecord {
    file: String,
    #[serde(default)]
    sop_instance_uid: Option<String>,
    #[serde(default)]
    sop_class_uid: Option<String>,
    #[serde(default)]
    failure_reason: Option<u16>,
    reason: String,
}

impl RefusedRecord {
    fn of(part: &Part, failure: Failure) -> RefusedRecord {
        RefusedRecord {
            file: part.name.clone(),
            sop_instance_uid: part.uids.instance.clone(),
            sop_class_uid: failure.sop_class_uid.or_else(|| part.uids.class.clone()),
            failure_reason: failure.code,
            reason: failure.reason,
        }
    }

    fn to_notice(&self) -> RefusedInstance {
        RefusedInstance {
            file: self.file.clone(),
            sop_instance_uid: self.sop_instance_uid.clone().unwrap_or_default(),
            sop_class_uid: self.sop_class_uid.clone().unwrap_or_default(),
            failure_reason: self.failure_reason,
            reason: self.reason.clone(),
        }
    }
}

/// The instances the store refused in the last delivery of the transfer in `dir`, as its
/// `stow.acked` records them (none for a transfer never delivered by STOW-RS).
pub fn refused_instances(dir: &TransferDir) -> Vec<RefusedInstance> {
    let path = dir.stow_acked();
    if !path.exists() {
        return Vec::new();
    }
    Acked::load(&path)
        .refused
        .iter()
        .map(RefusedRecord::to_notice)
        .collect()
}

/// The refused instances in one line, for the `undeliverable` file and the audit record:
/// `N instances refused: <file> (<SOP Instance UID>): <reason>; …` (at most 4 KiB).
pub fn summary(refused: &[RefusedInstance]) -> String {
    let mut out = format!(
        "{} instance{} refused: ",
        refused.len(),
        if refused.len() == 1 { "" } else { "s" }
    );
    for (n, r) in refused.iter().enumerate() {
        let item = if r.sop_instance_uid.is_empty() {
            format!("{}: {}", r.file, r.reason)
        } else {
            format!("{} ({}): {}", r.file, r.sop_instance_uid, r.reason)
        };
        if out.len() + item.len() > 4096 {
            out.push_str(&format!("; and {} more", refused.len() - n));
            break;
        }
        if n > 0 {
            out.push_str("; ");
        }
        out.push_str(&item);
    }
    out
}

impl Acked {
    /// The record at `path`; empty when there is none, or (with a warning) when it cannot be
    /// read: then every file is sent again, which the store takes harmlessly.
    fn load(path: &Path) -> Acked {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable STOW-RS confirmation record: sending every file");
                Acked::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Acked::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the STOW-RS confirmation record: sending every file");
                Acked::default()
            }
        }
    }
}

/// What the store did with the instances of one request.
#[derive(Debug)]
enum Judged {
    /// Every instance stored; the RetrieveURL (0008,1190) if the store gave one.
    Confirmed(Option<String>),
    /// Some or all refused.
    Refusals(Refusals),
}

/// The store's answer to a request whose instances it did not all store: each instance of
/// the request (by index) is in exactly one of `stored`, `refused` and `unaccounted`.
#[derive(Debug, Default)]
struct Refusals {
    /// The answer's RetrieveURL, if any.
    retrieve_url: Option<String>,
    /// Named stored in ReferencedSOPSequence.
    stored: Vec<usize>,
    /// Named failed in FailedSOPSequence.
    refused: Vec<(usize, Failure)>,
    /// Named neither way.
    unaccounted: Vec<usize>,
    /// The store's status and words.
    why: String,
}

/// Why the store refused one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    /// The SOP Class UID the store named, if any.
    sop_class_uid: Option<String>,
    /// The store's FailureReason (0008,1197), if any.
    code: Option<u16>,
    /// In words: the store's status and the FailureReason's meaning.
    reason: String,
}

/// One item of FailedSOPSequence (0008,1198).
#[derive(Debug)]
struct FailedItem {
    instance: Option<String>,
    class: Option<String>,
    code: Option<u16>,
}

/// Reads the store's answer to a request that carried `parts`: which instances it stored
/// and refused ([`Judged`]); [`Undeliverable`] for an answer about the whole request the store
/// will repeat, [`Transient`] (with the answer's `Retry-After`) for one a retry can fix.
fn judge(
    status: StatusCode,
    retry_after: Option<Duration>,
    answer: &[u8],
    parts: &[Part],
) -> anyhow::Result<Judged> {
    let excerpt = || {
        let text = String::from_utf8_lossy(&answer[..answer.len().min(300)]);
        text.chars().filter(|c| !c.is_control()).collect::<String>()
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(answer).ok();
    let failed = json.as_ref().map(failed_items).unwrap_or_default();
    // A STOW-RS answer: the store read the request and judged what was in it (Orthanc answers
    // 400 with one for an instance it cannot parse or store, listing the others it stored).
    let stow_answer = json
        .as_ref()
        .is_some_and(|j| j.get("00081198").is_some() || j.get("00081199").is_some());
    let per_instance = matches!(status, StatusCode::ACCEPTED | StatusCode::CONFLICT)
        || (status == StatusCode::OK && !failed.is_empty())
        || (status.is_client_error()
            && (stow_answer
                || matches!(
                    status,
                    StatusCode::BAD_REQUEST
                        | StatusCode::PAYLOAD_TOO_LARGE
                        | StatusCode::UNPROCESSABLE_ENTITY
                )));
    if per_instance {
        let json = json.unwrap_or(serde_json::Value::Null);
        return Ok(Judged::Refusals(sort_out(
            status,
            &json,
            &failed,
            parts,
            excerpt(),
        )));
    }
    if status != StatusCode::OK {
        let message = format!("the store answered {status}: {}", excerpt());
        return Err(match classify(status.as_u16()) {
            Verdict::Retry(cause) => Transient {
                cause,
                retry_after,
                message,
            }
            .into(),
            Verdict::Final => Undeliverable(message).into(),
        });
    }
    let incomplete = |message: String| Transient::new(Cause::Incomplete, message);
    let json =
        json.ok_or_else(|| incomplete(format!("the store's answer is not JSON: {}", excerpt())))?;
    let stored = values(&json, "00081199").len();
    if stored != parts.len() {
        return Err(incomplete(format!(
            "the store confirmed {stored} of {} instances ({})",
            parts.len(),
            parts
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into());
    }
    Ok(Judged::Confirmed(retrieve_url(&json)))
}

/// Sorts the instances of a refused request into stored, refused and unaccounted, matching
/// the store's lists by SOP Instance UID.
fn sort_out(
    status: StatusCode,
    json: &serde_json::Value,
    failed: &[FailedItem],
    parts: &[Part],
    excerpt: String,
) -> Refusals {
    let mut out = Refusals {
        retrieve_url: retrieve_url(json),
        ..Refusals::default()
    };
    let listed = json.get("00081198").is_some() || json.get("00081199").is_some();
    out.why = if listed {
        format!(
            "the store answered {status} and named it neither stored nor failed (it could not \
             read the instance)"
        )
    } else {
        format!("the store answered {status}: {excerpt}")
    };
    let referenced: HashSet<&str> = values(json, "00081199")
        .iter()
        .filter_map(|item| first_str(item, "00081155"))
        .collect();
    let failure = |item: &FailedItem| Failure {
        sop_class_uid: item.class.clone(),
        code: item.code,
        reason: match item.code {
            Some(code) => format!(
                "the store answered {status}: failure reason {code:#06x} ({})",
                failure_meaning(code)
            ),
            None => format!("the store answered {status}: no failure reason given"),
        },
    };
    for (i, part) in parts.iter().enumerate() {
        let uid = part.uids.instance.as_deref();
        if let Some(item) = failed
            .iter()
            .find(|f| f.instance.is_some() && f.instance.as_deref() == uid)
        {
            out.refused.push((i, failure(item)));
        } else if uid.is_some_and(|u| referenced.contains(u)) {
            out.stored.push(i);
        } else {
            out.unaccounted.push(i);
        }
    }
    // One instance, one failure the store named by a UID its meta header does not carry.
    if let ([part], [item], [0]) = (parts, failed, out.unaccounted.as_slice())
        && item.instance.as_deref() != part.uids.instance.as_deref()
    {
        out.unaccounted.clear();
        out.refused.push((0, failure(item)));
    }
    out
}

/// What a FailureReason (0008,1197) means (PS3.4 Annex C, PS3.18 Table 10.5.3-3).
fn failure_meaning(code: u16) -> &'static str {
    match code {
        0x0110 => "processing failure",
        0x0111 => "duplicate SOP instance",
        0x0117 => "invalid object instance",
        0x0122 => "SOP class not supported",
        0x0124 => "not authorized",
        0xA700..=0xA7FF => "out of resources",
        0xA900..=0xA9FF => "data set does not match SOP class",
        0xC000..=0xCFFF => "cannot understand",
        _ => "unknown failure reason",
    }
}

/// The first string of element `tag` in `json`.
fn first_str<'a>(json: &'a serde_json::Value, tag: &str) -> Option<&'a str> {
    values(json, tag)
        .first()
        .and_then(serde_json::Value::as_str)
}

/// The RetrieveURL (0008,1190) of an answer.
fn retrieve_url(json: &serde_json::Value) -> Option<String> {
    first_str(json, "00081190").map(str::to_owned)
}

/// The `Value` array of element `tag` in a DICOM JSON object (PS3.18 F.2); empty when the
/// element or its value is absent.
fn values<'a>(json: &'a serde_json::Value, tag: &str) -> &'a [serde_json::Value] {
    json.get(tag)
        .and_then(|e| e.get("Value"))
        .and_then(serde_json::Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Every item of FailedSOPSequence (0008,1198).
fn failed_items(json: &serde_json::Value) -> Vec<FailedItem> {
    values(json, "00081198")
        .iter()
        .map(|item| FailedItem {
            instance: first_str(item, "00081155").map(str::to_owned),
            class: first_str(item, "00081150").map(str::to_owned),
            code: values(item, "00081197")
                .first()
                .and_then(serde_json::Value::as_u64)
                .and_then(|c| u16::try_from(c).ok()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, len: u64) -> Part {
        Part {
            path: name.into(),
            name: name.to_owned(),
            len,
            uids: Uids::default(),
        }
    }

    /// A part whose meta header names SOP Instance UID `uid`.
    fn dicom(name: &str, uid: &str) -> Part {
        Part {
            uids: Uids {
                instance: Some(uid.to_owned()),
                class: Some("1.2.840.10008.5.1.4.1.1.2".to_owned()),
            },
            ..part(name, 1)
        }
    }

    #[test]
    fn urls_are_checked() {
        let u = StowUrl::parse("http://127.0.0.1:8042/dicom-web/").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8042");
        assert_eq!(u.connect, "127.0.0.1:8042");
        assert!(!u.is_https());
        assert_eq!(u.studies_path, "/dicom-web/studies");
        assert_eq!(u.studies_url(), "http://127.0.0.1:8042/dicom-web/studies");
        let plain = StowUrl::parse("http://store").unwrap();
        assert_eq!(plain.studies_path, "/studies");
        assert_eq!(plain.connect, "store:80");
        let tls = StowUrl::parse("https://[::1]/dicom-web").unwrap();
        assert!(tls.is_https());
        assert_eq!(
            (tls.host.as_str(), tls.connect.as_str()),
            ("::1", "[::1]:443")
        );
        assert_eq!(tls.studies_url(), "https://[::1]/dicom-web/studies");
        for (bad, why) in [
            ("ftp://store/x", "must start with http:// or https://"),
            ("/dicom-web", "must start with http:// or https://"),
            ("http://u:p@store/x", "credentials"),
            ("http://store/x?y=1", "takes no query"),
            ("not a url", "is not a URL"),
        ] {
            let e = StowUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn batches_stay_under_the_limit_and_keep_order() {
        let parts = [part("a", 4), part("b", 4), part("c", 9), part("d", 1)];
        let names = |b: &[Part]| b.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let got: Vec<_> = batches(&parts, 8).into_iter().map(names).collect();
        assert_eq!(got, [vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert_eq!(batches(&parts, 100).len(), 1);
        assert!(batches(&[], 8).is_empty());
    }

    fn spool() -> Spool {
        Spool::start(baylink_net::spool::SpoolConfig::default()).unwrap()
    }

    #[tokio::test]
    async fn the_body_is_exactly_as_long_as_announced_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool();
        let mut parts = Vec::new();
        let big = 3 * spool.buffer_size() as u64 + 5;
        for (name, len) in [("x.dcm", big), ("y.dcm", 0)] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![b'z'; len as usize]).unwrap();
            parts.push(Part {
                path,
                name: name.to_owned(),
                len,
                uids: Uids::default(),
            });
        }
        let body = Multipart::new(&parts, "B".to_owned(), spool);
        let announced = body.len();
        let bytes = StreamBody::new(body.stream())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(bytes.len() as u64, announced);
        let head = "--B\r\nContent-Type: application/dicom\r\n\r\n";
        assert!(bytes.starts_with(head.as_bytes()));
        assert!(bytes.ends_with(format!("\r\n{head}\r\n--B--\r\n").as_bytes()));
        let x = &bytes[head.len()..head.len() + big as usize];
        assert!(x.iter().all(|&b| b == b'z'), "x.dcm arrives whole");
    }

    #[tokio::test]
    async fn a_file_that_changed_length_aborts_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.dcm");
        std::fs::write(&path, b"12345").unwrap();
        for claimed in [9, 2] {
            let parts = [Part {
                path: path.clone(),
                name: "x.dcm".to_owned(),
                len: claimed,
                uids: Uids::default(),
            }];
            let e = StreamBody::new(Multipart::new(&parts, "B".to_owned(), spool()).stream())
                .collect()
                .await
                .unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("x.dcm has 5 bytes, its manifest says {claimed}")),
                "{e}"
            );
        }
    }

    fn judge_ok(status: StatusCode, answer: &[u8], parts: &[Part]) -> anyhow::Result<Judged> {
        judge(status, None, answer, parts)
    }

    /// The RetrieveURL of a full confirmation; panics for anything else.
    fn confirmed(j: anyhow::Result<Judged>) -> Option<String> {
        match j.unwrap() {
            Judged::Confirmed(url) => url,
            other => panic!("not confirmed: {other:?}"),
        }
    }

    /// The refusals of a judged answer; panics for anything else.
    fn refusals(j: anyhow::Result<Judged>) -> Refusals {
        match j.unwrap() {
            Judged::Refusals(r) => r,
            other => panic!("no refusals: {other:?}"),
        }
    }

    /// The cause of a failure worth a retry; panics for one that is final.
    fn transient(e: &anyhow::Error) -> &Transient {
        assert!(e.downcast_ref::<Undeliverable>().is_none(), "final: {e}");
        e.downcast_ref::<Transient>()
            .unwrap_or_else(|| panic!("not marked for a retry: {e}"))
    }

    #[test]
    fn answers_are_judged() {
        let parts = [part("a", 1), part("b", 1)];
        let ok = br#"{"00081190":{"vr":"UR","Value":["http://s/studies/1.2"]},
            "00081199":{"vr":"SQ","Value":[{},{}]}}"#;
        assert_eq!(
            confirmed(judge_ok(StatusCode::OK, ok, &parts)).as_deref(),
            Some("http://s/studies/1.2")
        );
        let short = br#"{"00081199":{"vr":"SQ","Value":[{}]}}"#;
        let e = judge_ok(StatusCode::OK, short, &parts).unwrap_err();
        assert!(e.to_string().contains("confirmed 1 of 2"), "{e}");
        assert_eq!(transient(&e).cause, Cause::Incomplete, "worth a retry");
        let e = judge_ok(StatusCode::OK, b"<html>", &parts).unwrap_err();
        assert_eq!(transient(&e).cause, Cause::Incomplete);
    }

    /// Orthanc's answer to a request of `stored` instances it stored and `failed` ones it
    /// refused with FailureReason 0xC000 (status 400, as Orthanc 1.10 answers).
    fn orthanc_answer(stored: &[&str], failed: &[&str]) -> Vec<u8> {
        let item = |uid: &str, more: &str| {
            format!(
                r#"{{"00081150":{{"Value":["1.2.840.10008.5.1.4.1.1.2"],"vr":"UI"}},"00081155":{{"Value":["{uid}"],"vr":"UI"}}{more}}}"#
            )
        };
        let list = |uids: &[&str], more: &str| {
            if uids.is_empty() {
                r#"{"vr":"SQ"}"#.to_owned()
            } else {
                let items: Vec<String> = uids.iter().map(|u| item(u, more)).collect();
                format!(r#"{{"Value":[{}],"vr":"SQ"}}"#, items.join(","))
            }
        };
        format!(
            r#"{{"00080005":{{"Value":["ISO_IR 100"],"vr":"CS"}},"00081190":{{"Value":["http://s/studies/9"],"vr":"UR"}},"00081198":{},"00081199":{}}}"#,
            list(failed, r#","00081197":{"Value":[49152],"vr":"US"}"#),
            list(stored, r#","00081190":{"Value":["http://s/x"],"vr":"UR"}"#)
        )
        .into_bytes()
    }

    #[test]
    fn refused_instances_are_told_apart_from_stored_ones_by_uid() {
        // Orthanc: one instance without a StudyInstanceUID among two good ones, and one it
        // could not parse (named nowhere).
        let parts = [
            dicom("a.dcm", "1.2.1"),
            dicom("b.dcm", "1.2.2"),
            dicom("cut.dcm", "1.2.3"),
            dicom("c.dcm", "1.2.4"),
        ];
        let answer = orthanc_answer(&["1.2.1", "1.2.4"], &["1.2.2"]);
        let r = refusals(judge_ok(StatusCode::BAD_REQUEST, &answer, &parts));
        assert_eq!(r.stored, [0, 3]);
        assert_eq!(r.unaccounted, [2], "sent again alone");
        assert_eq!(r.refused.len(), 1);
        let (i, f) = &r.refused[0];
        assert_eq!(*i, 1);
        assert_eq!(f.code, Some(0xc000));
        assert_eq!(
            f.sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(
            f.reason,
            "the store answered 400 Bad Request: failure reason 0xc000 (cannot understand)"
        );
        assert_eq!(r.retrieve_url.as_deref(), Some("http://s/studies/9"));

        // 409, 202 and a 200 listing failures are per instance as well.
        for status in [StatusCode::CONFLICT, StatusCode::ACCEPTED, StatusCode::OK] {
            let answer = orthanc_answer(&["1.2.1"], &["1.2.2"]);
            let r = refusals(judge_ok(status, &answer, &parts[..2]));
            assert_eq!(
                (r.stored.as_slice(), r.refused.len()),
                (&[0][..], 1),
                "{status}"
            );
        }
        // Alone, an instance the store names by another UID is still the one refused.
        let answer = orthanc_answer(&[], &["9.9.9"]);
        let r = refusals(judge_ok(StatusCode::CONFLICT, &answer, &parts[..1]));
        assert!(r.unaccounted.is_empty() && r.stored.is_empty());
        assert_eq!(r.refused[0].0, 0);
        // Orthanc's answer to one instance it cannot parse: named nowhere.
        let answer = orthanc_answer(&[], &[]);
        let r = refusals(judge_ok(StatusCode::BAD_REQUEST, &answer, &parts[2..3]));
        assert_eq!(r.unaccounted, [0]);
        assert!(
            r.why.contains("named it neither stored nor failed"),
            "{}",
            r.why
        );
        // A file whose meta header names no UID is never counted as stored.
        let plain = [part("x", 1)];
        let answer = orthanc_answer(&["1.2.1"], &[]);
        let r = refusals(judge_ok(StatusCode::BAD_REQUEST, &answer, &plain));
        assert_eq!(r.unaccounted, [0]);
    }

    #[test]
    fn a_4xx_about_the_instances_is_split_and_one_about_the_request_is_final() {
        let parts = [part("a", 1), part("b", 1)];
        // About what the request carried: each instance gets its own answer.
        for (status, body) in [
            (StatusCode::BAD_REQUEST, &b"<html>bad</html>"[..]),
            (StatusCode::PAYLOAD_TOO_LARGE, b"too big"),
            (StatusCode::UNPROCESSABLE_ENTITY, b""),
            (StatusCode::CONFLICT, b"{}"),
            (StatusCode::FORBIDDEN, br#"{"00081198":{"vr":"SQ"}}"#),
        ] {
            let r = refusals(judge(status, Some(Duration::from_secs(5)), body, &parts));
            assert_eq!(r.unaccounted, [0, 1], "{status}");
            assert!(
                r.why.contains(&format!("the store answered {status}")),
                "{}",
                r.why
            );
        }
        let r = refusals(judge_ok(StatusCode::PAYLOAD_TOO_LARGE, b"too big", &parts));
        assert_eq!(r.why, "the store answered 413 Payload Too Large: too big");
        // About the request as a whole: final for the transfer, with the store's words.
        for (status, body, want) in [
            (
                StatusCode::FORBIDDEN,
                &b"no write access"[..],
                "403 Forbidden: no write access",
            ),
            (StatusCode::UNAUTHORIZED, b"", "401 Unauthorized"),
            (StatusCode::NOT_FOUND, b"no such path", "404 Not Found"),
            (StatusCode::METHOD_NOT_ALLOWED, b"", "405 "),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, b"", "415 "),
            (StatusCode::MOVED_PERMANENTLY, b"", "301 Moved Permanently"),
        ] {
            let e = judge(status, Some(Duration::from_secs(5)), body, &parts).unwrap_err();
            assert!(e.downcast_ref::<Undeliverable>().is_some(), "{status}: {e}");
            assert!(e.downcast_ref::<Transient>().is_none(), "{status}: {e}");
            assert!(e.to_string().contains(want), "{status}: {e}");
        }
    }

    #[test]
    fn the_meta_header_names_the_instance() {
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        let mut element = |tag: u16, vr: &[u8; 2], value: &[u8]| {
            file.extend_from_slice(&2u16.to_le_bytes());
            file.extend_from_slice(&tag.to_le_bytes());
            file.extend_from_slice(vr);
            if crate::dicom::reader::long_length(vr) {
                file.extend_from_slice(&[0, 0]);
                file.extend_from_slice(&(value.len() as u32).to_le_bytes());
            } else {
                file.extend_from_slice(&(value.len() as u16).to_le_bytes());
            }
            file.extend_from_slice(value);
        };
        element(0x0000, b"UL", &[0; 4]);
        element(0x0001, b"OB", &[0, 1]);
        element(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        element(0x0003, b"UI", b"1.2.826.0.1.3680043.10.543.7\0");
        element(0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        let full = meta_uids(&file);
        assert_eq!(full.class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(
            full.instance.as_deref(),
            Some("1.2.826.0.1.3680043.10.543.7")
        );
        // Cut inside the instance UID: the class is known, the instance is not.
        let cut = meta_uids(&file[..file.len() - 30]);
        assert_eq!(
            cut,
            Uids {
                instance: None,
                class: full.class.clone()
            }
        );
        // No meta header at all, or a malformed UID.
        assert_eq!(meta_uids(&file[..132]), Uids::default());
        let mut bad = file.clone();
        let at = bad.windows(5).position(|w| w == b"1.2.8").unwrap();
        bad[at] = b'x';
        assert_eq!(meta_uids(&bad).class, None);
        // Random bytes never panic.
        for n in 0..2000u32 {
            let junk: Vec<u8> = (0..300).map(|i| ((i * 31 + n * 17) % 251) as u8).collect();
            let mut f = file[..132].to_vec();
            f.extend_from_slice(&[2, 0]);
            f.extend_from_slice(&junk);
            let _ = meta_uids(&f);
        }
    }

    #[test]
    fn the_summary_names_each_refused_instance_within_bounds() {
        let r = |n: usize| RefusedInstance {
            file: format!("i{n}.dcm"),
            sop_instance_uid: if n == 0 {
                String::new()
            } else {
                format!("1.2.{n}")
            },
            sop_class_uid: String::new(),
            failure_reason: None,
            reason: "the store answered 400 Bad Request".into(),
        };
        assert_eq!(
            summary(&[r(0), r(1)]),
            "2 instances refused: i0.dcm: the store answered 400 Bad Request; \
             i1.dcm (1.2.1): the store answered 400 Bad Request"
        );
        let many: Vec<RefusedInstance> = (0..500).map(r).collect();
        let s = summary(&many);
        assert!(s.len() < 4200, "{}", s.len());
        assert!(
            s.starts_with("500 instances refused: ") && s.ends_with("more"),
            "{s}"
        );
    }

    #[test]
    fn an_answer_a_retry_can_fix_is_retried_with_the_stores_retry_after() {
        let parts = [part("a", 1)];
        for (status, cause) in [
            (StatusCode::INTERNAL_SERVER_ERROR, Cause::ServerError),
            (StatusCode::BAD_GATEWAY, Cause::ServerError),
            (StatusCode::SERVICE_UNAVAILABLE, Cause::ServerError),
            (StatusCode::GATEWAY_TIMEOUT, Cause::ServerError),
            (StatusCode::REQUEST_TIMEOUT, Cause::Throttled),
            (StatusCode::TOO_MANY_REQUESTS, Cause::Throttled),
        ] {
            let e = judge_ok(status, b"busy", &parts).unwrap_err();
            let t = transient(&e);
            assert_eq!(t.cause, cause, "{status}");
            assert_eq!(t.retry_after, None);
            assert!(e.to_string().contains(status.as_str()), "{e}");
            let later = Some(Duration::from_secs(7));
            let e = judge(status, later, b"busy", &parts).unwrap_err();
            assert_eq!(transient(&e).retry_after, later, "{status}");
        }
        // Marked through the request's context too (the worker sees it so).
        let e = judge_ok(StatusCode::SERVICE_UNAVAILABLE, b"busy", &parts)
            .context("POST http://s/studies")
            .unwrap_err();
        assert_eq!(transient(&e).cause, Cause::ServerError);
    }

    #[test]
    fn the_confirmation_record_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stow.acked");
        assert!(Acked::load(&path).batches.is_empty(), "none yet");
        let acked = Acked {
            batches: vec![AckedBatch {
                files: vec!["a.dcm".into(), "b.dcm".into()],
                retrieve_url: Some("http://s/studies/1".into()),
            }],
            refused: vec![RefusedRecord {
                file: "c.dcm".into(),
                sop_instance_uid: Some("1.2.3".into()),
                sop_class_uid: None,
                failure_reason: Some(0xc000),
                reason: "the store answered 400 Bad Request".into(),
            }],
            ended: true,
        };
        write_atomic(&path, &serde_json::to_vec(&acked).unwrap()).unwrap();
        let back = Acked::load(&path);
        assert_eq!(back.batches.len(), 1);
        assert_eq!(back.batches[0].files, ["a.dcm", "b.dcm"]);
        assert_eq!(
            back.batches[0].retrieve_url.as_deref(),
            Some("http://s/studies/1")
        );
        assert_eq!(back.refused.len(), 1);
        assert_eq!(back.refused[0].failure_reason, Some(0xc000));
        assert!(back.ended);
        // A record written before refusals were kept still reads.
        std::fs::write(
            &path,
            br#"{"batches":[{"files":["a.dcm"],"retrieve_url":null}]}"#,
        )
        .unwrap();
        let old = Acked::load(&path);
        assert_eq!(old.batches.len(), 1);
        assert!(old.refused.is_empty() && !old.ended);
        std::fs::write(&path, b"{\"batches\":[{").unwrap();
        assert!(Acked::load(&path).batches.is_empty(), "damaged: send all");
    }
}
