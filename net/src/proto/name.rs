//! File-name rules: a name in a manifest becomes a file name in the
//! receiver's spool and delivery directory, so it must be one plain path
//! component that cannot escape, hide, or disguise itself.

/// The longest file name accepted, in bytes (the usual file-system limit).
pub const MAX_FILE_NAME_LEN: usize = 255;

/// The rule a refused file name breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("the name is empty")]
    Empty,
    /// The name is longer than [`MAX_FILE_NAME_LEN`] bytes.
    #[error("the name is {len} bytes long, over the limit of 255")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name is `.` or `..`.
    #[error("the name is `.` or `..`")]
    DotOrDotDot,
    /// The name starts with `.` (hidden files are refused).
    #[error("the name starts with `.`")]
    LeadingDot,
    /// The name contains `/`.
    #[error("the name contains `/`")]
    Slash,
    /// The name contains `\`.
    #[error("the name contains `\\`")]
    Backslash,
    /// The name contains a NUL byte.
    #[error("the name contains a NUL byte")]
    Nul,
    /// The name contains a control character.
    #[error("the name contains the control character U+{code:04X}")]
    Control {
        /// The character's code point.
        code: u32,
    },
    /// The name contains an invisible formatting character (bidirectional
    /// overrides, zero-width characters, byte-order mark) that could
    /// disguise it, as `scan\u{202e}gpj.exe` displays as `scanexe.jpg`.
    #[error("the name contains the invisible formatting character U+{code:04X}")]
    Invisible {
        /// The character's code point.
        code: u32,
    },
}

/// Checks that `name` is acceptable as a transferred file's name: one plain,
/// visible path component. The first rule broken is reported.
pub fn validate_file_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(NameError::DotOrDotDot);
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    for ch in name.chars() {
        match ch {
            '/' => return Err(NameError::Slash),
            '\\' => return Err(NameError::Backslash),
            '\0' => return Err(NameError::Nul),
            c if c.is_control() => return Err(NameError::Control { code: c as u32 }),
            c if is_invisible_format(c) => return Err(NameError::Invisible { code: c as u32 }),
            _ => {}
        }
    }
    Ok(())
}

/// Zero-width and bidirectional formatting characters.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                  // soft hyphen
        | '\u{061C}'                // Arabic letter mark
        | '\u{180E}'                // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
        | '\u{202A}'..='\u{202E}'   // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}'   // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}'   // bidi isolates
        | '\u{FEFF}'                // byte-order mark
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "a",
            "IMG0001.dcm",
            "study 42 (copy).zip",
            "a..b",
            "trailing.",
            "CT_胸部_001.dcm",
            "ümlaut-é.txt",
            &"x".repeat(255),
        ] {
            assert_eq!(validate_file_name(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn names_the_rule_broken() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            (".", NameError::DotOrDotDot),
            ("..", NameError::DotOrDotDot),
            (".hidden", NameError::LeadingDot),
            ("a/b", NameError::Slash),
            ("/etc", NameError::Slash),
            ("../x", NameError::LeadingDot),
            ("x/../y", NameError::Slash),
            ("a\\b", NameError::Backslash),
            ("..\\x", NameError::LeadingDot),
            ("a\0b", NameError::Nul),
            ("a\nb", NameError::Control { code: 0x0a }),
            ("tab\t", NameError::Control { code: 0x09 }),
            ("del\u{7f}", NameError::Control { code: 0x7f }),
            ("c1\u{85}", NameError::Control { code: 0x85 }),
            ("scan\u{202e}gpj.exe", NameError::Invisible { code: 0x202e }),
            ("zero\u{200b}width", NameError::Invisible { code: 0x200b }),
            ("\u{feff}bom", NameError::Invisible { code: 0xfeff }),
        ];
        for (name, want) in cases {
            assert_eq!(validate_file_name(name), Err(*want), "{name:?}");
        }
        assert_eq!(
            validate_file_name(&"x".repeat(256)),
            Err(NameError::TooLong { len: 256 })
        );
        // 128 two-byte characters: 256 bytes.
        assert_eq!(
            validate_file_name(&"é".repeat(128)),
            Err(NameError::TooLong { len: 256 })
        );
    }

    #[test]
    fn messages_say_which_rule() {
        assert!(NameError::Slash.to_string().contains('/'));
        assert!(
            NameError::Control { code: 0x0a }
                .to_string()
                .contains("U+000A")
        );
    }
}
