//! Reading the log's files back, line by line: shared by the offline checks
//! ([`super::verify`]) and the witness ([`super::witness`]). Read-only; repairs nothing.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use baylink_net::proto::Digest;

use super::record::{self, MAX_LINE};
use super::{AuditError, RECORDS_FILE};

/// Every complete line of a file with its offset; a torn last line is reported as an error
/// by `torn(offset)` (verification is read-only and repairs nothing).
pub(super) fn lines(
    path: &Path,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), AuditError>,
    torn: impl FnOnce(u64, String) -> AuditError,
) -> Result<(), AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(super::io("cannot open", path)(e)),
    };
    let mut r = BufReader::new(file);
    let mut offset = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(super::io("cannot read", path))?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') {
            let why = if n > MAX_LINE {
                format!("a line longer than {MAX_LINE} bytes")
            } else {
                format!("incomplete ({n} bytes without a newline: truncated or torn)")
            };
            return Err(torn(offset, why));
        }
        each(offset, &buf[..n - 1])?;
        offset += n as u64;
    }
}

/// Reads and checks every record; returns the records (canonical bytes) and leaf hashes.
pub(super) fn read_records(dir: &Path) -> Result<Vec<(Vec<u8>, Digest)>, AuditError> {
    let mut out: Vec<(Vec<u8>, Digest)> = Vec::new();
    let seq_at = std::cell::Cell::new(0u64);
    lines(
        &dir.join(RECORDS_FILE),
        |offset, line| {
            let seq = out.len() as u64;
            seq_at.set(seq + 1);
            let bad = |reason: String| AuditError::BadRecord {
                seq,
                offset,
                reason,
            };
            let (r, json, leaf) = record::parse_line(line).map_err(bad)?;
            if r.seq != seq {
                return Err(bad(format!(
                    "has seq {} (records missing, duplicated or reordered)",
                    r.seq
                )));
            }
            out.push((json, leaf));
            Ok(())
        },
        |offset, reason| AuditError::BadRecord {
            seq: seq_at.get(),
            offset,
            reason,
        },
    )?;
    Ok(out)
}
