//! DIMSE command sets for C-ECHO and C-STORE (PS3.7): decode a request, encode a response.
//!
//! A command set is a tiny implicit-VR-little-endian data set of group 0000 elements. Only the
//! handful of elements the SCP needs are decoded; everything is bounds-checked, and the whole
//! command set is limited to [`MAX_COMMAND_BYTES`] by the caller before it gets here.

/// Largest command set accepted (a C-STORE-RQ is well under 1 KiB).
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// C-STORE-RQ command field.
pub const C_STORE_RQ: u16 = 0x0001;
/// C-STORE-RSP command field.
pub const C_STORE_RSP: u16 = 0x8001;
/// C-ECHO-RQ command field.
pub const C_ECHO_RQ: u16 = 0x0030;
/// C-ECHO-RSP command field.
pub const C_ECHO_RSP: u16 = 0x8030;
/// N-EVENT-REPORT-RQ command field.
pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
/// N-EVENT-REPORT-RSP command field.
pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
/// N-ACTION-RQ command field.
pub const N_ACTION_RQ: u16 = 0x0130;
/// N-ACTION-RSP command field.
pub const N_ACTION_RSP: u16 = 0x8130;
/// Command Data Set Type value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

/// DIMSE status codes the SCP answers with (PS3.4 B.2.3, PS3.7 C).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: not authorized (no consent, or another patient than the association's).
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    /// Duplicate SOP Instance (the same SOP Instance UID twice in one association).
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    /// Refused: out of resources (disk, or the association's size or count limits).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class (its SOP UIDs differ from the command's).
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand (the data set or a UID is malformed).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// Why a command set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DimseError {
    /// An element's length runs past the end of the command set.
    #[error("command element ({group:04X},{element:04X}) runs past the end of the command set")]
    Truncated {
        /// Group.
        group: u16,
        /// Element.
        element: u16,
    },
    /// An element outside group 0000, or with an undefined length.
    #[error("command element ({group:04X},{element:04X}) is not a command element")]
    NotCommand {
        /// Group.
        group: u16,
        /// Element.
        element: u16,
    },
    /// A required element is absent or of the wrong size.
    #[error("command set lacks a usable {0}")]
    Missing(&'static str),
}

/// The parts of a request command set the SCP uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// Command Field (0000,0100).
    pub field: u16,
    /// Message ID (0000,0110).
    pub message_id: u16,
    /// Affected SOP Class UID (0000,0002), padding removed.
    pub affected_sop_class_uid: String,
    /// Affected SOP Instance UID (0000,1000), padding removed.
    pub affected_sop_instance_uid: String,
    /// Whether a data set follows (Command Data Set Type (0000,0800) != 0x0101).
    pub has_data_set: bool,
    /// Requested SOP Class UID (0000,0003) of a DIMSE-N request, padding removed.
    pub requested_sop_class_uid: String,
    /// Requested SOP Instance UID (0000,1001) of a DIMSE-N request, padding removed.
    pub requested_sop_instance_uid: String,
    /// Action Type ID (0000,1008) of an N-ACTION.
    pub action_type_id: Option<u16>,
}

/// The parts of a response command set the edge reads (the answer to a request it sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseCommand {
    /// Command Field (0000,0100).
    pub field: u16,
    /// Message ID Being Responded To (0000,0120).
    pub responded_to: u16,
    /// Status (0000,0900).
    pub status: u16,
}

/// Decodes a response command set (implicit VR little endian).
pub fn parse_response(bytes: &[u8]) -> Result<ResponseCommand, DimseError> {
    let (mut field, mut responded_to, mut status) = (None, None, None);
    walk(bytes, |element, value| {
        let us = (value.len() == 2).then(|| u16::from_le_bytes([value[0], value[1]]));
        match element {
            0x0100 => field = us,
            0x0120 => responded_to = us,
            0x0900 => status = us,
            _ => {}
        }
    })?;
    Ok(ResponseCommand {
        field: field.ok_or(DimseError::Missing("Command Field (0000,0100)"))?,
        responded_to: responded_to.ok_or(DimseError::Missing(
            "Message ID Being Responded To (0000,0120)",
        ))?,
        status: status.ok_or(DimseError::Missing("Status (0000,0900)"))?,
    })
}

/// Calls `each(element, value)` for every element of a command set, bounds-checked.
fn walk(bytes: &[u8], mut each: impl FnMut(u16, &[u8])) -> Result<(), DimseError> {
    let mut pos = 0usize;
    while pos < bytes.len() {
        let head = bytes.get(pos..pos + 8).ok_or(DimseError::Truncated {
            group: 0,
            element: 0,
        })?;
        let group = u16::from_le_bytes([head[0], head[1]]);
        let element = u16::from_le_bytes([head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if group != 0x0000 || len == u32::MAX {
            return Err(DimseError::NotCommand { group, element });
        }
        let start = pos + 8;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or(DimseError::Truncated { group, element })?;
        each(element, &bytes[start..end]);
        pos = end;
    }
    Ok(())
}

/// Decodes a request command set (implicit VR little endian).
pub fn parse_command(bytes: &[u8]) -> Result<Command, DimseError> {
    let mut cmd = Command::default();
    let (mut field, mut message_id, mut data_set_type) = (None, None, None);
    walk(bytes, |element, value| {
        let us = || (value.len() == 2).then(|| u16::from_le_bytes([value[0], value[1]]));
        let ui = || super::part10::trim_padding(&String::from_utf8_lossy(value)).to_owned();
        match element {
            0x0002 => cmd.affected_sop_class_uid = ui(),
            0x0003 => cmd.requested_sop_class_uid = ui(),
            0x0100 => field = us(),
            0x0110 => message_id = us(),
            0x0800 => data_set_type = us(),
            0x1000 => cmd.affected_sop_instance_uid = ui(),
            0x1001 => cmd.requested_sop_instance_uid = ui(),
            0x1008 => cmd.action_type_id = us(),
            _ => {}
        }
    })?;
    cmd.field = field.ok_or(DimseError::Missing("Command Field (0000,0100)"))?;
    cmd.message_id = message_id.ok_or(DimseError::Missing("Message ID (0000,0110)"))?;
    cmd.has_data_set = data_set_type
        .ok_or(DimseError::Missing("Command Data Set Type (0000,0800)"))?
        != NO_DATA_SET;
    Ok(cmd)
}

/// Encodes the response to `request` with `status`; `comment` (cut to 64 characters) goes
/// into Error Comment (0000,0902) when the status is not success.
pub fn response(request: &Command, status: u16, comment: Option<&str>) -> Vec<u8> {
    let response_field = request.field | 0x8000;
    let mut body = Vec::with_capacity(256);
    let n_action = request.field == N_ACTION_RQ;
    push_ui(
        &mut body,
        0x0002,
        if n_action {
            &request.requested_sop_class_uid
        } else {
            &request.affected_sop_class_uid
        },
    );
    push_us(&mut body, 0x0100, response_field);
    push_us(&mut body, 0x0120, request.message_id);
    push_us(&mut body, 0x0800, NO_DATA_SET);
    push_us(&mut body, 0x0900, status);
    if let Some(c) = comment.filter(|_| status != status::SUCCESS) {
        // Error Comment is LO: 64 characters of the default repertoire, no backslash.
        let c: String = c
            .chars()
            .map(|ch| {
                if ch.is_ascii_graphic() && ch != '\\' {
                    ch
                } else {
                    ' '
                }
            })
            .take(64)
            .collect();
        push_text(&mut body, 0x0902, c.as_bytes(), b' ');
    }
    if request.field == C_STORE_RQ {
        push_ui(&mut body, 0x1000, &request.affected_sop_instance_uid);
    }
    if n_action {
        push_ui(&mut body, 0x1000, &request.requested_sop_instance_uid);
        if let Some(t) = request.action_type_id {
            push_us(&mut body, 0x1008, t);
        }
    }
    command_set(body)
}

/// An N-EVENT-REPORT-RQ command set: `event_type` of `instance` (of `class`), message
/// `message_id`, a data set follows.
pub fn event_report_request(
    class: &str,
    instance: &str,
    message_id: u16,
    event_type: u16,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(160);
    push_ui(&mut body, 0x0002, class);
    push_us(&mut body, 0x0100, N_EVENT_REPORT_RQ);
    push_us(&mut body, 0x0110, message_id);
    push_us(&mut body, 0x0800, 0x0000);
    push_ui(&mut body, 0x1000, instance);
    push_us(&mut body, 0x1002, event_type);
    command_set(body)
}

/// `body` behind its Command Group Length (0000,0000).
fn command_set(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn push_us(out: &mut Vec<u8>, element: u16, v: u16) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&v.to_le_bytes());
}

fn push_ui(out: &mut Vec<u8>, element: u16, uid: &str) {
    push_text(out, element, uid.as_bytes(), 0);
}

fn push_text(out: &mut Vec<u8>, element: u16, v: &[u8], pad: u8) {
    let padded = v.len() + v.len() % 2;
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(padded as u32).to_le_bytes());
    out.extend_from_slice(v);
    if v.len() % 2 == 1 {
        out.push(pad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> Vec<u8> {
        let mut b = Vec::new();
        push_ui(&mut b, 0x0002, "1.2.840.10008.5.1.4.1.1.2");
        push_us(&mut b, 0x0100, C_STORE_RQ);
        push_us(&mut b, 0x0110, 7);
        push_us(&mut b, 0x0700, 0);
        push_us(&mut b, 0x0800, 0x0000);
        push_ui(&mut b, 0x1000, "1.2.3");
        b
    }

    #[test]
    fn request_round_trip_and_response_layout() {
        let cmd = parse_command(&store_rq()).unwrap();
        assert_eq!(cmd.field, C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert_eq!(cmd.affected_sop_instance_uid, "1.2.3");
        assert!(cmd.has_data_set);

        let rsp = response(
            &cmd,
            status::NOT_AUTHORIZED,
            Some("no consent for patient P-0099"),
        );
        // Group length covers exactly the rest.
        let len = u32::from_le_bytes(rsp[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, rsp.len() - 12);
        let back = parse_command(&rsp[12..]).unwrap_err();
        // A response has no Message ID (0000,0110): parsing it as a request must say so.
        assert_eq!(back, DimseError::Missing("Message ID (0000,0110)"));
        assert!(rsp.windows(5).any(|w| w == b"P-009"));
    }

    #[test]
    fn truncated_and_foreign_elements_are_refused() {
        let rq = store_rq();
        for cut in [3, 9, rq.len() - 1] {
            assert!(parse_command(&rq[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = rq.clone();
        bad[0] = 0x08; // group 0008
        assert!(matches!(
            parse_command(&bad),
            Err(DimseError::NotCommand { .. })
        ));
        let mut huge = rq;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_command(&huge).is_err());
    }

    proptest::proptest! {
        /// Any bytes: a command or an error, never a panic.
        #[test]
        fn arbitrary_command_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_command(&bytes);
        }

        /// A valid request with one byte changed still decodes or fails cleanly, and a decoded
        /// one always yields a response whose group length is right.
        #[test]
        fn mutated_requests_never_panic(pos in 0usize..64, byte in proptest::num::u8::ANY) {
            let mut rq = store_rq();
            let p = pos % rq.len();
            rq[p] = byte;
            if let Ok(cmd) = parse_command(&rq) {
                let rsp = response(&cmd, status::SUCCESS, None);
                let len = u32::from_le_bytes([rsp[8], rsp[9], rsp[10], rsp[11]]) as usize;
                proptest::prop_assert_eq!(len, rsp.len() - 12);
            }
        }
    }
}
