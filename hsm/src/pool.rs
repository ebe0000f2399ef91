//! A bounded pool of logged-in sessions on one token, with recovery after a token reset.
//!
//! PKCS#11 sessions are single-threaded (`Session` is `Send`, not `Sync`); a thread borrows one
//! for one operation. The login state belongs to the application and token, not the session:
//! one `C_Login` serves every session, and closing the last session logs out.
//!
//! Recovery runs at most once per operation ([`Pool::run`]):
//! - the session is gone (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`,
//!   `CKR_TOKEN_NOT_PRESENT`, `CKR_DEVICE_REMOVED`): every pooled session is discarded, the
//!   token is found again by label, a new session is opened and logged in;
//! - the login is gone (`CKR_USER_NOT_LOGGED_IN`): log in again;
//! - the key handle is stale (`CKR_KEY_HANDLE_INVALID`, `CKR_OBJECT_HANDLE_INVALID`; SoftHSM
//!   answers so after a logout, as private objects vanish): log in again if needed, and
//!   callers look the key up again.
//!
//! A PIN the token refused is never offered again (real tokens lock the PIN after a few
//! wrong tries): later operations fail at once, naming the refusal.
//!
//! Each recovery bumps [`Pool::epoch`], so cached object handles are looked up afresh.
//! Discarded sessions are forgotten, never closed: after a reset their handle numbers may
//! already belong to new sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use crate::error::HsmError;
use crate::library::Library;

/// What an error means for the session that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The session no longer exists: forget it, open new ones.
    SessionLost,
    /// The application was logged out: log in again.
    LoggedOut,
    /// An object handle is stale: look the object up again.
    StaleHandle,
    /// Anything else: the operation failed; close the session in case it is left mid-operation.
    Other,
    /// Not a token error (e.g. a verification failure after signing): the session is fine.
    None,
}

fn classify(err: &HsmError) -> Fault {
    match err.return_code() {
        Some(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::DeviceRemoved,
        ) => Fault::SessionLost,
        Some(RvError::UserNotLoggedIn) => Fault::LoggedOut,
        Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid) => Fault::StaleHandle,
        Some(_) => Fault::Other,
        None => Fault::None,
    }
}

struct State {
    /// Bumped when every session is discarded; sessions of an older generation are forgotten.
    generation: u64,
    slot: Slot,
    idle: Vec<Session>,
    /// Sessions of the current generation, idle or lent.
    open: usize,
}

pub(crate) struct Pool {
    library: Arc<Library>,
    token_label: String,
    pin: SecretString,
    size: usize,
    state: Mutex<State>,
    returned: Condvar,
    epoch: AtomicU64,
    /// Set when the token refused the PIN: never try it again (each try can count towards
    /// locking the PIN). Reopening the token is the way out, after the PIN is fixed.
    pin_refused: Mutex<Option<(Function, RvError)>>,
}

/// A session lent to one operation; goes back to the pool (or away) on drop.
pub(crate) struct Lease<'p> {
    pool: &'p Pool,
    session: Option<Session>,
    generation: u64,
    fault: Fault,
}

impl Lease<'_> {
    pub(crate) fn session(&self) -> &Session {
        self.session
            .as_ref()
            .expect("the session is only taken in Drop")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if state.generation == self.generation {
            match self.fault {
                Fault::None | Fault::LoggedOut | Fault::StaleHandle => state.idle.push(session),
                Fault::SessionLost => {
                    state.open -= 1;
                    drop(session);
                }
                Fault::Other => {
                    state.open -= 1;
                    // Still a valid handle: close it so no half-done operation is reused.
                    let _ = session.close();
                }
            }
        }
        // Older generation: forget it (see the module documentation).
        drop(state);
        self.pool.returned.notify_one();
    }
}

impl Pool {
    /// Finds the token, opens `size` sessions and logs in.
    pub(crate) fn open(
        library: Arc<Library>,
        token_label: &str,
        pin: SecretString,
        size: usize,
    ) -> Result<Pool, HsmError> {
        if size == 0 {
            return Err(HsmError::InvalidConfig {
                reason: "the session pool needs at least one session",
            });
        }
        let slot = find_token(&library, token_label)?;
        let pool = Pool {
            library,
            token_label: token_label.to_owned(),
            pin,
            size,
            state: Mutex::new(State {
                generation: 0,
                slot,
                idle: Vec::with_capacity(size),
                open: 0,
            }),
            returned: Condvar::new(),
            epoch: AtomicU64::new(0),
            pin_refused: Mutex::new(None),
        };
        {
            let mut state = pool.lock();
            let first = pool.open_session(slot)?;
            let login = pool.login(&first);
            // Pooled before the login result is checked, so Drop closes it on failure.
            state.idle.push(first);
            state.open = 1;
            login?;
            while state.open < size {
                let session = pool.open_session(slot)?;
                state.idle.push(session);
                state.open += 1;
            }
        }
        Ok(pool)
    }

    pub(crate) fn library(&self) -> &Library {
        &self.library
    }

    pub(crate) fn token_label(&self) -> &str {
        &self.token_label
    }

    pub(crate) fn slot(&self) -> Slot {
        self.lock().slot
    }

    /// Changes whenever a recovery has run; object handles cached under an older epoch are stale.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Runs `op` on a pooled session; after a token reset, recovers and runs it once more.
    pub(crate) fn run<T>(
        &self,
        mut op: impl FnMut(&Session, &Pool) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let (err, fault, generation) = {
            let mut lease = self.lease()?;
            match op(lease.session(), self) {
                Ok(v) => return Ok(v),
                Err(err) => {
                    lease.fault = classify(&err);
                    (err, lease.fault, lease.generation)
                }
            }
        };
        match fault {
            Fault::SessionLost => self.reopen(generation)?,
            // A logout also shows as a stale handle: private objects vanish from a session
            // that is not logged in. Logging in when already logged in is harmless.
            Fault::LoggedOut | Fault::StaleHandle => self.relogin()?,
            Fault::Other | Fault::None => return Err(err),
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(token = %self.token_label, error = %err, "token reset recovered; retrying once");
        let mut lease = self.lease()?;
        op(lease.session(), self).inspect_err(|err| lease.fault = classify(err))
    }

    /// Borrows a session, opening one if fewer than `size` exist, else waiting for one.
    pub(crate) fn lease(&self) -> Result<Lease<'_>, HsmError> {
        let mut state = self.lock();
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(Lease {
                    pool: self,
                    session: Some(session),
                    generation: state.generation,
                    fault: Fault::None,
                });
            }
            if state.open < self.size {
                let session = self.open_session(state.slot)?;
                state.open += 1;
                return Ok(Lease {
                    pool: self,
                    session: Some(session),
                    generation: state.generation,
                    fault: Fault::None,
                });
            }
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A read-write session outside the pool (key generation), logged in through the pool.
    pub(crate) fn rw_session(&self) -> Result<Session, HsmError> {
        let slot = self.slot();
        self.library.ctx().open_rw_session(slot).map_err(|e| {
            HsmError::call(
                format!(
                    "opening a read-write session on token \"{}\"",
                    self.token_label
                ),
                e,
            )
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is updated in single assignments; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_session(&self, slot: Slot) -> Result<Session, HsmError> {
        self.library
            .ctx()
            .open_ro_session_no_drop(slot)
            .map_err(|e| {
                HsmError::call(
                    format!("opening a session on token \"{}\"", self.token_label),
                    e,
                )
            })
    }

    /// `C_Login` as user; already logged in (by another session or `Token`) is success.
    /// After the token has refused the PIN once, fails without asking it again.
    fn login(&self, session: &Session) -> Result<(), HsmError> {
        let mut refused = self
            .pin_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((function, rv)) = *refused {
            return Err(HsmError::Pkcs11 {
                action: format!(
                    "not logging in to token \"{}\" again: it refused the PIN before",
                    self.token_label
                ),
                function,
                rv,
            });
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) => Ok(()),
            Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => {
                if let CryptokiError::Pkcs11(
                    rv @ (RvError::PinIncorrect
                    | RvError::PinLocked
                    | RvError::PinExpired
                    | RvError::PinInvalid
                    | RvError::PinLenRange),
                    function,
                ) = e
                {
                    *refused = Some((function, rv));
                }
                Err(HsmError::call(
                    format!("logging in to token \"{}\" as user", self.token_label),
                    e,
                ))
            }
        }
    }

    fn relogin(&self) -> Result<(), HsmError> {
        let (result, generation) = {
            let mut lease = self.lease()?;
            let result = self.login(lease.session());
            if let Err(err) = &result {
                lease.fault = classify(err);
            }
            (result, lease.generation)
        };
        match result {
            Err(err) if classify(&err) == Fault::SessionLost => self.reopen(generation),
            other => other,
        }
    }

    /// Discards every session of `generation` (unless another thread already did), finds the
    /// token again and opens one logged-in session.
    fn reopen(&self, generation: u64) -> Result<(), HsmError> {
        let mut state = self.lock();
        if state.generation != generation {
            return Ok(());
        }
        state.generation += 1;
        state.open = 0;
        // Forgotten, not closed (cryptoki's `_no_drop` sessions do nothing on drop).
        state.idle.clear();
        let slot = find_token(&self.library, &self.token_label)?;
        state.slot = slot;
        let session = self.open_session(slot)?;
        let login = self.login(&session);
        state.idle.push(session);
        state.open = 1;
        drop(state);
        self.returned.notify_all();
        login
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for session in state.idle.drain(..) {
            let _ = session.close();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("token_label", &self.token_label)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The slot holding the initialised token labelled `label` (slot numbers change; labels do not).
pub(crate) fn find_token(library: &Library, label: &str) -> Result<Slot, HsmError> {
    let ctx = library.ctx();
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::call("listing slots", e))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(|e| {
            HsmError::call(
                format!("reading token information for slot {}", slot.id()),
                e,
            )
        })?;
        if !info.token_initialized() {
            continue;
        }
        if info.label() == label {
            return Ok(slot);
        }
        present.push(info.label().to_owned());
    }
    Err(HsmError::TokenNotFound {
        label: label.to_owned(),
        present,
    })
}
