//! A setting refused by the module that owns it: the dotted key, and why.
//!
//! A module that owns its settings checks them itself ([`crate::deliver::Backoff::from_settings`],
//! [`crate::deliver::dicomweb::StowSettings::from_section`],
//! [`crate::dicom::settings::DicomSection::from_settings`]) and answers with a
//! [`SettingError`]; [`crate::config`] parses the TOML, hands each module its values and adds
//! the file and the role ([`crate::config::ConfigError`]). A leaf: it uses no other module.

/// A setting refused by the module that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingError {
    /// A key the setting needs is missing.
    Missing(&'static str),
    /// A key is present but its value is not acceptable.
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// Why it was refused.
        message: String,
    },
}
