//! Quota accounting (`[quota]`, `spool.reserve_bytes`), from the open transfers themselves.

use std::sync::atomic::Ordering;

use super::{IngestError, IngestStore, internal, lock};

/// A declaration in progress, counted against its hospital's `quota.max_open_transfers`.
pub(super) struct DeclaringSlot<'a> {
    store: &'a IngestStore,
    hospital: String,
}

impl Drop for DeclaringSlot<'_> {
    fn drop(&mut self) {
        let mut declaring = lock(&self.store.inner.declaring);
        if let Some(n) = declaring.get_mut(&self.hospital) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                declaring.remove(&self.hospital);
            }
        }
    }
}

impl IngestStore {
    /// Takes one of `hospital`'s `quota.max_open_transfers` for a declaration in progress
    /// (open transfers and other declarations in progress hold the others); the slot is
    /// given back when the returned guard drops, by then the transfer is open or refused.
    pub(super) fn take_open_slot(&self, hospital: &str) -> Result<DeclaringSlot<'_>, IngestError> {
        let max = self.inner.quota.max_open_transfers;
        let open = lock(&self.inner.open);
        let mut declaring = lock(&self.inner.declaring);
        let held = open.values().filter(|t| t.hospital == hospital).count()
            + declaring.get(hospital).copied().unwrap_or(0);
        if held >= max {
            return Err(IngestError::Quota {
                key: "quota.max_open_transfers",
                message: format!("{hospital} already has {held} open transfers"),
            });
        }
        *declaring.entry(hospital.to_owned()).or_default() += 1;
        Ok(DeclaringSlot {
            store: self,
            hospital: hospital.to_owned(),
        })
    }

    /// Refuses `len` more bytes for `hospital` when its open transfers would hold more than
    /// `quota.max_spool_bytes`, or when they would leave less than `spool.reserve_bytes` free.
    pub(super) fn check_spool_room(&self, hospital: &str, len: u64) -> Result<(), IngestError> {
        let max = self.inner.quota.max_spool_bytes;
        let held: u64 = lock(&self.inner.open)
            .values()
            .filter(|t| t.hospital == hospital)
            .map(|t| t.bytes.load(Ordering::Relaxed))
            .sum();
        if held.saturating_add(len) > max {
            return Err(IngestError::Quota {
                key: "quota.max_spool_bytes",
                message: format!(
                    "{hospital}'s open transfers hold {held} bytes; {len} more would pass {max}"
                ),
            });
        }
        let reserve = self.inner.reserve_bytes;
        if reserve > 0 {
            let (_, available) = crate::retention::spool_space(&self.inner.spool_dir)
                .map_err(internal("spool free space"))?;
            if available < reserve.saturating_add(len) {
                return Err(IngestError::Reserve { available, reserve });
            }
        }
        Ok(())
    }
}
