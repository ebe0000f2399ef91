//! What one STOW-RS request may cost: the `ingest.stow_*` settings (their defaults, bounds
//! and checks, which `config` calls) and the parse slots every request shares. A leaf of
//! `ingest`: the STOW-RS handler ([`super::stow`]) uses it, `config` composes it, and it
//! imports neither.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::setting::SettingError;

/// Prefix parses running on the blocking pool at once, all requests together.
pub const PARSE_SLOTS: usize = 2;

/// What one STOW-RS request may cost (`ingest.stow_*`), and the parse slots all requests
/// share.
#[derive(Debug, Clone)]
pub struct StowLimits {
    /// `ingest.stow_max_parts`.
    pub max_parts: usize,
    /// `ingest.stow_max_failed_listed`.
    pub max_failed_listed: usize,
    pub(super) parse_slots: Arc<Semaphore>,
}

impl StowLimits {
    /// The limits `ingest.stow_max_parts` and `ingest.stow_max_failed_listed` (as checked by
    /// [`max_parts_setting`] and [`max_failed_listed_setting`]), with [`PARSE_SLOTS`] parse
    /// slots.
    pub fn new(max_parts: usize, max_failed_listed: usize) -> StowLimits {
        StowLimits {
            max_parts,
            max_failed_listed,
            parse_slots: Arc::new(Semaphore::new(PARSE_SLOTS)),
        }
    }
}

/// Default `ingest.stow_max_parts`: parts in one STOW-RS request.
pub const DEFAULT_STOW_MAX_PARTS: usize = 10_000;
/// Upper bound of `ingest.stow_max_parts`.
pub const MAX_STOW_MAX_PARTS: usize = 10_000_000;
/// Default `ingest.stow_max_failed_listed`: failed parts listed in one STOW-RS answer.
pub const DEFAULT_STOW_MAX_FAILED_LISTED: usize = 1_000;
/// Upper bound of `ingest.stow_max_failed_listed`.
pub const MAX_STOW_MAX_FAILED_LISTED: usize = 100_000;

/// `ingest.stow_max_parts` (`None`: [`DEFAULT_STOW_MAX_PARTS`]), 1..=[`MAX_STOW_MAX_PARTS`].
pub fn max_parts_setting(value: Option<usize>) -> Result<usize, SettingError> {
    let n = value.unwrap_or(DEFAULT_STOW_MAX_PARTS);
    if n == 0 || n > MAX_STOW_MAX_PARTS {
        return Err(SettingError::Invalid {
            key: "ingest.stow_max_parts",
            message: format!("{n} is not in 1..={MAX_STOW_MAX_PARTS}"),
        });
    }
    Ok(n)
}

/// `ingest.stow_max_failed_listed` (`None`: [`DEFAULT_STOW_MAX_FAILED_LISTED`]),
/// 0..=[`MAX_STOW_MAX_FAILED_LISTED`].
pub fn max_failed_listed_setting(value: Option<usize>) -> Result<usize, SettingError> {
    let n = value.unwrap_or(DEFAULT_STOW_MAX_FAILED_LISTED);
    if n > MAX_STOW_MAX_FAILED_LISTED {
        return Err(SettingError::Invalid {
            key: "ingest.stow_max_failed_listed",
            message: format!("{n} is not in 0..={MAX_STOW_MAX_FAILED_LISTED}"),
        });
    }
    Ok(n)
}
