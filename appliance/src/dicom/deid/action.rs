//! The actions of the Basic Application Level Confidentiality Profile, the vocabulary that
//! the generated table ([`super::table`]) is written in and that [`super::profile`] applies.

/// A Basic Profile action of Table E.1-1 (the letters of PS3.15 E.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicAction {
    /// D: replaced by a dummy value of the same VR.
    Dummy,
    /// Z: replaced by an empty value.
    Empty,
    /// X: removed.
    Remove,
    /// U: replaced by a new UID, consistently within the transfer.
    Uid,
    /// Z/D: Z unless D is required (type 1).
    EmptyOrDummy,
    /// X/Z: X unless Z is required (type 2).
    RemoveOrEmpty,
    /// X/D: X unless D is required (type 1).
    RemoveOrDummy,
    /// X/Z/D: X unless Z or D is required.
    RemoveEmptyOrDummy,
    /// X/Z/U*: X unless Z is required; the UIDs inside a sequence are replaced (U).
    RemoveEmptyOrUids,
}
