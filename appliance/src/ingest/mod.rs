//! The hospital side of the edge: uploads into the spool, cut-through.
//!
//! [`store::IngestStore`] is the heart: it declares transfers (the compliance checkpoint),
//! streams each uploaded file through the io_uring spool thread while hashing it chunk by
//! chunk, seals at commit from the recorded digests (no payload re-read), and hands the
//! sealed transfer to a background sender. [`http`] serves it over HTTPS with client
//! certificates (the hospital API, `docs/api.md`), including DICOMweb STOW-RS ([`stow`],
//! with a streaming [`multipart`] splitter and a minimal [`part10`] prefix reader); both use
//! [`api`], what the handlers share (state, error answers, request helpers).
//!
//! Not here: the DICOM C-STORE SCP (its own module reuses the store), policy rules
//! (`crate::policy`).

pub mod api;
pub mod http;
pub mod multipart;
pub mod part10;
pub mod store;
pub mod stow;
pub mod stow_limits;

pub use store::{
    AssociationEnd, AssociationOutcome, FileUpload, IngestError, IngestStore, TransferState,
    TransferStatus,
};
