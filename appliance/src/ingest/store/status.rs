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
            st.state = state;
            st.stages.push(Stage {
                stage: state,
                at: now_rfc3339(),
            });
            if error.is_some() {
                st.error = error;
            }
            if state == TransferState::Committed {
                st.receipt = receipt_info(&dir);
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

    /// [`IngestStore::status`], answered once the state differs from what it was when asked,
    /// the state is final (`committed`, `delivered`, `refused`, `failed`), or `wait` has
    /// passed, whichever comes first (a long poll: clients need not poll in a loop).
    pub async fn status_after_change(
        &self,
        hospital: &str,
        id: &TransferId,
        wait: Duration,
    ) -> Result<TransferStatus, IngestError> {
        let mut changes = self.inner.changes.subscribe();
        let first = self.status(hospital, id).await?;
        if wait.is_zero() || first.state.is_final() {
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
        if st.receipt.is_some() || self.dir(id).receipt_sig().exists() {
            st.downloads = Some(Downloads {
                receipt: format!("/v1/transfers/{id}/receipt"),
                proof: format!("/v1/transfers/{id}/proof"),
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
        if let Ok(text) = std::fs::read(e.path())
            && let Ok(r) = serde_json::from_slice::<FileRecord>(&text)
        {
            n += 1;
            bytes += r.size;
        }
    }
    (n, bytes)
}
