//! One loaded, initialised PKCS#11 module per path per process.
//!
//! `C_Initialize` may run once per process until `C_Finalize`. Every [`crate::Token`] and
//! provisioning call for the same module shares one [`Library`]; the last one dropped calls
//! `C_Finalize`, so a later load initialises afresh (SoftHSM re-reads `SOFTHSM2_CONF` then).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};

use crate::error::HsmError;

/// A loaded and initialised module. Finalised when the last `Arc` is dropped.
pub(crate) struct Library {
    ctx: Option<Pkcs11>,
    path: PathBuf,
    key: PathBuf,
    id: u64,
}

#[derive(Default)]
struct Registry {
    loaded: HashMap<PathBuf, (u64, Weak<Library>)>,
    next_id: u64,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
/// Signalled when a `Library` has finalised and left the registry.
static RELEASED: Condvar = Condvar::new();

fn registry() -> MutexGuard<'static, Option<Registry>> {
    // The registry holds no invariant a panicking thread could break half-way.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Library {
    /// The loaded module at `path`, loading and initialising it (OS locking) if needed.
    pub(crate) fn load(path: &Path) -> Result<Arc<Library>, HsmError> {
        // Two spellings of one module must share one initialisation.
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let mut guard = registry();
        loop {
            let reg = guard.get_or_insert_with(Registry::default);
            match reg.loaded.get(&key) {
                None => break,
                Some((_, weak)) => match weak.upgrade() {
                    Some(library) => return Ok(library),
                    // Dropped but not yet finalised: wait for its `Drop` to finish.
                    None => guard = RELEASED.wait(guard).unwrap_or_else(PoisonError::into_inner),
                },
            }
        }
        let ctx = Pkcs11::new(&key).map_err(|source| HsmError::ModuleLoad {
            path: path.to_owned(),
            source,
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                HsmError::call(format!("initialising PKCS#11 module {}", path.display()), e)
            })?;
        let reg = guard.get_or_insert_with(Registry::default);
        let id = reg.next_id;
        reg.next_id += 1;
        let library = Arc::new(Library {
            ctx: Some(ctx),
            path: path.to_owned(),
            key: key.clone(),
            id,
        });
        reg.loaded.insert(key, (id, Arc::downgrade(&library)));
        tracing::debug!(module = %path.display(), "PKCS#11 module loaded and initialised");
        Ok(library)
    }

    /// The cryptoki context.
    pub(crate) fn ctx(&self) -> &Pkcs11 {
        self.ctx
            .as_ref()
            .expect("the context is only taken in Drop")
    }

    /// The module path as configured.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        let mut guard = registry();
        if let Some(ctx) = self.ctx.take()
            && let Err(e) = ctx.finalize()
        {
            tracing::warn!(module = %self.path.display(), error = %e, "C_Finalize failed");
        }
        if let Some(reg) = guard.as_mut()
            && reg
                .loaded
                .get(&self.key)
                .is_some_and(|(id, _)| *id == self.id)
        {
            reg.loaded.remove(&self.key);
        }
        drop(guard);
        RELEASED.notify_all();
    }
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
