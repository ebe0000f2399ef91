//! Token provisioning for dev-env and tests: initialise a token and set its user PIN.
//!
//! On an appliance the token is provisioned with the vendor's tools; this is the same job for
//! SoftHSM and any module that has a free slot.

use std::path::Path;

use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::error::HsmError;
use crate::library::Library;
use crate::objects::check_label;
use crate::pool::find_token;

/// `C_InitToken` on a slot with an uninitialised token, then SO login and `C_InitPIN` for the
/// user PIN. Refuses a label an initialised token already has ([`HsmError::TokenExists`]).
///
/// SoftHSM needs `SOFTHSM2_CONF` to point at a configuration whose token directory exists,
/// before the module is first loaded in the process.
pub fn init_token(
    module: &Path,
    token_label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    check_label(token_label)?;
    let library = Library::load(module)?;
    match find_token(&library, token_label) {
        Ok(_) => {
            return Err(HsmError::TokenExists {
                label: token_label.to_owned(),
            });
        }
        Err(HsmError::TokenNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let ctx = library.ctx();
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::call("listing slots", e))?;
    let mut free = None;
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(|e| {
            HsmError::call(
                format!("reading token information for slot {}", slot.id()),
                e,
            )
        })?;
        if !info.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or(HsmError::NoFreeSlot)?;
    ctx.init_token(slot, so_pin, token_label).map_err(|e| {
        HsmError::call(
            format!("initialising token \"{token_label}\" in slot {}", slot.id()),
            e,
        )
    })?;
    // The initialised token may now sit in another slot.
    let slot = find_token(&library, token_label)?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::call(format!("opening a session on token \"{token_label}\""), e))?;
    session.login(UserType::So, Some(so_pin)).map_err(|e| {
        HsmError::call(
            format!("logging in to token \"{token_label}\" as security officer"),
            e,
        )
    })?;
    session.init_pin(user_pin).map_err(|e| {
        HsmError::call(
            format!("setting the user PIN of token \"{token_label}\""),
            e,
        )
    })?;
    session
        .logout()
        .map_err(|e| HsmError::call(format!("logging out of token \"{token_label}\""), e))?;
    tracing::info!(token = %token_label, slot = slot.id(), "token initialised");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serial_test::serial;

    use super::*;
    use crate::testing::{self, SoftHsm};

    #[test]
    #[serial]
    fn refuses_a_label_that_exists() {
        let hsm = SoftHsm::new().unwrap();
        let err = init_token(
            hsm.module(),
            hsm.token_label(),
            &testing::so_pin(),
            &testing::user_pin(),
        )
        .unwrap_err();
        assert!(matches!(err, HsmError::TokenExists { .. }), "{err:?}");
    }

    #[test]
    #[serial]
    fn second_token_gets_its_own_slot_and_pin() {
        let hsm = SoftHsm::new().unwrap();
        let other_pin = SecretString::from("other-user-pin");
        init_token(hsm.module(), "second", &testing::so_pin(), &other_pin).unwrap();
        let mut config = hsm.config("k");
        config.token_label = "second".into();
        config.pin = other_pin;
        let second = crate::Token::open(&config).unwrap();
        let first = hsm.open("k").unwrap();
        assert_ne!(first.slot_id(), second.slot_id());
    }
}
