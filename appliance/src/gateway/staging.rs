//! Chunks streamed before their transfer's offer: an edge that is still sealing announces
//! the transfer (`Announce`: its id and layout) and streams chunks as it hashes them; they
//! are held aside here until the signed `Offer` says what they must be.
//!
//! Owns `spool/.staging/<id>.<seq>/<n>` (file number `n` of the layout; `seq` numbers the
//! announcements this process took) and the registry of announced transfers. Nothing here counts as received: at the offer
//! ([`super::offer::accept_offer`]) the files are moved into the transfer's `data/` as its
//! `.part` files and only chunks whose SHA-256 equals the manifest's digest join the set the
//! `Have` frame reports; they are made durable by the next checkpoint like any other chunk.
//! Everything else staged (another layout, another id, a chunk that does not match, a
//! transfer the gateway already knows) is thrown away, and the edge sends those chunks
//! after the offer as usual.
//!
//! An announcement lives as long as the control stream that made it: a stream that ends
//! without an accepted offer removes its staging directory, and a gateway that starts
//! removes whatever an earlier process left in `.staging/`. It must not verify anything
//! against a manifest itself, nor answer the edge.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baylink_net::proto::{ChunkHeader, ChunkLocation, ChunkSet, Digest, Layout, TransferId};
use baylink_net::spool::{DIRECT_ALIGN, SpoolFile};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::Gateway;
use crate::transfer_dir::{TransferDir, sync_dir};

/// The directory under the spool root that holds staged chunks.
pub(crate) const STAGING_DIR: &str = ".staging";

/// Most transfers one connection may have announced and not yet offered: `send` dials a
/// connection of its own for each transfer it announces.
const MAX_PER_CONNECTION: usize = 1;

/// Most transfers announced and not yet offered on the whole gateway, whatever the number of
/// connections.
const MAX_ANNOUNCED: usize = 16;

/// Most files of one announced transfer that are staged (one open file each): a transfer of
/// more files is not taken (its chunks are sent after the offer), so the announcements
/// together never hold more than `MAX_ANNOUNCED × MAX_FILES` files open.
const MAX_FILES: usize = 1024;

/// Numbers the staging directories, so that two announcements of one id never share one.
static STAGING_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One announced transfer's staged chunks.
#[derive(Debug)]
pub(super) struct Staged {
    /// The transfer the edge announced.
    id: TransferId,
    /// Where its chunks go.
    layout: Layout,
    /// The connection that announced it: only its chunk streams feed it.
    conn_id: usize,
    /// `spool/.staging/<id>/`.
    dir: PathBuf,
    /// File number `n` of the layout, as `dir/<n>`.
    files: Vec<Arc<SpoolFile>>,
    state: Mutex<State>,
    /// Signalled whenever a chunk stops arriving.
    settled: Notify,
}

#[derive(Debug)]
struct State {
    /// Chunks whose stream is being read.
    arriving: ChunkSet,
    /// Chunks wholly written here, with the SHA-256 of their bytes.
    got: HashMap<u32, Digest>,
    /// Taken by an offer or discarded: no chunk is started any more.
    closed: bool,
    /// Thrown away: chunks still arriving stop, and none is recorded.
    discarded: bool,
}

impl Staged {
    /// The connection (its `stable_id`) that announced the transfer.
    pub(super) fn conn_id(&self) -> usize {
        self.conn_id
    }

    /// Whether the staged transfer was taken or thrown away: no chunk is started.
    #[cfg(test)]
    pub(super) fn closed(&self) -> bool {
        self.state.lock().expect("staging lock poisoned").closed
    }

    /// Whether the staged chunks were thrown away: a chunk still arriving stops.
    pub(super) fn discarded(&self) -> bool {
        self.state.lock().expect("staging lock poisoned").discarded
    }

    /// Starts receiving the chunk of `header`: where its bytes go and the file to write them
    /// to, or why the stream is not wanted (closed, a chunk the layout does not have, a
    /// length it does not give, a chunk already here or arriving).
    pub(super) fn begin(
        &self,
        header: &ChunkHeader,
    ) -> Result<(ChunkLocation, Arc<SpoolFile>), String> {
        let Some(loc) = self.layout.chunk(header.index) else {
            return Err(format!(
                "chunk {} is not in the announced layout",
                header.index
            ));
        };
        if loc.len != header.len {
            return Err(format!(
                "chunk {} is {} bytes in the announced layout, not {}",
                header.index, loc.len, header.len
            ));
        }
        let mut state = self.state.lock().expect("staging lock poisoned");
        if state.closed {
            return Err("the announcement is closed".into());
        }
        if state.got.contains_key(&header.index) || !state.arriving.insert(header.index) {
            return Err(format!("chunk {} is already staged", header.index));
        }
        Ok((loc, self.files[loc.file].clone()))
    }

    /// The stream of chunk `index` ended: with the digest of its bytes once all of them were
    /// written here (every write finished), `None` if it did not finish. A chunk that began
    /// before the offer closed the announcement still counts; one thrown away does not.
    pub(super) fn end(&self, index: u32, digest: Option<Digest>) {
        let mut state = self.state.lock().expect("staging lock poisoned");
        state.arriving.remove(index);
        if let Some(d) = digest
            && !state.discarded
        {
            state.got.insert(index, d);
        }
        drop(state);
        self.settled.notify_waiters();
    }

    /// Closes the announcement (no chunk starts) and waits, at most `limit`, until the
    /// chunks arriving have ended: each is recorded, with its writes finished, or given up.
    async fn close_and_settle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let settled = self.settled.notified();
            {
                let mut state = self.state.lock().expect("staging lock poisoned");
                state.closed = true;
                if state.arriving.count() == 0 {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return;
            }
        }
    }
}

/// Removes what an earlier process staged (none of it was ever promised to anyone).
pub(super) fn clear_leftovers(spool_dir: &std::path::Path) {
    let dir = spool_dir.join(STAGING_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => info!(dir = %dir.display(), "removed chunks staged by an earlier process"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove staged chunks"),
    }
}

/// Takes an announcement of the connection `conn_id`: creates its staging directory and
/// files and registers it. `None` (logged) where the gateway does not take it: draining, a
/// transfer it already holds or has announced, a connection with an announcement open
/// already, [`MAX_ANNOUNCED`] open on the gateway, more than [`MAX_FILES`] files,
/// announcements that would take over half the spool's free space together, or a spool
/// that cannot create the files. The edge's chunk streams for it are then
/// refused and it sends them after the offer.
pub(super) async fn announce(
    gw: &Arc<Gateway>,
    conn_id: usize,
    id: TransferId,
    layout: Layout,
) -> Option<Arc<Staged>> {
    use std::sync::atomic::Ordering;
    if gw.draining.load(Ordering::Relaxed)
        || gw
            .active
            .lock()
            .expect("registry lock poisoned")
            .contains_key(&id)
        || TransferDir::new(&gw.spool_dir, &id).root().exists()
    {
        debug!(transfer = %id, "announcement not taken: draining, or a transfer already here");
        return None;
    }
    let (staged_bytes, announced) = {
        let staged = gw.staged.lock().expect("registry lock poisoned");
        let of_this_connection = staged.values().filter(|s| s.conn_id == conn_id).count();
        if staged.contains_key(&id) || of_this_connection >= MAX_PER_CONNECTION {
            debug!(transfer = %id, "announcement not taken: already announced, or too many");
            return None;
        }
        let bytes = staged
            .values()
            .fold(0u64, |sum, s| sum.saturating_add(s.layout.total_bytes()));
        (bytes, staged.len())
    };
    // Nothing signed stands behind staged bytes yet: all the announcements together may use
    // at most half of the spool's free space, so they can never fill it for signed
    // transfers.
    let free = crate::retention::spool_space(&gw.spool_dir).map_or(0, |(_, free)| free);
    if layout.file_sizes().len() > MAX_FILES || announced >= MAX_ANNOUNCED {
        debug!(transfer = %id, files = layout.file_sizes().len(), announced,
               "announcement not taken: too many files, or too many announcements open");
        return None;
    }
    if staged_bytes.saturating_add(layout.total_bytes()) > free / 2 {
        info!(transfer = %id, bytes = layout.total_bytes(), staged_bytes, free,
              "announcement not taken: staging it would take over half the spool's free space");
        return None;
    }
    let seq = STAGING_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = gw.spool_dir.join(STAGING_DIR).join(format!("{id}.{seq}"));
    let made = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&dir)).await
    };
    if !matches!(made, Ok(Ok(()))) {
        warn!(transfer = %id, dir = %dir.display(), "cannot create the staging directory");
        return None;
    }
    let direct = (layout.chunk_size() as usize).is_multiple_of(DIRECT_ALIGN)
        && gw.spool.buffers_allow_direct();
    let mut files = Vec::with_capacity(layout.file_sizes().len());
    for n in 0..layout.file_sizes().len() {
        let path = dir.join(n.to_string());
        let opened = if direct {
            gw.spool.open_rw_direct(&path).await
        } else {
            gw.spool.open_rw(&path).await
        };
        match opened {
            Ok(f) => files.push(Arc::new(f)),
            Err(e) => {
                warn!(transfer = %id, error = %e, cause = %e.source, "cannot create a staging file");
                remove_dir(dir).await;
                return None;
            }
        }
    }
    let staged = Arc::new(Staged {
        id,
        conn_id,
        dir,
        files,
        state: Mutex::new(State {
            arriving: ChunkSet::new(layout.chunk_count()),
            got: HashMap::new(),
            closed: false,
            discarded: false,
        }),
        layout,
        settled: Notify::new(),
    });
    let mut registry = gw.staged.lock().expect("registry lock poisoned");
    if registry.contains_key(&id) {
        return None;
    }
    registry.insert(id, staged.clone());
    drop(registry);
    info!(transfer = %id, chunks = staged.layout.chunk_count(), "announced: staging chunks until the offer");
    Some(staged)
}

/// What an accepted offer takes from its announcement.
#[derive(Debug)]
pub(super) struct Adopted {
    /// Chunks staged whose digest is the manifest's, now in the `.part` files (not yet
    /// fsynced).
    pub good: Vec<u32>,
    /// Their bytes.
    pub bytes: u64,
}

/// At the offer of `dir`'s transfer: moves the staged files into `data/` as its `.part`
/// files and returns the staged chunks that match the manifest; `None` (everything staged
/// thrown away) where the offer is not the one announced (another id or layout) or the
/// transfer already has chunks of its own (`have`), a `.part` or a final file.
pub(super) async fn adopt(
    gw: &Gateway,
    staged: &Arc<Staged>,
    dir: &TransferDir,
    manifest: &baylink_net::proto::Manifest,
    have: &ChunkSet,
) -> Option<Adopted> {
    unregister(gw, staged);
    staged.close_and_settle(gw.chunk_stall_timeout).await;
    let fresh = manifest
        .files
        .iter()
        .all(|f| !dir.part_file(&f.name).exists() && !dir.data_file(&f.name).exists());
    if staged.id != manifest.transfer_id
        || !staged.layout.matches(manifest)
        || have.count() > 0
        || dir.has_receipt()
        || !fresh
    {
        info!(transfer = %manifest.transfer_id, "staged chunks not taken: the offer is not the transfer announced");
        discard(gw, staged).await;
        return None;
    }
    let taken = {
        let state = staged.state.lock().expect("staging lock poisoned");
        // A stream that neither finished nor stalled within the limit: its writes may still
        // land, so nothing staged is trusted.
        (state.arriving.count() == 0).then(|| {
            let mut good: Vec<u32> = state
                .got
                .iter()
                .filter(|&(i, d)| manifest.chunk_digest(*i) == Some(d))
                .map(|(i, _)| *i)
                .collect();
            good.sort_unstable();
            good
        })
    };
    let Some(good) = taken else {
        warn!(transfer = %manifest.transfer_id, "a staged chunk is still arriving at the offer: staged chunks thrown away");
        discard(gw, staged).await;
        return None;
    };
    let bytes = good
        .iter()
        .filter_map(|i| manifest.chunk(*i))
        .map(|c| u64::from(c.len))
        .sum();
    // The staged files stay open (no stream uses them any more) until the last reference
    // to the announcement goes; a rename does not disturb an open file.
    let moves: Vec<(PathBuf, PathBuf)> = manifest
        .files
        .iter()
        .enumerate()
        .map(|(n, f)| (staged.dir.join(n.to_string()), dir.part_file(&f.name)))
        .collect();
    let (data, from) = (dir.data_dir(), staged.dir.clone());
    let moved = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for (staged, part) in moves {
            std::fs::rename(staged, part)?;
        }
        // The `.part` names are durable before any checkpoint lists a chunk in them.
        sync_dir(&data)?;
        std::fs::remove_dir(from)
    })
    .await;
    match moved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(transfer = %manifest.transfer_id, error = %e, "cannot move staged chunks into the transfer: thrown away");
            discard(gw, staged).await;
            return None;
        }
        Err(e) => {
            warn!(transfer = %manifest.transfer_id, error = %e, "staging task failed");
            discard(gw, staged).await;
            return None;
        }
    }
    info!(transfer = %manifest.transfer_id, chunks = good.len(), bytes, "staged chunks taken by the offer");
    Some(Adopted { good, bytes })
}

/// Throws an announcement's staged chunks away (the control stream ended without an
/// accepted offer, or the offer did not take them).
pub(super) async fn discard(gw: &Gateway, staged: &Arc<Staged>) {
    unregister(gw, staged);
    {
        let mut state = staged.state.lock().expect("staging lock poisoned");
        state.closed = true;
        state.discarded = true;
    }
    remove_dir(staged.dir.clone()).await;
}

fn unregister(gw: &Gateway, staged: &Arc<Staged>) {
    let mut registry = gw.staged.lock().expect("registry lock poisoned");
    if registry
        .get(&staged.id)
        .is_some_and(|s| Arc::ptr_eq(s, staged))
    {
        registry.remove(&staged.id);
    }
}

async fn remove_dir(dir: PathBuf) {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => warn!(dir = %shown, error = %e, "cannot remove staged chunks"),
        Err(e) => warn!(dir = %shown, error = %e, "cannot remove staged chunks"),
    }
}
