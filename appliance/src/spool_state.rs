//! What is in a spool (`baylink spool`): each transfer's state as its files show it, the
//! bytes it holds, and when it was created. Read-only: it takes no lock and changes nothing,
//! so it is safe beside a running `serve`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baylink_net::proto::TransferId;
use serde::Serialize;

use crate::setting::Role;
use crate::transfer_dir::{self, TransferDir};

/// Where a transfer stands, from the files in its spool directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolState {
    /// Edge: declared through the hospital API, files may still arrive.
    Open,
    /// Edge: closed by `ingest.open_timeout` without a commit.
    Expired,
    /// Edge: sealed (manifest signed), no receipt yet: being sent, waiting for the link, or
    /// stopped by an error (see the logs).
    Sealed,
    /// Edge: the gateway's receipt is verified and stored.
    Receipted,
    /// Gateway: chunks arriving (or waiting for the edge to resume).
    Receiving,
    /// Gateway: committed and receipted, waiting for delivery.
    Committed,
    /// Gateway: the store refused it; set aside (see `undeliverable`).
    Undeliverable,
    /// Gateway: delivered downstream.
    Delivered,
    /// Finished, and its payload removed under `spool.retain`.
    Pruned,
    /// None of the above: a directory without a manifest (sealing cut short by a crash).
    Incomplete,
}

impl SpoolState {
    /// The name printed and used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            SpoolState::Open => "open",
            SpoolState::Expired => "expired",
            SpoolState::Sealed => "sealed",
            SpoolState::Receipted => "receipted",
            SpoolState::Receiving => "receiving",
            SpoolState::Committed => "committed",
            SpoolState::Undeliverable => "undeliverable",
            SpoolState::Delivered => "delivered",
            SpoolState::Pruned => "pruned",
            SpoolState::Incomplete => "incomplete",
        }
    }
}

impl SpoolState {
    /// The states a spool of `role` can hold.
    pub fn of_role(role: Role) -> &'static [SpoolState] {
        match role {
            Role::Edge => &[
                SpoolState::Open,
                SpoolState::Expired,
                SpoolState::Sealed,
                SpoolState::Receipted,
                SpoolState::Pruned,
                SpoolState::Incomplete,
            ],
            Role::Gateway => &[
                SpoolState::Receiving,
                SpoolState::Committed,
                SpoolState::Undeliverable,
                SpoolState::Delivered,
                SpoolState::Pruned,
                SpoolState::Incomplete,
            ],
        }
    }
}

/// How many transfers of each state `spool_dir` holds (every state of `role`, zeros
/// included). Cheaper than [`take`]: no sizes.
pub fn count(spool_dir: &Path, role: Role) -> Vec<(SpoolState, u64)> {
    let mut counts: Vec<(SpoolState, u64)> =
        SpoolState::of_role(role).iter().map(|s| (*s, 0)).collect();
    for id in transfer_dir::list(spool_dir, |_| true) {
        let state = state_of(&TransferDir::new(spool_dir, &id), role);
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == state) {
            c.1 += 1;
        }
    }
    counts
}

/// One transfer in the spool.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The transfer id.
    pub transfer: String,
    /// Where it stands.
    pub state: SpoolState,
    /// Bytes of the files in its directory.
    pub bytes: u64,
    /// When it was created (from the UUIDv7 id), RFC 3339.
    pub created: String,
    /// Why, for `undeliverable`, `expired` and `pruned`: the reason its marker file holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The reason a marker file holds, for the states that have one (at most 500 bytes).
fn reason_of(dir: &TransferDir, state: SpoolState) -> Option<String> {
    let marker = match state {
        SpoolState::Undeliverable => dir.undeliverable(),
        SpoolState::Expired => dir.expired(),
        SpoolState::Pruned => dir.pruned(),
        _ => return None,
    };
    let text = std::fs::read(marker).ok()?;
    let text = String::from_utf8_lossy(&text[..text.len().min(500)]);
    Some(text.trim().to_owned())
}

/// A spool's transfers, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    /// The spool directory.
    pub spool: String,
    /// The role whose spool it is.
    pub role: &'static str,
    /// Each transfer.
    pub transfers: Vec<Entry>,
    /// Sum of their bytes.
    pub bytes: u64,
}

/// The state of the transfer in `dir` on an appliance of `role`.
pub fn state_of(dir: &TransferDir, role: Role) -> SpoolState {
    let receipted = dir.has_receipt();
    match role {
        Role::Edge if dir.expired().exists() => SpoolState::Expired,
        Role::Edge if receipted && dir.pruned().exists() => SpoolState::Pruned,
        Role::Edge if receipted => SpoolState::Receipted,
        Role::Edge if dir.manifest_bin().exists() => SpoolState::Sealed,
        Role::Edge if dir.is_ingest_transfer() => SpoolState::Open,
        Role::Gateway if receipted && dir.undeliverable().exists() => SpoolState::Undeliverable,
        Role::Gateway if receipted && dir.delivered().exists() && dir.pruned().exists() => {
            SpoolState::Pruned
        }
        Role::Gateway if receipted && dir.delivered().exists() => SpoolState::Delivered,
        Role::Gateway if receipted => SpoolState::Committed,
        Role::Gateway if dir.manifest_bin().exists() => SpoolState::Receiving,
        _ => SpoolState::Incomplete,
    }
}

/// Lists the transfers in `spool_dir`.
pub fn take(spool_dir: &Path, role: Role) -> Inventory {
    let transfers: Vec<Entry> = transfer_dir::list(spool_dir, |_| true)
        .into_iter()
        .map(|id| {
            let dir = TransferDir::new(spool_dir, &id);
            let state = state_of(&dir, role);
            Entry {
                transfer: id.to_string(),
                state,
                reason: reason_of(&dir, state),
                bytes: crate::transfer_dir::tree_size(dir.root()).unwrap_or(0),
                created: humantime::format_rfc3339_seconds(created(&id)).to_string(),
            }
        })
        .collect();
    Inventory {
        spool: spool_dir.display().to_string(),
        role: match role {
            Role::Edge => "edge",
            Role::Gateway => "gateway",
        },
        bytes: transfers.iter().map(|e| e.bytes).sum(),
        transfers,
    }
}

/// The creation time a UUIDv7 carries (its first 48 bits, Unix milliseconds).
pub fn created(id: &TransferId) -> SystemTime {
    let b = id.as_bytes();
    let ms = b[..6]
        .iter()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Inventory {
    /// The table `baylink spool` prints: one line per transfer, then the totals by state.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<36}  {:<13}  {:>15}  created\n",
            "transfer", "state", "bytes"
        );
        for e in &self.transfers {
            out += &format!(
                "{:<36}  {:<13}  {:>15}  {}\n",
                e.transfer,
                e.state.name(),
                e.bytes,
                e.created
            );
        }
        let mut by_state = std::collections::BTreeMap::new();
        for e in &self.transfers {
            let (n, bytes) = by_state.entry(e.state).or_insert((0u64, 0u64));
            *n += 1;
            *bytes += e.bytes;
        }
        let parts: Vec<String> = by_state
            .iter()
            .map(|(s, (n, b))| format!("{} {n} ({b} bytes)", s.name()))
            .collect();
        out += &format!(
            "{} spool {}: {} transfers, {} bytes{}{}\n",
            self.role,
            self.spool,
            self.transfers.len(),
            self.bytes,
            if parts.is_empty() { "" } else { "; " },
            parts.join(", ")
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(spool: &Path, files: &[&str]) -> TransferDir {
        let dir = TransferDir::new(spool, &TransferId::new_v7());
        dir.create().unwrap();
        for f in files {
            std::fs::write(dir.root().join(f), b"x").unwrap();
        }
        dir
    }

    #[test]
    fn states_follow_the_files_on_each_role() {
        let spool = tempfile::tempdir().unwrap();
        let p = spool.path();
        let receipt = ["manifest.bin", "receipt.bin", "receipt.sig"];
        let cases: &[(&[&str], Role, SpoolState)] = &[
            (&["owner"], Role::Edge, SpoolState::Open),
            (&["owner", "expired"], Role::Edge, SpoolState::Expired),
            (&["owner", "manifest.bin"], Role::Edge, SpoolState::Sealed),
            (&receipt, Role::Edge, SpoolState::Receipted),
            (
                &[&receipt[..], &["pruned"]].concat(),
                Role::Edge,
                SpoolState::Pruned,
            ),
            (
                &["manifest.bin", "receipt.bin"],
                Role::Edge,
                SpoolState::Sealed,
            ),
            (&[], Role::Edge, SpoolState::Incomplete),
            (&["manifest.bin"], Role::Gateway, SpoolState::Receiving),
            (&receipt, Role::Gateway, SpoolState::Committed),
            (
                &[&receipt[..], &["undeliverable"]].concat(),
                Role::Gateway,
                SpoolState::Undeliverable,
            ),
            (
                &[&receipt[..], &["delivered"]].concat(),
                Role::Gateway,
                SpoolState::Delivered,
            ),
            (
                &[&receipt[..], &["delivered", "pruned"]].concat(),
                Role::Gateway,
                SpoolState::Pruned,
            ),
            (&[], Role::Gateway, SpoolState::Incomplete),
        ];
        for (files, role, want) in cases {
            let dir = dir_with(p, files);
            assert_eq!(state_of(&dir, *role), *want, "{files:?} on {role:?}");
        }
    }

    #[test]
    fn counts_cover_every_state_of_the_role() {
        let spool = tempfile::tempdir().unwrap();
        dir_with(spool.path(), &["manifest.bin"]);
        dir_with(spool.path(), &["manifest.bin"]);
        dir_with(
            spool.path(),
            &[
                "manifest.bin",
                "receipt.bin",
                "receipt.sig",
                "undeliverable",
            ],
        );
        let counts = count(spool.path(), Role::Gateway);
        assert_eq!(counts.len(), SpoolState::of_role(Role::Gateway).len());
        let of = |s| counts.iter().find(|(c, _)| *c == s).unwrap().1;
        assert_eq!(of(SpoolState::Receiving), 2);
        assert_eq!(of(SpoolState::Undeliverable), 1);
        assert_eq!(of(SpoolState::Delivered), 0);
        // Every state a role's spool can show is one of its own.
        for role in [Role::Edge, Role::Gateway] {
            for files in [
                &["owner"][..],
                &["owner", "expired"],
                &["manifest.bin"],
                &[],
            ] {
                let dir = dir_with(spool.path(), files);
                let s = state_of(&dir, role);
                assert!(SpoolState::of_role(role).contains(&s), "{s:?} on {role:?}");
            }
        }
    }

    #[test]
    fn the_inventory_counts_bytes_and_dates_each_transfer() {
        let spool = tempfile::tempdir().unwrap();
        let a = dir_with(spool.path(), &["manifest.bin"]);
        std::fs::write(a.data_file("x.dcm"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir_all(spool.path().join(".incoming")).unwrap();
        let inv = take(spool.path(), Role::Gateway);
        assert_eq!(inv.transfers.len(), 1, "non-transfer entries are ignored");
        let e = &inv.transfers[0];
        assert_eq!(e.state, SpoolState::Receiving);
        assert_eq!(e.bytes, 1001);
        assert_eq!(inv.bytes, 1001);
        let created = humantime::parse_rfc3339(&e.created).unwrap();
        let age = SystemTime::now().duration_since(created).unwrap();
        assert!(age < Duration::from_secs(60), "{}", e.created);
        let table = inv.table();
        assert!(table.contains(&e.transfer) && table.contains("receiving 1 (1001 bytes)"));
        let json = serde_json::to_value(&inv).unwrap();
        assert_eq!(json["transfers"][0]["state"], "receiving");
        assert!(json["transfers"][0].get("reason").is_none());

        let refused = dir_with(
            spool.path(),
            &["manifest.bin", "receipt.bin", "receipt.sig"],
        );
        std::fs::write(refused.undeliverable(), "store answered 409\n").unwrap();
        let inv = take(spool.path(), Role::Gateway);
        let e = inv
            .transfers
            .iter()
            .find(|e| e.state == SpoolState::Undeliverable)
            .unwrap();
        assert_eq!(e.reason.as_deref(), Some("store answered 409"));
        assert_eq!(json["role"], "gateway");
    }
}
