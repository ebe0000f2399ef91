//! A setting refused by the module that owns it: the dotted key, and why.
//!
//! A module that owns its settings checks them itself ([`crate::deliver::Backoff::from_settings`],
//! [`crate::deliver::dicomweb::StowSettings::from_section`],
//! [`crate::dicom::settings::DicomSection::from_settings`]) and answers with a
//! [`SettingError`]; [`crate::config`] parses the TOML, hands each module its values and adds
//! the file and the role ([`crate::config::ConfigError`]). Also [`Role`], which side of the
//! link an appliance serves. A leaf: it uses no other module.

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

/// Which side of the link this appliance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Shenzhen side: takes uploads from hospitals, seals and sends them.
    Edge,
    /// Hong Kong side: receives, verifies, commits and delivers.
    Gateway,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Edge => "edge",
            Role::Gateway => "gateway",
        })
    }
}
