//! What a hospital reads about its transfers: the state machine ([`TransferState`]), the
//! stages recorded in `status.json` (`add_stage` and `set_association_end`, its only writers
//! after the declaration), `GET /v1/transfers/{id}` with its long poll, and the evidence
//! downloads (the gateway's signed receipt, the audit inclusion proof).
//!
//! What this file must not do: change a transfer's payload, manifest or audit records, or
//! answer another hospital's transfer (every read checks the owner first).

use std::time::Duration;

use base64::Engine;
use baylink_net::proto::TransferId;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    FileRecord, IngestError, IngestStore, blocking, files_dir, internal, lock, now_rfc3339,
    status_path,
};
use crate::transfer_dir::{TransferDir, write_atomic};

/// Where a transfer is (the status's `state`, `docs/interface.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    /// Declared, accepted by the checkpoint, no file yet.
    Declared,
    /// At least one file upload has begun.
    Receiving,
    /// Committed by the hospital: manifest signed, payload durable in the spool.
    Sealed,
    /// Being sent to the gateway.
    Sending,
    /// The gateway's receipt arrived and verified.
    Committed,
    /// Delivered downstream (reported by the gateway).
    Delivered,
    /// Delivered downstream but for the instances the record store refused (listed in the
    /// delivery notice, `GET /v1/transfers/{id}/delivery`).
    Partial,
    /// Refused (by policy at send time, or by the gateway).
    Refused,
    /// Gave up (link down longer than `transport.retry_for`, or an internal failure).
    Failed,
}

impl TransferState {
    /// No further state follows (a `committed` transfer may still become `delivered`, but its
    /// receipt is final).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TransferState::Committed
                | TransferState::Delivered
                | TransferState::Partial
                | TransferState::Refused
                | TransferState::Failed
        )
    }
}

/// One stage a transfer reached, with its time (RFC 3339, UTC).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    /// The state entered.
    pub stage: TransferState,
    /// When.
    pub at: String,
}

/// The gateway's receipt, as the hospital may keep it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptInfo {
    /// Merkle root over every chunk digest, hex.
    pub merkle_root: String,
    /// The receipt bytes the gateway's HSM signed, base64.
    pub receipt: String,
    /// The gateway's signature over them, base64.
    pub signature: String,
}

/// What `GET /v1/transfers/{id}` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferStatus {
    /// Transfer id.
    pub id: String,
    /// Current state.
    pub state: TransferState,
    /// Finished files.
    pub files: usize,
    /// Payload bytes of finished files.
    pub bytes: u64,
    /// Every stage reached, oldest first.
    pub stages: Vec<Stage>,
    /// The verified receipt, once committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<ReceiptInfo>,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the receipt and the audit proof can be downloaded, once there is a receipt
    /// (computed when the status is read, never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloads: Option<Downloads>,
    /// A C-STORE association's transfer: how the association ended (absent while it is
    /// still open, and for HTTPS uploads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub association_end: Option<AssociationEnd>,
}

/// How the C-STORE association behind a transfer ended (`association_end` in its status,
/// and the `detail` of its `sealed` audit record). Whatever the end, every instance answered
/// Success is in the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssociationEnd {
    /// A-RELEASE: the peer ended it normally.
    Released,
    /// The peer sent A-ABORT.
    AbortedByPeer,
    /// Silent for `ingest.dicom_idle_timeout`; the edge aborted it.
    IdleTimeout,
    /// The TCP connection closed or failed without A-RELEASE or A-ABORT.
    ConnectionLost,
    /// The edge aborted it: the peer broke the protocol (an unexpected PDU or command, a
    /// malformed command set, A-RELEASE in the middle of an instance).
    AbortedByEdge,
    /// The edge stopped (crash, kill, power loss) while the association was open; start-up
    /// sealed what had been answered Success.
    InterruptedByRestart,
    /// The edge was shutting down (SIGTERM) and the association was still open when
    /// `drain.timeout` ran out: the edge aborted it and sealed what had been answered Success.
    EdgeShutdown,
}

impl AssociationEnd {
    /// The value as it appears in the status (`aborted-by-peer`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            AssociationEnd::Released => "released",
            AssociationEnd::AbortedByPeer => "aborted-by-peer",
            AssociationEnd::IdleTimeout => "idle-timeout",
            AssociationEnd::ConnectionLost => "connection-lost",
            AssociationEnd::AbortedByEdge => "aborted-by-edge",
            AssociationEnd::InterruptedByRestart => "interrupted-by-restart",
            AssociationEnd::EdgeShutdown => "edge-shutdown",
        }
    }

    /// Whether the association ended with A-RELEASE.
    pub fn is_release(self) -> bool {
        self == AssociationEnd::Released
    }
}

impl std::fmt::Display for AssociationEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Links to a transfer's downloadable evidence (`GET /v1/transfers/{id}` `downloads`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Downloads {
    /// `/v1/transfers/{id}/receipt`: the gateway's signed receipt.
    pub receipt: String,
    /// `/v1/transfers/{id}/proof`: the audit inclusion proof.
    pub proof: String,
    /// `/v1/transfers/{id}/delivery`: the gateway's signed delivery notice, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
}

/// The gateway's signed delivery notice as the edge stores it, with what is needed to verify
/// it (`GET /v1/transfers/{id}/delivery`, `application/json`).
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryDownload {
    /// Always `baylink-delivery-notice/1`.
    pub format: &'static str,
    /// Transfer id.
    pub transfer: String,
    /// The notice bytes (`notice.bin`), base64.
    pub notice: String,
    /// The gateway's HSM signature (`notice.sig`), base64: ECDSA P-256 / SHA-256, r ‖ s
    /// (64 bytes), over `signed_prefix` followed by the notice bytes.
    pub signature: String,
    /// The domain-separation prefix signed before the notice bytes.
    pub signed_prefix: String,
    /// The notice's fields, decoded (digests in hex).
    pub fields: baylink_net::proto::DeliveryNotice,
    /// The gateway's public key the edge pinned (`peer.signing_key`), PEM, if readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_public_key: Option<String>,
}

/// The gateway's signed receipt as the edge stores it, with what is needed to verify it
/// (`GET /v1/transfers/{id}/receipt`, `application/json`).
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptDownload {
    /// Always `baylink-receipt/1`.
    pub format: &'static str,
    /// Transfer id.
    pub transfer: String,
    /// The receipt bytes (`receipt.bin`), base64.
    pub receipt: String,
    /// The gateway's HSM signature (`receipt.sig`), base64: ECDSA P-256 / SHA-256 as the
    /// PKCS#11 token gives it (r ‖ s, 64 bytes, IEEE P1363), over `signed_prefix` followed
    /// by the receipt bytes.
    pub signature: String,
    /// The domain-separation prefix signed before the receipt bytes.
    pub signed_prefix: String,
    /// The sealed manifest (`manifest.bin`) the receipt confirms, base64.
    pub manifest: String,
    /// The manifest's Merkle root, hex (also inside the receipt).
    pub merkle_root: String,
    /// The process id: the consent reference the transfer was allowed under (also inside
    /// the manifest and the receipt).
    pub process_id: String,
    /// The gateway's public key the edge pinned (`peer.signing_key`), PEM, if readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_public_key: Option<String>,
}

impl IngestStore {
    /// Records in transfer `id`'s status how its C-STORE association ended (before it is
    /// sealed, so the status never shows a sealed association transfer without it).
    pub(super) async fn set_association_end(
        &self,
        id: &TransferId,
        end: AssociationEnd,
    ) -> Result<(), IngestError> {
        let _guard = self.inner.status_lock.lock().await;
        let dir = self.dir(id);
        let res = blocking(move || {
            let path = status_path(&dir);
            let text = std::fs::read(&path).map_err(internal("status.json"))?;
            let mut st: TransferStatus = serde_json::from_slice(&text)
                .map_err(|e| IngestError::Internal(format!("status.json: {e}")))?;
            st.association_end = Some(end);
            let out =
                serde_json::to_vec_pretty(&st).map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&path, &out).map_err(internal("status.json"))
        })
        .await;
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
        res
    }

    pub(super) async fn add_stage(
        &self,
        id: &TransferId,
        state: TransferState,
        error: Option<String>,
    ) {
        let _guard = self.inner.status_lock.lock().await;
        let dir = self.dir(id);
        let res = blocking(move || {
            let path = status_path(&dir);
            let text = std::fs::read(&path).map_err(internal("status.json"))?;
            let mut st: TransferStatus = serde_json::from_slice(&text)
                .map_err(|e| IngestError::Internal(format!("status.json: {e}")))?;
            if st.state == state {
                return Ok(());
            }
            let notice = crate::notice::stored(&dir);
            if state == TransferState::Committed
                && notice.is_some()
                && st.stages.last().is_some_and(|s| {
                    matches!(
                        s.stage,
                        TransferState::Delivered | TransferState::Partial | TransferState::Failed
                    )
                })
            {
                // The delivery notice overtook the stored receipt: keep its state, and put
                // `committed` where it belongs, before it.
                st.receipt = receipt_info(&dir);
                let at = st.stages.len() - 1;
                st.stages.insert(
                    at,
                    Stage {
                        stage: TransferState::Committed,
                        at: now_rfc3339(),
                    },
                );
            } else {
                // From `committed`, only the delivery notice moves a transfer on.
                let at = if st.state == TransferState::Committed && notice.is_some() {
                    notice_stored_at(&dir)
                } else {
                    now_rfc3339()
                };
                st.state = state;
                st.stages.push(Stage { stage: state, at });
                if error.is_some() {
                    st.error = error;
                }
                if state == TransferState::Committed {
                    st.receipt = receipt_info(&dir);
                    // The notice came before the receipt was stored: it moves the transfer
                    // on at once.
                    if let Some(n) = &notice {
                        let (next, error) = delivery_state(n);
                        st.state = next;
                        st.stages.push(Stage {
                            stage: next,
                            at: notice_stored_at(&dir),
                        });
                        if error.is_some() {
                            st.error = error;
                        }
                    }
                }
            }
            if matches!(state, TransferState::Sealed) {
                let (files, bytes) = finished_files(&dir);
                st.files = files;
                st.bytes = bytes;
            }
            let out =
                serde_json::to_vec_pretty(&st).map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&path, &out).map_err(internal("status.json"))
        })
        .await;
        if let Err(e) = res {
            warn!(transfer = %id, error = %e, "cannot record the transfer's status");
        }
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The edge stored the gateway's delivery notice of a transfer: a hospital upload moves
    /// to `delivered`, to `partial` naming the refused instances, or to `failed` with the
    /// store's reason (long polls wake). A transfer
    /// that is not a hospital upload (a `baylink send`) has no status to move.
    pub async fn delivery_noticed(&self, notice: &baylink_net::proto::DeliveryNotice) {
        let dir = self.dir(&notice.transfer_id);
        // Before its receipt is stored the transfer is not `committed` yet: that step picks
        // the stored notice up (`add_stage`).
        if !super::is_ingest_transfer(&dir) || !status_path(&dir).exists() || !dir.has_receipt() {
            return;
        }
        let (state, error) = delivery_state(notice);
        self.add_stage(&notice.transfer_id, state, error).await;
    }

    /// [`IngestStore::status`], answered once the state differs from what it was when asked,
    /// the state is final (`committed`, `delivered`, `refused`, `failed`), or `wait` has
    /// passed, whichever comes first (a long poll: clients need not poll in a loop). A
    /// `committed` transfer is waited on too: its delivery notice moves it on.
    pub async fn status_after_change(
        &self,
        hospital: &str,
        id: &TransferId,
        wait: Duration,
    ) -> Result<TransferStatus, IngestError> {
        let mut changes = self.inner.changes.subscribe();
        let first = self.status(hospital, id).await?;
        if wait.is_zero() || (first.state.is_final() && first.state != TransferState::Committed) {
            return Ok(first);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    let st = self.status(hospital, id).await?;
                    if st.state != first.state {
                        return Ok(st);
                    }
                }
                Ok(Err(_)) | Err(_) => return self.status(hospital, id).await,
            }
        }
    }

    /// The status of transfer `id` as `hospital` may see it.
    pub async fn status(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<TransferStatus, IngestError> {
        if self.owner(id).as_deref() != Some(hospital) {
            return Err(IngestError::NotFound);
        }
        let open = lock(&self.inner.open).get(id).cloned();
        let _guard = self.inner.status_lock.lock().await;
        let dir = self.dir(id);
        let mut st = blocking(move || {
            let text = std::fs::read(status_path(&dir)).map_err(internal("status.json"))?;
            serde_json::from_slice::<TransferStatus>(&text)
                .map_err(|e| IngestError::Internal(format!("status.json: {e}")))
        })
        .await?;
        if let Some(t) = open {
            let s = lock(&t.state);
            st.files = s.files.len();
            st.bytes = s.files.values().sum();
        }
        let dir = self.dir(id);
        // A notice stored by another process (a `send --wait-delivered` collected it) counts
        // as well as one this process recorded.
        let notice = if dir.has_notice() {
            let d = dir.clone();
            blocking(move || Ok(crate::notice::stored(&d))).await?
        } else {
            None
        };
        // The notice is stored before its stage is written (`delivery_noticed`): show the
        // stage it brings, at the time it was stored, as that step will write it.
        if let Some(n) = &notice
            && st.state == TransferState::Committed
        {
            let (state, error) = delivery_state(n);
            st.state = state;
            let d = dir.clone();
            st.stages.push(Stage {
                stage: state,
                at: blocking(move || Ok(notice_stored_at(&d))).await?,
            });
            if error.is_some() {
                st.error = error;
            }
        }
        if st.receipt.is_some() || dir.receipt_sig().exists() {
            st.downloads = Some(Downloads {
                receipt: format!("/v1/transfers/{id}/receipt"),
                proof: format!("/v1/transfers/{id}/proof"),
                delivery: notice
                    .is_some()
                    .then(|| format!("/v1/transfers/{id}/delivery")),
            });
        }
        Ok(st)
    }

    /// The transfer's state, if `hospital` owns it (else [`IngestError::NotFound`]), and a
    /// conflict naming the state unless the receipt is stored.
    async fn receipted(&self, hospital: &str, id: &TransferId) -> Result<(), IngestError> {
        let st = self.status(hospital, id).await?;
        if st.downloads.is_none() {
            return Err(IngestError::Conflict(format!(
                "no receipt yet: the transfer is {}",
                serde_json::to_value(st.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The gateway's signed receipt of transfer `id` for `hospital` (404 for another
    /// hospital's transfer or an unknown id, 409 before the receipt arrived).
    pub async fn receipt(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<ReceiptDownload, IngestError> {
        self.receipted(hospital, id).await?;
        let dir = self.dir(id);
        let key_path = self.inner.edge.config().peer_signing_key.clone();
        let id = id.to_string();
        blocking(move || {
            let b64 = base64::engine::general_purpose::STANDARD;
            let receipt = std::fs::read(dir.receipt_bin()).map_err(internal("receipt.bin"))?;
            let signature = std::fs::read(dir.receipt_sig()).map_err(internal("receipt.sig"))?;
            let manifest = std::fs::read(dir.manifest_bin()).map_err(internal("manifest.bin"))?;
            let m = baylink_net::proto::Manifest::from_bytes(&manifest, &Default::default())
                .map_err(|e| IngestError::Internal(format!("manifest.bin: {e}")))?;
            Ok(ReceiptDownload {
                format: "baylink-receipt/1",
                transfer: id,
                receipt: b64.encode(receipt),
                signature: b64.encode(signature),
                signed_prefix: String::from_utf8_lossy(crate::signing::RECEIPT_CONTEXT)
                    .into_owned(),
                manifest: b64.encode(&manifest),
                merkle_root: hex::encode(m.merkle_root),
                process_id: m.process_id,
                gateway_public_key: std::fs::read_to_string(&key_path).ok(),
            })
        })
        .await
    }

    /// The gateway's signed delivery notice of transfer `id` for `hospital` (404 for another
    /// hospital's transfer or an unknown id, 409 before the notice arrived).
    pub async fn delivery(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<DeliveryDownload, IngestError> {
        let st = self.status(hospital, id).await?;
        if st
            .downloads
            .as_ref()
            .and_then(|d| d.delivery.as_ref())
            .is_none()
        {
            return Err(IngestError::Conflict(format!(
                "no delivery notice yet: the transfer is {}",
                serde_json::to_value(st.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        let dir = self.dir(id);
        let key_path = self.inner.edge.config().peer_signing_key.clone();
        let id = id.to_string();
        blocking(move || {
            let b64 = base64::engine::general_purpose::STANDARD;
            let notice = std::fs::read(dir.notice_bin()).map_err(internal("notice.bin"))?;
            let signature = std::fs::read(dir.notice_sig()).map_err(internal("notice.sig"))?;
            let fields = baylink_net::proto::DeliveryNotice::from_bytes(&notice)
                .map_err(|e| IngestError::Internal(format!("notice.bin: {e}")))?;
            Ok(DeliveryDownload {
                format: "baylink-delivery-notice/1",
                transfer: id,
                notice: b64.encode(&notice),
                signature: b64.encode(signature),
                signed_prefix: String::from_utf8_lossy(crate::signing::DELIVERY_NOTICE_CONTEXT)
                    .into_owned(),
                fields,
                gateway_public_key: std::fs::read_to_string(&key_path).ok(),
            })
        })
        .await
    }

    /// The audit inclusion proof of transfer `id`'s records (the JSON of `baylink audit
    /// prove --transfer ID`), for `hospital`; signs a checkpoint first so the proof covers
    /// every record written so far.
    pub async fn proof(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<crate::audit::Proof, IngestError> {
        self.receipted(hospital, id).await?;
        let log = self.inner.edge.audit();
        log.checkpoint()
            .await
            .map_err(|e| IngestError::Internal(format!("audit log: {e}")))?;
        let dir = log.dir().to_owned();
        let id = id.to_string();
        blocking(move || {
            crate::audit::prove(&dir, &id)
                .map_err(|e| IngestError::Internal(format!("audit proof: {e}")))
        })
        .await
    }
}

/// When the edge stored the delivery notice of `dir` (its file's modification time), for
/// the stage it brings; now if that cannot be read.
fn notice_stored_at(dir: &TransferDir) -> String {
    std::fs::metadata(dir.notice_bin())
        .and_then(|m| m.modified())
        .map_or_else(
            |_| now_rfc3339(),
            |t| humantime::format_rfc3339_millis(t).to_string(),
        )
}

/// The state a delivery notice moves a committed transfer to, and the error it shows.
fn delivery_state(n: &baylink_net::proto::DeliveryNotice) -> (TransferState, Option<String>) {
    match n.outcome {
        baylink_net::proto::Outcome::Delivered => (TransferState::Delivered, None),
        baylink_net::proto::Outcome::Partial => (
            TransferState::Partial,
            Some(format!(
                "the record store refused {} of its instances (the others are stored): {}",
                n.refused_total,
                refused_line(n)
            )),
        ),
        baylink_net::proto::Outcome::Undeliverable => (
            TransferState::Failed,
            Some(format!(
                "the record store refused it; the gateway set it aside as undeliverable: {}",
                n.answer
            )),
        ),
    }
}

/// The refused instances of a notice in one line: `<SOP Instance UID or file>: <reason>; …`
/// (at most 4 KiB; the whole list is in the notice).
fn refused_line(n: &baylink_net::proto::DeliveryNotice) -> String {
    let mut out = String::new();
    for (i, r) in n.refused.iter().enumerate() {
        let who = if r.sop_instance_uid.is_empty() {
            &r.file
        } else {
            &r.sop_instance_uid
        };
        let item = format!("{who}: {}", r.reason);
        if out.len() + item.len() > 4096 {
            out.push_str(&format!("; and {} more", n.refused_total as usize - i));
            return out;
        }
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&item);
    }
    if (n.refused_total as usize) > n.refused.len() {
        out.push_str(&format!(
            "; and {} more",
            n.refused_total as usize - n.refused.len()
        ));
    }
    out
}

fn receipt_info(dir: &TransferDir) -> Option<ReceiptInfo> {
    let receipt = std::fs::read(dir.receipt_bin()).ok()?;
    let signature = std::fs::read(dir.receipt_sig()).ok()?;
    let manifest = std::fs::read(dir.manifest_bin()).ok()?;
    let m = baylink_net::proto::Manifest::from_bytes(&manifest, &Default::default()).ok()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(ReceiptInfo {
        merkle_root: hex::encode(m.merkle_root),
        receipt: b64.encode(receipt),
        signature: b64.encode(signature),
    })
}

fn finished_files(dir: &TransferDir) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(files_dir(dir)) else {
        return (0, 0);
    };
    let mut n = 0;
    let mut bytes = 0;
    for e in entries.filter_map(Result::ok) {
        // A record still under its temporary name is not a finished file.
        if e.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        if let Ok(text) = std::fs::read(e.path())
            && let Ok(r) = serde_json::from_slice::<FileRecord>(&text)
        {
            n += 1;
            bytes += r.size;
        }
    }
    (n, bytes)
}
