//! Chunks streamed before their transfer's offer: an edge that is still sealing announces
//! the transfer (`Announce`: its id and layout) and streams chunks as it hashes them; an
//! edge whose hospital is still uploading announces each file as it is stored, and streams
//! it. They are held aside here until the signed `Offer` says what they must be.
//!
//! Owns `spool/.staging/<id>.<seq>/<n>` (file number `n` of the layout, created when the
//! file is announced; `seq` numbers the announcements this process took) and the registry
//! of announced transfers. Nothing here counts as received: at the offer
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

use std::collections::{HashMap, HashSet};
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

/// Most files of one announced transfer that are staged (one open file each): files
/// announced beyond them are not taken (their chunks are sent after the offer), so the
/// announcements together never hold more than `MAX_ANNOUNCED × MAX_FILES` files open.
const MAX_FILES: usize = baylink_net::proto::MAX_ANNOUNCED_FILES;

/// How long an announcement may go without a chunk or more files before its offer: then
/// its staged chunks are thrown away (the edge sends them after the offer). An edge that
/// announces and goes quiet holds nothing for longer.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(300);

/// Numbers the staging directories, so that two announcements of one id never share one.
static STAGING_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One announced transfer's staged chunks.
#[derive(Debug)]
pub(super) struct Staged {
    /// The transfer the edge announced.
    id: TransferId,
    /// The connection that announced it: only its chunk streams feed it.
    conn_id: usize,
    /// `spool/.staging/<id>.<seq>/`.
    dir: PathBuf,
    /// Whether the files are written straight to the device (O_DIRECT).
    direct: bool,
    state: Mutex<State>,
    /// Signalled whenever a chunk stops arriving.
    settled: Notify,
}

#[derive(Debug)]
struct State {
    /// Where its chunks go: the files announced so far.
    layout: Layout,
    /// File number `n` of the layout, as `dir/<n>`.
    files: Vec<Arc<SpoolFile>>,
    /// Chunks whose stream is being read.
    arriving: HashSet<u32>,
    /// Chunks wholly written here, with the SHA-256 of their bytes.
    got: HashMap<u32, Digest>,
    /// Taken by an offer or discarded: no chunk is started any more.
    closed: bool,
    /// Thrown away: chunks still arriving stop, and none is recorded.
    discarded: bool,
    /// When a chunk last began or ended, or files were last announced.
    active_at: tokio::time::Instant,
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

    /// Returns once the announcement has gone [`IDLE_LIMIT`] with no chunk arriving, none
    /// beginning or ending, and no more files announced; it is then closed (no chunk begins
    /// any more), for the caller to throw away.
    pub(super) async fn idle(&self) {
        loop {
            let since = self.state.lock().expect("staging lock poisoned").active_at;
            tokio::time::sleep_until(since + IDLE_LIMIT).await;
            let mut state = self.state.lock().expect("staging lock poisoned");
            if !state.arriving.is_empty() {
                // A chunk still arriving, however slowly, is activity.
                state.active_at = tokio::time::Instant::now();
            } else if state.active_at == since {
                state.closed = true;
                return;
            }
        }
    }

    /// Files announced and staged.
    fn file_count(&self) -> usize {
        self.state
            .lock()
            .expect("staging lock poisoned")
            .layout
            .file_count()
    }

    /// Bytes of the files announced and staged.
    fn total_bytes(&self) -> u64 {
        self.state
            .lock()
            .expect("staging lock poisoned")
            .layout
            .total_bytes()
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
        let mut state = self.state.lock().expect("staging lock poisoned");
        let Some(loc) = state.layout.chunk(header.index) else {
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
        if state.closed {
            return Err("the announcement is closed".into());
        }
        if state.got.contains_key(&header.index) || !state.arriving.insert(header.index) {
            return Err(format!("chunk {} is already staged", header.index));
        }
        state.active_at = tokio::time::Instant::now();
        Ok((loc, state.files[loc.file].clone()))
    }

    /// The stream of chunk `index` ended: with the digest of its bytes once all of them were
    /// written here (every write finished), `None` if it did not finish. A chunk that began
    /// before the offer closed the announcement still counts; one thrown away does not.
    pub(super) fn end(&self, index: u32, digest: Option<Digest>) {
        let mut state = self.state.lock().expect("staging lock poisoned");
        state.arriving.remove(&index);
        if let Some(d) = digest
            && !state.discarded
        {
            state.got.insert(index, d);
        }
        state.active_at = tokio::time::Instant::now();
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
                if state.arriving.is_empty() {
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
    let announced = {
        let staged = gw.staged.lock().expect("registry lock poisoned");
        let of_this_connection = staged.values().filter(|s| s.conn_id == conn_id).count();
        if staged.contains_key(&id) || of_this_connection >= MAX_PER_CONNECTION {
            debug!(transfer = %id, "announcement not taken: already announced, or too many");
            return None;
        }
        staged.len()
    };
    if announced >= MAX_ANNOUNCED {
        debug!(transfer = %id, announced, "announcement not taken: too many announcements open");
        return None;
    }
    if !within_limits(gw, None, &id, &layout) {
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
    let Some(files) = create_files(gw, &id, &dir, direct, 0..layout.file_count()).await else {
        remove_dir(dir).await;
        return None;
    };
    let staged = Arc::new(Staged {
        id,
        conn_id,
        dir,
        direct,
        state: Mutex::new(State {
            layout,
            files,
            arriving: HashSet::new(),
            got: HashMap::new(),
            closed: false,
            discarded: false,
            active_at: tokio::time::Instant::now(),
        }),
        settled: Notify::new(),
    });
    let mut registry = gw.staged.lock().expect("registry lock poisoned");
    if registry.contains_key(&id) {
        return None;
    }
    registry.insert(id, staged.clone());
    drop(registry);
    info!(transfer = %id, files = staged.file_count(), "announced: staging chunks until the offer");
    Some(staged)
}

/// Takes more files of an announcement: `layout` is every file announced so far, the
/// staged ones first. Creates the new files' staging files. `false` (logged) where it does
/// not take them: the announcement is closed, or would be over [`MAX_FILES`] or take, with
/// the others, over half the spool's free space, or a file cannot be created. Chunks of the
/// files it did not take are refused, and the edge sends them after the offer; what was
/// staged before stays.
pub(super) async fn extend(gw: &Arc<Gateway>, staged: &Arc<Staged>, layout: Layout) -> bool {
    let had = {
        let state = staged.state.lock().expect("staging lock poisoned");
        if state.closed || layout.file_count() < state.layout.file_count() {
            return false;
        }
        state.layout.file_count()
    };
    if !within_limits(gw, Some(staged), &staged.id, &layout) {
        return false;
    }
    let Some(mut more) = create_files(
        gw,
        &staged.id,
        &staged.dir,
        staged.direct,
        had..layout.file_count(),
    )
    .await
    else {
        return false;
    };
    let mut state = staged.state.lock().expect("staging lock poisoned");
    if state.closed {
        return false;
    }
    state.files.append(&mut more);
    state.layout = layout;
    state.active_at = tokio::time::Instant::now();
    let files = state.layout.file_count();
    drop(state);
    debug!(transfer = %staged.id, files, "announcement grown");
    true
}

/// Whether `layout` for transfer `id` stays within [`MAX_FILES`] and, with the other
/// announcements (all but `this`), within half the spool's free space. Logs why not.
fn within_limits(
    gw: &Gateway,
    this: Option<&Arc<Staged>>,
    id: &TransferId,
    layout: &Layout,
) -> bool {
    if layout.file_count() > MAX_FILES {
        debug!(transfer = %id, files = layout.file_count(), "announcement not taken: too many files");
        return false;
    }
    let others = gw
        .staged
        .lock()
        .expect("registry lock poisoned")
        .values()
        .filter(|s| this.is_none_or(|t| !Arc::ptr_eq(s, t)))
        .fold(0u64, |sum, s| sum.saturating_add(s.total_bytes()));
    // Nothing signed stands behind staged bytes yet: all the announcements together may use
    // at most half of the spool's free space, so they can never fill it for signed
    // transfers.
    let free = crate::retention::spool_space(&gw.spool_dir).map_or(0, |(_, free)| free);
    if others.saturating_add(layout.total_bytes()) > free / 2 {
        info!(transfer = %id, bytes = layout.total_bytes(), staged_bytes = others, free,
              "announcement not taken: staging it would take over half the spool's free space");
        return false;
    }
    true
}

/// Creates staging files `numbers` in `dir`; `None` (logged) if one cannot be.
async fn create_files(
    gw: &Gateway,
    id: &TransferId,
    dir: &std::path::Path,
    direct: bool,
    numbers: std::ops::Range<usize>,
) -> Option<Vec<Arc<SpoolFile>>> {
    let mut files = Vec::with_capacity(numbers.len());
    for n in numbers {
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
                return None;
            }
        }
    }
    Some(files)
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

/// At the offer of `dir`'s transfer: moves the staged files into `data/` as the `.part`
/// files of the manifest's first files and returns the staged chunks that match the
/// manifest; `None` (everything staged thrown away) where the offer is not the one
/// announced (another id, or a manifest that does not begin with the announced files) or
/// the transfer already has chunks of its own (`have`), a `.part` or a final file.
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
    let layout = staged
        .state
        .lock()
        .expect("staging lock poisoned")
        .layout
        .clone();
    if staged.id != manifest.transfer_id
        || !layout.is_prefix_of(manifest)
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
        state.arriving.is_empty().then(|| {
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
        .take(layout.file_count())
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
