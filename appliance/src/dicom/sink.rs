//! Where the instances of an association go: the [`AssociationSink`] trait and the edge's
//! implementation, [`StoreSink`] (the hospital ingest store, shared with the HTTPS API).
//!
//! The trait is deliberately narrow: the SCP hands over instances (the first of an
//! association as a complete file, each later one as its bytes arrive), keeps or drops each
//! once it has checked it whole, and says how the association ended; the sink owns
//! everything after that. Whatever the end,
//! every instance the sink took (each answered Success) is sent: that is the C-STORE
//! guarantee (`docs/dicom.md`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

pub use crate::ingest::AssociationEnd;
use crate::ingest::AssociationOutcome;
use crate::policy::{Declaration, Refusal};

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
    /// A policy rule refused the instance (e.g. `deid-unsupported`); already audited.
    #[error("{} (rule {})", .0.reason, .0.rule)]
    Refused(Refusal),
    /// The ingest store refused or failed a step.
    #[error("{what}: {message}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The store's reason.
        message: String,
    },
}

impl SinkError {
    fn store(what: &'static str, e: crate::ingest::IngestError) -> SinkError {
        if let crate::ingest::IngestError::Refused(r) = e {
            return SinkError::Refused(r);
        }
        SinkError::Store {
            what,
            message: e.to_string(),
        }
    }
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
/// Call order: [`begin`](Self::begin) once (when the first instance is accepted) and
/// [`add_instance`](Self::add_instance) with that instance; each later instance through
/// [`open_instance`](Self::open_instance) when its command arrives,
/// [`write_instance`](Self::write_instance) as its bytes arrive, and
/// [`keep_instance`](Self::keep_instance) once the SCP has checked it whole (or dropped, which
/// discards it); then [`finish`](Self::finish) once, however the association ended. An
/// instance is answered Success only after `add_instance` or `keep_instance` returned: from
/// then on the sink must deliver it.
pub trait AssociationSink: Send + Sync + 'static {
    /// The open transfer.
    type Transfer: Send + 'static;

    /// An instance of an open transfer being written as it arrives. Dropping it before
    /// [`keep_instance`](Self::keep_instance) discards it: nothing of it is ever part of the
    /// transfer.
    type Instance: Send + 'static;

    /// Opens the transfer of an association.
    fn begin(
        &self,
        origin: Origin,
    ) -> impl Future<Output = Result<Self::Transfer, SinkError>> + Send;

    /// Takes a copy of the complete and checked Part-10 instance in the first `len` bytes of
    /// `file` (what follows is stale) under `name` (already validated, unique within the
    /// transfer). The SCP reuses `file` for its next instance once this returns. `Ok` means
    /// the instance is durable and will be sent: the SCP answers Success.
    fn add_instance(
        &self,
        transfer: &mut Self::Transfer,
        name: &str,
        file: &Path,
        len: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Starts instance `name` (validated, unique within the transfer) of the open
    /// `transfer`, to take its bytes as they arrive: they are hashed and written while the
    /// rest of the instance arrives, which saves copying the whole instance out of a scratch
    /// file. `None`: the sink takes this transfer's instances only whole, through
    /// [`add_instance`](Self::add_instance).
    fn open_instance(
        &self,
        transfer: &mut Self::Transfer,
        name: &str,
    ) -> impl Future<Output = Result<Option<Self::Instance>, SinkError>> + Send;

    /// Whether one more instance `name` of `len` bytes keeps `transfer` within the policy's
    /// size limits; a refusal is recorded before it is returned ([`SinkError::Refused`]).
    /// For an instance written as it arrived whose store failed meanwhile: the size limit
    /// is answered before such a failure, as when the instance was handed over whole.
    fn check_room(
        &self,
        transfer: &Self::Transfer,
        name: &str,
        len: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Takes the next bytes of `instance` (the Part-10 header first, then its data set).
    fn write_instance(
        &self,
        instance: &mut Self::Instance,
        data: bytes::Bytes,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// `instance` is whole and the SCP checked it (well-formed, the transfer's patient, the
    /// policy): `Ok` means it is durable and will be sent, and the SCP answers Success.
    fn keep_instance(
        &self,
        transfer: &mut Self::Transfer,
        instance: Self::Instance,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The association ended as `end` (released, aborted, timed out, connection lost): the
    /// instances added become one transfer, sealed and sent in the background; a transfer
    /// with none is dropped. The call returns once the instances are handed on (or, if
    /// sealing failed for a reason that may pass, kept for a retry). An error means they
    /// could not be handed on; they stay in the spool.
    fn finish(
        &self,
        transfer: Self::Transfer,
        end: AssociationEnd,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Records that instance `name` of `patient_id` was refused by `refusal` (it is not
    /// added; the SCP answers it with a failure status).
    fn refuse_instance(
        &self,
        transfer: &Self::Transfer,
        name: &str,
        patient_id: &str,
        refusal: &Refusal,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Records that instance `name` was refused because the policy refused its declaration
    /// (`declaration`: what the door declares for it, with the instance's PatientID): an
    /// audit `refused` record naming the rule, before the SCP answers the refusal. Nothing
    /// of the instance is added.
    fn refuse_declaration(
        &self,
        hospital: &str,
        declaration: &Declaration,
        name: &str,
        refusal: &Refusal,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Lets a shared sink be used where a sink is expected.
impl<S: AssociationSink> AssociationSink for Arc<S> {
    type Transfer = S::Transfer;
    type Instance = S::Instance;

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
        len: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).add_instance(transfer, name, file, len)
    }

    fn open_instance(
        &self,
        transfer: &mut Self::Transfer,
        name: &str,
    ) -> impl Future<Output = Result<Option<Self::Instance>, SinkError>> + Send {
        (**self).open_instance(transfer, name)
    }

    fn check_room(
        &self,
        transfer: &Self::Transfer,
        name: &str,
        len: u64,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).check_room(transfer, name, len)
    }

    fn write_instance(
        &self,
        instance: &mut Self::Instance,
        data: bytes::Bytes,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).write_instance(instance, data)
    }

    fn keep_instance(
        &self,
        transfer: &mut Self::Transfer,
        instance: Self::Instance,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).keep_instance(transfer, instance)
    }

    fn finish(
        &self,
        transfer: Self::Transfer,
        end: AssociationEnd,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).finish(transfer, end)
    }

    fn refuse_instance(
        &self,
        transfer: &Self::Transfer,
        name: &str,
        patient_id: &str,
        refusal: &Refusal,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).refuse_instance(transfer, name, patient_id, refusal)
    }

    fn refuse_declaration(
        &self,
        hospital: &str,
        declaration: &Declaration,
        name: &str,
        refusal: &Refusal,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).refuse_declaration(hospital, declaration, name, refusal)
    }
}

/// The sink the edge service uses: each association becomes one transfer of the hospital
/// ingest store (the same one the HTTPS API fills), declared with the association's marker.
/// Instances are streamed into the spool through the io_uring thread and hashed on the way;
/// each is fsynced and has its digest record before `add_instance` returns (before its
/// Success). When the association ends, however it ends, the transfer is sealed (manifest
/// from the recorded digests, HSM signature) **before** the SCP answers A-RELEASE or closes
/// the connection, and the background sender delivers it. A crash before that leaves the
/// transfer open with its marker: start-up seals and sends it
/// ([`crate::ingest::IngestStore::seal_interrupted_associations`]).
#[derive(Debug, Clone)]
pub struct StoreSink {
    store: crate::ingest::IngestStore,
    /// Storage Commitment's index of the instances each transfer holds, if it is served.
    commitment: Option<Arc<crate::dicom::commitment::Commitments>>,
}

/// An open transfer of [`StoreSink`].
#[derive(Debug)]
pub struct StoreTransfer {
    origin: Origin,
    id: baylink_net::proto::TransferId,
}

/// An instance of a [`StoreTransfer`] being uploaded into it.
#[derive(Debug)]
pub struct StoreInstance {
    upload: crate::ingest::FileUpload,
    /// The name the SCP gave it (`<SOP Instance UID>.dcm`), which Storage Commitment asks for.
    original: String,
    /// The name it is stored under (a de-identified instance's new UID).
    stored: String,
}

impl StoreSink {
    /// A sink that opens its transfers in `store`.
    pub fn new(store: crate::ingest::IngestStore) -> StoreSink {
        StoreSink {
            store,
            commitment: None,
        }
    }

    /// The same, recording each instance in Storage Commitment's index before its Success.
    pub fn with_commitment(mut self, c: Arc<crate::dicom::commitment::Commitments>) -> StoreSink {
        self.commitment = Some(c);
        self
    }

    /// Opens `name` in `transfer` as a spool upload (see
    /// [`AssociationSink::open_instance`]).
    async fn begin_instance(
        &self,
        transfer: &StoreTransfer,
        name: &str,
    ) -> Result<StoreInstance, SinkError> {
        let hospital = transfer.origin.hospital.as_str();
        // A de-identified instance is named by its new SOP Instance UID, not the original.
        let stored = self.store.instance_file_name(&transfer.id, name);
        let mut upload = self
            .store
            .begin_file(hospital, &transfer.id, &stored)
            .await
            .map_err(|e| SinkError::store("cannot add the instance", e))?;
        // The SCP reads the instance's PatientID with dicom-rs and matches it to the
        // association's transfer before the instance is kept.
        upload.patient_checked();
        Ok(StoreInstance {
            upload,
            original: name.to_owned(),
            stored,
        })
    }

    /// Makes `instance`, checked whole and against the size limits, durable in `transfer`
    /// and indexes it for Storage Commitment.
    async fn keep(
        &self,
        transfer: &StoreTransfer,
        instance: StoreInstance,
    ) -> Result<(), SinkError> {
        let StoreInstance {
            upload,
            original,
            stored,
        } = instance;
        upload
            .finish()
            .await
            .map_err(|e| SinkError::store("cannot store the instance", e))?;
        if let Some(c) = &self.commitment {
            let hospital = transfer.origin.hospital.as_str();
            c.record_instance(hospital, &transfer.id, &original, &stored)
                .await
                .map_err(|source| SinkError::Io {
                    what: "cannot index for storage commitment",
                    path: PathBuf::from(&stored),
                    source,
                })?;
        }
        Ok(())
    }
}

impl AssociationSink for StoreSink {
    type Transfer = StoreTransfer;
    type Instance = StoreInstance;

    async fn begin(&self, origin: Origin) -> Result<StoreTransfer, SinkError> {
        let id = self
            .store
            .declare_association(
                &origin.hospital,
                origin.declaration.clone(),
                &origin.association.to_string(),
            )
            .await
            .map_err(|e| SinkError::store("cannot open the transfer", e))?;
        info!(association = %origin.association, transfer = %id, "association opened a transfer");
        Ok(StoreTransfer { origin, id })
    }

    async fn add_instance(
        &self,
        transfer: &mut StoreTransfer,
        name: &str,
        file: &Path,
        len: u64,
    ) -> Result<(), SinkError> {
        use tokio::io::AsyncReadExt;
        let io = |what, source| SinkError::Io {
            what,
            path: file.to_path_buf(),
            source,
        };
        // The policy's size limits first, as for an instance written as it arrives.
        self.check_room(transfer, name, len).await?;
        let mut instance = self.begin_instance(transfer, name).await?;
        // Exactly the instance's bytes: the file goes on with a previous, longer one's.
        let mut src = tokio::fs::File::open(file)
            .await
            .map_err(|e| io("cannot open", e))?
            .take(len);
        let mut left = len;
        while left > 0 {
            let mut piece = bytes::BytesMut::with_capacity(left.min(1 << 20) as usize);
            let n = src
                .read_buf(&mut piece)
                .await
                .map_err(|e| io("cannot read", e))?;
            if n == 0 {
                return Err(io(
                    "cannot read",
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the instance's {len} bytes are not all there"),
                    ),
                ));
            }
            left -= n as u64;
            self.write_instance(&mut instance, piece.freeze()).await?;
        }
        // Checked against the size limits above, before its first byte.
        self.keep(transfer, instance).await
    }

    async fn open_instance(
        &self,
        transfer: &mut StoreTransfer,
        name: &str,
    ) -> Result<Option<StoreInstance>, SinkError> {
        // A de-identified instance is taken whole: the gate holds everything before the pixel
        // data (up to 64 MiB) until it can rewrite it, and may refuse the instance on its
        // own before the SCP has checked it (its PatientID, the policy). Out of a scratch file
        // that takes as long as a copy; streamed, as long as the SCU takes to send it.
        if self.store.deidentifies(&transfer.id) {
            return Ok(None);
        }
        self.begin_instance(transfer, name).await.map(Some)
    }

    async fn check_room(
        &self,
        transfer: &StoreTransfer,
        name: &str,
        len: u64,
    ) -> Result<(), SinkError> {
        let stored = self.store.instance_file_name(&transfer.id, name);
        self.store
            .check_room(&transfer.origin.hospital, &transfer.id, &stored, len)
            .await
            .map_err(|e| SinkError::store("cannot add the instance", e))
    }

    async fn write_instance(
        &self,
        instance: &mut StoreInstance,
        data: bytes::Bytes,
    ) -> Result<(), SinkError> {
        instance
            .upload
            .write(data)
            .await
            .map_err(|e| SinkError::store("cannot store the instance", e))
    }

    async fn keep_instance(
        &self,
        transfer: &mut StoreTransfer,
        instance: StoreInstance,
    ) -> Result<(), SinkError> {
        // The policy's size limits are checked per instance, before its success status:
        // at A-RELEASE it would be too late to refuse what was acknowledged.
        instance
            .upload
            .check_room()
            .await
            .map_err(|e| SinkError::store("cannot add the instance", e))?;
        self.keep(transfer, instance).await
    }

    async fn finish(&self, transfer: StoreTransfer, end: AssociationEnd) -> Result<(), SinkError> {
        let StoreTransfer { origin, id } = transfer;
        let outcome = self
            .store
            .seal_association(&origin.hospital, &id, end)
            .await
            .map_err(|e| SinkError::store("cannot seal the transfer", e))?;
        match outcome {
            AssociationOutcome::Sealed { files } => info!(
                association = %origin.association,
                transfer = %id,
                hospital = %origin.hospital,
                association_end = %end,
                instances = files,
                "association ended: transfer sealed, sending in the background"
            ),
            AssociationOutcome::Empty => info!(
                association = %origin.association,
                transfer = %id,
                association_end = %end,
                "association ended with no instance answered Success: nothing to send"
            ),
            AssociationOutcome::Retrying { error } => warn!(
                association = %origin.association,
                transfer = %id,
                association_end = %end,
                error,
                "association ended: sealing failed, retrying in the background (its instances stay in the spool)"
            ),
        }
        Ok(())
    }

    async fn refuse_instance(
        &self,
        transfer: &StoreTransfer,
        name: &str,
        patient_id: &str,
        refusal: &Refusal,
    ) -> Result<(), SinkError> {
        self.store
            .refuse_file(
                &transfer.origin.hospital,
                &transfer.id,
                name,
                Some(patient_id),
                refusal,
            )
            .await
            .map_err(|e| SinkError::store("cannot record the refusal", e))
    }

    async fn refuse_declaration(
        &self,
        hospital: &str,
        declaration: &Declaration,
        name: &str,
        refusal: &Refusal,
    ) -> Result<(), SinkError> {
        self.store
            .refuse_association_instance(hospital, declaration, name, refusal)
            .await
            .map_err(|e| SinkError::store("cannot record the refusal", e))
    }
}
