//! The signed-note and checkpoint parser (`audit::note`: `split_note`,
//! `Checkpoint::parse_body`, `open`) and the witness cosignature check
//! (`audit::witness::verify_cosignature`), on arbitrary text.
//!
//! Byte 0 picks the mode:
//! - even: the rest (lossy UTF-8) is a whole note: split, parsed and opened with a key
//!   that never signed it; its last line is also tried as a cosignature of it;
//! - odd: the rest is a checkpoint body, which this target signs (a software P-256 key,
//!   for the harness only) into a note and cosigns as a witness, so the parser is explored
//!   past the signature check it could never pass by chance.
//!
//! Checks, beyond not panicking: a parsed checkpoint re-encodes (`body`) to text that
//! parses to the same checkpoint; a body that parses, signed by the key, opens to that
//! checkpoint (origins without spaces or `+`, which a key name cannot carry), and its
//! cosignature verifies with the time it carries.
#![no_main]

use std::sync::LazyLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use baylink::audit::note::{Checkpoint, MAX_NOTE, ORIGIN_PREFIX, open, signed_note, split_note};
use baylink::audit::witness::{
    cosignature_key_id, cosigned_message, verify_cosignature, witness_name,
};
use baylink_hsm::PublicKey;
use libfuzzer_sys::fuzz_target;

struct Key {
    /// Signs `r || s`, as the HSM does (notes).
    fixed: EcdsaKeyPair,
    /// The same key signing DER, as a cosignature carries it.
    der: EcdsaKeyPair,
    public: PublicKey,
}

static KEY: LazyLock<Key> = LazyLock::new(|| {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("key");
    let fixed =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("key");
    let der =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).expect("key");
    let public = PublicKey::from_sec1(fixed.public_key().as_ref()).expect("public key");
    Key { fixed, der, public }
});

fn sign(msg: &[u8]) -> [u8; 64] {
    let sig = KEY.fixed.sign(&SystemRandom::new(), msg).expect("sign");
    sig.as_ref().try_into().expect("r || s")
}

fn reparses(cp: &Checkpoint) {
    assert_eq!(
        Checkpoint::parse_body(&cp.body()).as_ref(),
        Ok(cp),
        "body does not round-trip"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let key = &KEY.public;
    if mode % 2 == 0 {
        if let Ok((t, sigs)) = split_note(&text) {
            assert!(t.ends_with('\n') && !sigs.is_empty());
            if let Ok(cp) = Checkpoint::parse_body(t) {
                reparses(&cp);
            }
        }
        if let Ok(cp) = Checkpoint::parse_body(&text) {
            reparses(&cp);
        }
        let _ = open(&text, key, None);
        let _ = open(&text, key, Some("baylink.audit/edge"));
        if let Some(line) = text.lines().last() {
            let _ = verify_cosignature(&text, line, key);
        }
        return;
    }
    let Ok(cp) = Checkpoint::parse_body(&text) else {
        return;
    };
    reparses(&cp);
    let note = signed_note(&text, &cp.origin, key, &sign(text.as_bytes()));
    let opened = open(&note, key, None);
    let plain = note.len() <= MAX_NOTE
        && !note.bytes().any(|b| b < 0x20 && b != b'\n')
        && cp.origin.starts_with(ORIGIN_PREFIX)
        && !cp.origin.contains([' ', '+']);
    if plain {
        assert_eq!(
            opened.as_ref(),
            Ok(&cp),
            "a signed checkpoint does not open"
        );
        assert_eq!(open(&note, key, Some(&cp.origin)).as_ref(), Ok(&cp));
        let name = witness_name("gw");
        let time = u64::from(mode) << 20;
        let sig = KEY
            .der
            .sign(
                &SystemRandom::new(),
                cosigned_message(time, &text).as_bytes(),
            )
            .expect("sign");
        let mut blob = cosignature_key_id(&name, key).to_vec();
        blob.extend_from_slice(&time.to_be_bytes());
        blob.extend_from_slice(sig.as_ref());
        let line = format!("\u{2014} {name} {}", STANDARD.encode(blob));
        assert_eq!(
            verify_cosignature(&note, &line, key),
            Ok(time),
            "cosignature"
        );
    } else {
        assert!(opened.is_err() || cp.origin.starts_with(ORIGIN_PREFIX));
    }
});
