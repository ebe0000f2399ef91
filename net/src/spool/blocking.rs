//! The spool's requests served with blocking `std::fs` calls on an ordinary thread
//! ([`super::Spool::start_blocking`], feature `testing`): what the callers of the spool
//! need in unit tests where io_uring is missing. One request at a time, in order; the same
//! open modes (`O_DIRECT` where the file system takes it), the same answers and errors.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::{DIRECT_ALIGN, OpenMode, Request, SpoolError, SpoolOp, parent_dirs};

/// Serves `requests` until every [`super::Spool`] handle is gone.
pub(super) fn serve(
    mut requests: mpsc::Receiver<Request>,
    mut closes: mpsc::UnboundedReceiver<u64>,
) {
    let mut files: HashMap<u64, File> = HashMap::new();
    let mut next_id = 0u64;
    while let Some(request) = requests.blocking_recv() {
        while let Ok(id) = closes.try_recv() {
            files.remove(&id);
        }
        handle(&mut files, &mut next_id, request);
    }
}

fn not_open() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "spool file is not open (closed?)")
}

fn handle(files: &mut HashMap<u64, File>, next_id: &mut u64, request: Request) {
    // A send fails only when the caller stopped waiting; the work is done either way.
    match request {
        Request::Open { path, mode, reply } => {
            let result = open(&path, mode)
                .map(|file| {
                    let id = *next_id;
                    *next_id = next_id.wrapping_add(1);
                    files.insert(id, file);
                    id
                })
                .map_err(|e| SpoolError::new(mode.op(), path.to_path_buf(), e));
            let _ = reply.send(result);
        }
        Request::Write {
            id,
            path,
            offset,
            buf,
            reply,
        } => {
            let result = match files.get(&id) {
                Some(file) => file.write_all_at(&buf, offset).map(|()| buf),
                None => Err(not_open()),
            };
            let _ = reply.send(result.map_err(|e| SpoolError::new(SpoolOp::Write, &*path, e)));
        }
        Request::Read {
            id,
            path,
            offset,
            mut buf,
            len,
            direct,
            reply,
        } => {
            let result = match files.get(&id) {
                Some(file) => read(file, offset, &mut buf, len, direct).map(|()| buf),
                None => Err(not_open()),
            };
            let _ = reply.send(result.map_err(|e| SpoolError::new(SpoolOp::Read, &*path, e)));
        }
        Request::Sync { id, path, reply } => {
            let result = files.get(&id).ok_or_else(not_open).and_then(File::sync_all);
            let _ = reply.send(result.map_err(|e| SpoolError::new(SpoolOp::Sync, &*path, e)));
        }
        Request::Close { id, path, reply } => {
            let result = files.remove(&id).map(drop).ok_or_else(not_open);
            let _ = reply.send(result.map_err(|e| SpoolError::new(SpoolOp::Close, &*path, e)));
        }
        Request::Rename { pairs, reply } => {
            let _ = reply.send(commit_renames(&pairs));
        }
        Request::SyncDir { path, reply } => {
            let result = sync_dir(&path).map_err(|e| SpoolError::new(SpoolOp::SyncDir, path, e));
            let _ = reply.send(result);
        }
        Request::Remove { path, reply } => {
            let result =
                std::fs::remove_file(&path).map_err(|e| SpoolError::new(SpoolOp::Remove, path, e));
            let _ = reply.send(result);
        }
    }
}

fn open(path: &Path, mode: OpenMode) -> io::Result<File> {
    let f = mode.flags();
    OpenOptions::new()
        .read(true)
        .write(f.write)
        .create(f.create)
        .truncate(f.truncate)
        .custom_flags(f.custom)
        .open(path)
}

/// Fills `buf` with up to `len` bytes at `offset`, as the uring thread's `read` does.
fn read(
    file: &File,
    offset: u64,
    buf: &mut super::SpoolBuf,
    len: usize,
    direct: bool,
) -> io::Result<()> {
    let mut bytes = buf.take_bytes();
    // Within the pool buffer's capacity (checked by `Spool::read_at`): no reallocation, so
    // the alignment `O_DIRECT` needs is kept.
    bytes.clear();
    bytes.resize(len, 0);
    let mut filled = 0;
    let result = loop {
        if filled == len {
            break Ok(());
        }
        match file.read_at(&mut bytes[filled..len], offset + filled as u64) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                filled += n;
                if direct && !filled.is_multiple_of(DIRECT_ALIGN) {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    bytes.truncate(if result.is_ok() { filled } else { 0 });
    buf.restore(bytes);
    result
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn commit_renames(pairs: &[(PathBuf, PathBuf)]) -> Result<(), SpoolError> {
    for (from, to) in pairs {
        std::fs::rename(from, to).map_err(|e| SpoolError::new(SpoolOp::Rename, from, e))?;
    }
    for dir in parent_dirs(pairs) {
        sync_dir(&dir).map_err(|e| SpoolError::new(SpoolOp::SyncDir, &dir, e))?;
    }
    Ok(())
}
