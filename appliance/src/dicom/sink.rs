//! Where the instances of an association go: the [`AssociationSink`] trait and today's
//! implementation, [`SpoolSendSink`] (a staging directory, then `Edge::send` at release).
//!
//! The trait is deliberately narrow so that a cut-through store (the HTTPS ingest's
//! `IngestStore`) can replace [`SpoolSendSink`] without the SCP changing: the SCP hands over
//! complete, checked instance files and says when the association ended well or badly.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::edge::{Edge, SendRequest};
use crate::policy::Declaration;

/// An association's transfer could not be opened, extended or handed on.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file system operation on the staging area failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Who sent an association's instances and whose they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Identifier of the association (for logs and staging names).
    pub association: uuid::Uuid,
    /// Hospital the calling AE title and address map to.
    pub hospital: String,
    /// The patient all instances of the transfer belong to.
    pub declaration: Declaration,
}

/// The destination of one association's accepted instances: one transfer per association.
///
/// Call order: [`begin`](Self::begin) once (when the first instance is accepted), then
/// [`add_instance`](Self::add_instance) per accepted instance, then exactly one of
/// [`finish`](Self::finish) (A-RELEASE: the instances become one transfer) or
/// [`discard`](Self::discard) (A-ABORT, a dropped connection, a time-out: nothing is sent).
pub trait AssociationSink: Send + Sync + 'static {
    /// The open transfer.
    type Transfer: Send + 'static;

    /// Opens the transfer of an association.
    fn begin(
        &self,
        origin: Origin,
    ) -> impl Future<Output = Result<Self::Transfer, SinkError>> + Send;

    /// Takes over `file`, a complete and checked Part-10 instance, under `name` (already
    /// validated, unique within the transfer). `file` lies on the same file system as the
    /// spool; after the call it belongs to the sink.
    fn add_instance(
        &self,
        transfer: &mut Self::Transfer,
        name: &str,
        file: &Path,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Commits the transfer: the association was released normally. Sending happens in the
    /// background; the call returns once the instances are handed on.
    fn finish(
        &self,
        transfer: Self::Transfer,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Drops the transfer and everything added to it.
    fn discard(&self, transfer: Self::Transfer) -> impl Future<Output = ()> + Send;
}

/// Today's sink: instances are moved into `spool.dir/.staging/<association>/`; at release a
/// background task runs the existing `Edge::send` (seal = copy + hash + HSM-sign, send with
/// retries, verify the receipt) and then removes the staging directory.
#[derive(Debug, Clone)]
pub struct SpoolSendSink {
    edge: Edge,
    staging_root: PathBuf,
}

/// An open transfer of [`SpoolSendSink`].
#[derive(Debug)]
pub struct StagedTransfer {
    origin: Origin,
    dir: PathBuf,
    files: Vec<PathBuf>,
}

/// Name of the staging area under the spool directory (never a transfer id, so spool
/// listings skip it).
pub const STAGING_DIR: &str = ".staging";

impl SpoolSendSink {
    /// A sink staging under `spool_dir/.staging` and sending through `edge`.
    pub fn new(edge: Edge, spool_dir: &Path) -> SpoolSendSink {
        SpoolSendSink {
            edge,
            staging_root: spool_dir.join(STAGING_DIR),
        }
    }

    /// Removes what a previous run left in the staging area (associations that were open or
    /// whose send had not finished sealing when the process stopped). Returns how many.
    pub fn clear_leftovers(spool_dir: &Path) -> usize {
        let root = spool_dir.join(STAGING_DIR);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.filter_map(Result::ok) {
            if std::fs::remove_dir_all(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

impl AssociationSink for SpoolSendSink {
    type Transfer = StagedTransfer;

    async fn begin(&self, origin: Origin) -> Result<StagedTransfer, SinkError> {
        let dir = self.staging_root.join(origin.association.to_string());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| SinkError::Io {
                what: "cannot create",
                path: dir.clone(),
                source,
            })?;
        Ok(StagedTransfer {
            origin,
            dir,
            files: Vec::new(),
        })
    }

    async fn add_instance(
        &self,
        transfer: &mut StagedTransfer,
        name: &str,
        file: &Path,
    ) -> Result<(), SinkError> {
        let to = transfer.dir.join(name);
        tokio::fs::rename(file, &to)
            .await
            .map_err(|source| SinkError::Io {
                what: "cannot move an instance into",
                path: to.clone(),
                source,
            })?;
        transfer.files.push(to);
        Ok(())
    }

    async fn finish(&self, transfer: StagedTransfer) -> Result<(), SinkError> {
        let StagedTransfer { origin, dir, files } = transfer;
        let edge = self.edge.clone();
        let count = files.len();
        info!(
            association = %origin.association,
            hospital = %origin.hospital,
            patient = %origin.declaration.patient_id,
            instances = count,
            "association released: sending its instances as one transfer"
        );
        tokio::spawn(async move {
            let request = SendRequest::New {
                files,
                declaration: origin.declaration,
            };
            match edge.send(request, false, &Default::default()).await {
                Ok(s) => info!(
                    association = %origin.association,
                    transfer = %s.transfer_id,
                    instances = s.files,
                    bytes = s.bytes,
                    "DICOM association delivered: receipt verified"
                ),
                Err(e) => error!(
                    association = %origin.association,
                    error = %e,
                    "DICOM association not delivered"
                ),
            }
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                warn!(path = %dir.display(), error = %e, "cannot remove the staging directory");
            }
        });
        Ok(())
    }

    async fn discard(&self, transfer: StagedTransfer) {
        if let Err(e) = tokio::fs::remove_dir_all(&transfer.dir).await {
            warn!(path = %transfer.dir.display(), error = %e, "cannot remove the staging directory");
        }
    }
}

/// Lets a shared sink be used where a sink is expected.
impl<S: AssociationSink> AssociationSink for Arc<S> {
    type Transfer = S::Transfer;

    fn begin(
        &self,
        origin: Origin,
    ) -> impl Future<Output = Result<Self::Transfer, SinkError>> + Send {
        (**self).begin(origin)
    }

    fn add_instance(
        &self,
        transfer: &mut Self::Transfer,
        name: &str,
        file: &Path,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).add_instance(transfer, name, file)
    }

    fn finish(
        &self,
        transfer: Self::Transfer,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).finish(transfer)
    }

    fn discard(&self, transfer: Self::Transfer) -> impl Future<Output = ()> + Send {
        (**self).discard(transfer)
    }
}
