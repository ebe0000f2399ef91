//! Delivery by DICOMweb STOW-RS (PS3.18 §10.5) into the health-record store.
//!
//! A committed transfer is POSTed to `{url}/studies` as `multipart/related;
//! type="application/dicom"`, one part per file, in requests of at most `delivery.batch_bytes`
//! of files (a file larger than that goes alone). Each body streams from the spool (through
//! the io_uring spool thread, `O_DIRECT`, pooled buffers handed to hyper without a copy)
//! with an exact `Content-Length`.
//!
//! The store's answer decides, request by request: HTTP 200 with every instance of the
//! request in ReferencedSOPSequence (0008,1199) and none in FailedSOPSequence (0008,1198)
//! confirms the request. A store that refuses instances (202 or 409, any instance in
//! FailedSOPSequence, or 400 with a STOW-RS answer), any other answer the store will repeat
//! (another 4xx such as 403, 404, 413 or 415, a redirect) or a file that is not DICOM Part 10
//! makes the transfer [`Undeliverable`] at once: sending it again cannot help, so it is set
//! aside with the store's status and reasons (FailureReason (0008,1197) per refused
//! instance) and the queue moves on. What a retry can fix is [`Transient`] and retried with
//! jittered backoff by the worker: no connection, a time-out, 5xx, 408, 425, 429 (after the
//! store's `Retry-After`), or a 200 that does not confirm every instance.
//!
//! Each confirmed request is recorded durably in the transfer's `stow.acked` (its files and
//! the RetrieveURL it gave; written atomically: temporary file, fsync, rename, directory
//! fsync) before the next one is sent, so a retry after a later request failed, or a restart,
//! sends only what the store has not confirmed. The delivery's location is the first
//! RetrieveURL of the whole transfer, whichever attempt got it.
//!
//! `https://` stores are verified against `delivery.ca` only (no system roots) and may ask
//! for the gateway's client certificate (`delivery.cert`, `delivery.key`); TLS 1.3 or 1.2,
//! aws-lc-rs with X25519MLKEM768 preferred, like every other TLS endpoint of baylink.
//!
//! Sending instances the store already holds again is harmless (STOW-RS stores by SOP
//! Instance UID), so a request interrupted by a crash before its confirmation was recorded
//! is simply repeated.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use baylink_net::spool::{Spool, SpoolFile};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

use super::retry::{Cause, Transient, Verdict, classify, parse_retry_after};
use super::{Deliver, Undeliverable};
use crate::config::DeliveryTls;
use crate::dicom::part10;
use crate::transfer_dir::{TransferDir, write_atomic};
use baylink_net::proto::Manifest;
use baylink_net::transport::{TlsIdentity, load_ca, root_store};
use rustls_pki_types::ServerName;

/// Default most file bytes per STOW-RS request (`delivery.batch_bytes`).
pub const DEFAULT_BATCH_BYTES: u64 = 1 << 30;
/// Largest `delivery.batch_bytes`: Orthanc refuses request bodies of 4 GiB and more.
pub const MAX_BATCH_BYTES: u64 = (4 << 30) - (16 << 20);
/// Time to open the TCP connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request may take this long plus one second per [`SLOWEST_BYTES_PER_SECOND`] of body.
const BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest store throughput tolerated before a request counts as hung.
const SLOWEST_BYTES_PER_SECOND: u64 = 10 * 1024 * 1024;
/// Largest store response read (the DICOM JSON of a batch's references).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

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
    /// Set for an `https://` store.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Most file bytes per request (`delivery.batch_bytes`).
    batch_bytes: u64,
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
            .finish()
    }
}

impl DicomWebDelivery {
    /// Delivers to the DICOMweb base `url` (with `tls` for an `https://` one), reading the
    /// files through `spool` and driving requests on `runtime`.
    pub fn new(
        url: &str,
        tls: Option<&DeliveryTls>,
        spool: Spool,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<DicomWebDelivery> {
        let url = StowUrl::parse(url)?;
        let tls = match (url.https, tls) {
            (true, Some(tls)) => {
                let name = ServerName::try_from(url.host.clone())
                    .with_context(|| format!("`{}` is not a valid TLS server name", url.host))?;
                Some((tokio_rustls::TlsConnector::from(client_config(tls)?), name))
            }
            (true, None) => bail!("an https:// store needs delivery.ca"),
            (false, Some(_)) => bail!("delivery.ca, cert and key apply to https:// URLs"),
            (false, None) => None,
        };
        Ok(DicomWebDelivery {
            url,
            tls,
            batch_bytes: DEFAULT_BATCH_BYTES,
            spool,
            runtime,
        })
    }

    /// Sets the most file bytes per request.
    pub fn with_batch_bytes(mut self, bytes: u64) -> DicomWebDelivery {
        self.batch_bytes = bytes.max(1);
        self
    }

    async fn deliver_async(
        &self,
        dir: &TransferDir,
        manifest: &Manifest,
    ) -> anyhow::Result<String> {
        let acked_path = dir.stow_acked();
        let mut acked = Acked::load(&acked_path);
        let confirmed: HashSet<String> = acked
            .batches
            .iter()
            .flat_map(|b| b.files.iter().cloned())
            .collect();
        let mut files = Vec::with_capacity(manifest.files.len());
        for f in &manifest.files {
            if confirmed.contains(&f.name) {
                continue;
            }
            let path = dir.data_file(&f.name);
            check_part10(&path, &f.name).await?;
            files.push(Part {
                path,
                name: f.name.clone(),
                len: f.size,
            });
        }
        let skipped = manifest.files.len() - files.len();
        if skipped > 0 {
            tracing::info!(
                transfer = %manifest.transfer_id,
                confirmed = skipped,
                left = files.len(),
                "STOW-RS: instances the store already confirmed are not sent again"
            );
        }
        for batch in batches(&files, self.batch_bytes) {
            let retrieve_url = self.post(batch).await?;
            acked.batches.push(AckedBatch {
                files: batch.iter().map(|p| p.name.clone()).collect(),
                retrieve_url,
            });
            // Durable before the next request: a later failure or a crash does not send
            // this batch again. Not recorded: the error retries the delivery, and the batch
            // is sent again (harmless).
            let json = serde_json::to_vec(&acked).context("encoding stow.acked")?;
            write_atomic(&acked_path, &json)
                .with_context(|| format!("cannot record {}", acked_path.display()))?;
        }
        Ok(acked
            .batches
            .iter()
            .find_map(|b| b.retrieve_url.clone())
            .unwrap_or_else(|| self.url.studies_url()))
    }

    /// One STOW-RS request; returns the store's RetrieveURL (0008,1190) if it gave one.
    async fn post(&self, parts: &[Part]) -> anyhow::Result<Option<String>> {
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

        let limit = BASE_TIMEOUT + Duration::from_secs(length / SLOWEST_BYTES_PER_SECOND);
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
                Some((connector, name)) => {
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
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<String> {
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

/// The rustls client configuration for the store: `tls.ca` only, TLS 1.3 or 1.2, ALPN
/// `http/1.1`, the client certificate when configured.
fn client_config(tls: &DeliveryTls) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = root_store(&load_ca(&tls.ca).context("delivery.ca")?)
        .with_context(|| format!("CA certificate in {} refused", tls.ca.display()))?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let id = TlsIdentity::from_pem_files(cert, key).context("delivery.cert/key")?;
            builder.with_client_cert_resolver(id.resolver())
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One file of a request.
#[derive(Debug, Clone)]
struct Part {
    path: std::path::PathBuf,
    name: String,
    len: u64,
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

/// Refuses a file that is not DICOM Part 10 (no `DICM` after the 128-byte preamble).
async fn check_part10(path: &Path, name: &str) -> anyhow::Result<()> {
    let mut head = [0u8; part10::PREFIX_LEN];
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
    if !part10::has_prefix(&head[..got]) {
        return Err(Undeliverable(format!(
            "{name} is not a DICOM Part 10 file (no DICM prefix); a dicomweb delivery carries \
             DICOM instances only"
        ))
        .into());
    }
    Ok(())
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

/// The requests of a transfer the store has confirmed (`stow.acked`), in order.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Acked {
    batches: Vec<AckedBatch>,
}

/// One confirmed request: the names of its files and the RetrieveURL the store gave.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AckedBatch {
    files: Vec<String>,
    retrieve_url: Option<String>,
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

/// Reads the store's answer to a request that carried `parts`: the RetrieveURL of a full
/// confirmation; [`Undeliverable`] for an answer the store will repeat, [`Transient`] (with
/// the answer's `Retry-After`) for one a retry can fix.
fn judge(
    status: StatusCode,
    retry_after: Option<Duration>,
    answer: &[u8],
    parts: &[Part],
) -> anyhow::Result<Option<String>> {
    let excerpt = || {
        let text = String::from_utf8_lossy(&answer[..answer.len().min(300)]);
        text.chars().filter(|c| !c.is_control()).collect::<String>()
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(answer).ok();
    let failed = json.as_ref().map(failures).unwrap_or_default();
    // 400 with a STOW-RS answer: the store read the request and refused what was in it
    // (Orthanc says so for an instance it cannot parse).
    let stow_answer = json
        .as_ref()
        .is_some_and(|j| j.get("00081198").is_some() || j.get("00081199").is_some());
    let why = || {
        if failed.is_empty() {
            excerpt()
        } else {
            failed.join("; ")
        }
    };
    let refused = matches!(status, StatusCode::ACCEPTED | StatusCode::CONFLICT)
        || (status == StatusCode::BAD_REQUEST && stow_answer);
    if refused || (status == StatusCode::OK && !failed.is_empty()) {
        return Err(
            Undeliverable(format!("the store refused instances ({status}): {}", why())).into(),
        );
    }
    if status != StatusCode::OK {
        let message = format!("the store answered {status}: {}", why());
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
    Ok(values(&json, "00081190")
        .first()
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned))
}

/// The `Value` array of element `tag` in a DICOM JSON object (PS3.18 F.2); empty when the
/// element or its value is absent.
fn values<'a>(json: &'a serde_json::Value, tag: &str) -> &'a [serde_json::Value] {
    json.get(tag)
        .and_then(|e| e.get("Value"))
        .and_then(serde_json::Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// `SOP instance: reason` for every item of FailedSOPSequence (0008,1198).
fn failures(json: &serde_json::Value) -> Vec<String> {
    values(json, "00081198")
        .iter()
        .map(|item| {
            let uid = values(item, "00081155")
                .first()
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?");
            let reason = values(item, "00081197")
                .first()
                .and_then(serde_json::Value::as_u64)
                .map_or_else(|| "no reason given".to_owned(), |c| format!("{c:#06x}"));
            format!("{uid}: failure reason {reason}")
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

    fn judge_ok(
        status: StatusCode,
        answer: &[u8],
        parts: &[Part],
    ) -> anyhow::Result<Option<String>> {
        judge(status, None, answer, parts)
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
            judge_ok(StatusCode::OK, ok, &parts).unwrap().as_deref(),
            Some("http://s/studies/1.2")
        );
        let short = br#"{"00081199":{"vr":"SQ","Value":[{}]}}"#;
        let e = judge_ok(StatusCode::OK, short, &parts).unwrap_err();
        assert!(e.to_string().contains("confirmed 1 of 2"), "{e}");
        assert_eq!(transient(&e).cause, Cause::Incomplete, "worth a retry");
        let e = judge_ok(StatusCode::OK, b"<html>", &parts).unwrap_err();
        assert_eq!(transient(&e).cause, Cause::Incomplete);

        let failed = br#"{"00081198":{"vr":"SQ","Value":[{"00081155":{"vr":"UI","Value":["1.2.3"]},
            "00081197":{"vr":"US","Value":[272]}}]}}"#;
        let e = judge_ok(StatusCode::CONFLICT, failed, &parts).unwrap_err();
        assert!(e.downcast_ref::<Undeliverable>().is_some());
        assert!(
            e.to_string().contains("1.2.3: failure reason 0x0110"),
            "{e}"
        );
        let e = judge_ok(StatusCode::ACCEPTED, failed, &parts).unwrap_err();
        assert!(
            e.downcast_ref::<Undeliverable>().is_some(),
            "some refused: {e}"
        );
        let e = judge_ok(StatusCode::OK, failed, &parts).unwrap_err();
        assert!(e.downcast_ref::<Undeliverable>().is_some(), "{e}");
        // Orthanc's answer to an instance it cannot parse.
        let unparsable = br#"{"00080005":{"Value":["ISO_IR 100"],"vr":"CS"},
            "00081198":{"vr":"SQ"},"00081199":{"vr":"SQ"}}"#;
        let e = judge_ok(StatusCode::BAD_REQUEST, unparsable, &parts).unwrap_err();
        assert!(e.downcast_ref::<Undeliverable>().is_some(), "{e}");
    }

    #[test]
    fn an_answer_the_store_will_repeat_is_final_with_its_reason() {
        let parts = [part("a", 1)];
        // A 4xx is final whatever its body; the status and the store's words are the reason.
        for (status, body, want) in [
            (
                StatusCode::BAD_REQUEST,
                &b"<html>bad</html>"[..],
                "400 Bad Request: <html>bad</html>",
            ),
            (
                StatusCode::FORBIDDEN,
                b"no write access",
                "403 Forbidden: no write access",
            ),
            (StatusCode::NOT_FOUND, b"no such path", "404 Not Found"),
            (StatusCode::PAYLOAD_TOO_LARGE, b"", "413 "),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, b"", "415 "),
            (StatusCode::MOVED_PERMANENTLY, b"", "301 Moved Permanently"),
        ] {
            let e = judge(status, Some(Duration::from_secs(5)), body, &parts).unwrap_err();
            assert!(e.downcast_ref::<Undeliverable>().is_some(), "{status}: {e}");
            assert!(e.downcast_ref::<Transient>().is_none(), "{status}: {e}");
            assert!(e.to_string().contains(want), "{status}: {e}");
        }
        // A 4xx carrying a STOW-RS answer names each refused instance and its FailureReason.
        let refused =
            br#"{"00081198":{"vr":"SQ","Value":[{"00081155":{"vr":"UI","Value":["1.2.9"]},
            "00081197":{"vr":"US","Value":[43264]}}]}}"#;
        let e = judge_ok(StatusCode::UNPROCESSABLE_ENTITY, refused, &parts).unwrap_err();
        assert!(e.downcast_ref::<Undeliverable>().is_some(), "{e}");
        assert!(
            e.to_string().contains("the store answered 422 ")
                && e.to_string().contains(": 1.2.9: failure reason 0xa900"),
            "{e}"
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
        };
        write_atomic(&path, &serde_json::to_vec(&acked).unwrap()).unwrap();
        let back = Acked::load(&path);
        assert_eq!(back.batches.len(), 1);
        assert_eq!(back.batches[0].files, ["a.dcm", "b.dcm"]);
        assert_eq!(
            back.batches[0].retrieve_url.as_deref(),
            Some("http://s/studies/1")
        );
        std::fs::write(&path, b"{\"batches\":[{").unwrap();
        assert!(Acked::load(&path).batches.is_empty(), "damaged: send all");
    }
}
