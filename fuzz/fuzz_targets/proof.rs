//! The inclusion proof JSON (what `baylink audit verify-proof` reads and the evidence
//! download carries): `audit::Proof` from arbitrary bytes, then `verify_proof` and
//! `verify_proof_cosigned`, which parse the checkpoint note, each record's canonical JSON
//! and its hex audit path.
//!
//! Byte 0 picks the mode:
//! - even: the rest is the proof as it is (its checkpoint is never signed by the key);
//! - odd: the rest is a proof whose checkpoint this target replaces by one it signs (a
//!   software P-256 key, for the harness only) over the proof's own records, placed at
//!   leaves 0, 1, … with their correct audit paths, so the record checks run past the
//!   signature and the root they could never match by chance.
//!
//! Checks, beyond not panicking: in the odd mode a proof whose every record is canonical,
//! the transfer's, and says its own position as seq verifies, with those records; any
//! other is refused.
#![no_main]

use std::sync::LazyLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use baylink::audit::note::{Checkpoint, signed_note};
use baylink::audit::{MAX_PROOF_RECORDS, Proof, Record, verify_proof, verify_proof_cosigned};
use baylink_hsm::PublicKey;
use baylink_net::proto::Digest;
use baylink_net::merkle::{
    inclusion_proof_from_leaf_hashes, leaf_hash, root_from_leaf_hashes,
};
use libfuzzer_sys::fuzz_target;

struct Key {
    pair: EcdsaKeyPair,
    public: PublicKey,
}

static KEY: LazyLock<Key> = LazyLock::new(|| {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
    let public = PublicKey::from_sec1(pair.public_key().as_ref()).expect("public key");
    Key { pair, public }
});

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(mut proof) = serde_json::from_slice::<Proof>(rest) else {
        return;
    };
    let key = &KEY.public;
    if mode % 2 == 0 {
        let _ = verify_proof(&proof, key);
        let _ = verify_proof_cosigned(&proof, key, key);
        return;
    }
    if proof.records.len() > MAX_PROOF_RECORDS {
        return;
    }
    let leaves: Vec<Digest> = proof
        .records
        .iter()
        .map(|r| leaf_hash(r.record.as_bytes()))
        .collect();
    let cp = Checkpoint {
        origin: "baylink.audit/edge".into(),
        size: leaves.len() as u64,
        root: root_from_leaf_hashes(&leaves),
        time_ms: Some(1),
    };
    let body = cp.body();
    let sig = KEY
        .pair
        .sign(&SystemRandom::new(), body.as_bytes())
        .expect("sign");
    let raw: [u8; 64] = sig.as_ref().try_into().expect("r || s");
    proof.checkpoint = signed_note(&body, &cp.origin, key, &raw);
    for (i, r) in proof.records.iter_mut().enumerate() {
        r.index = i as u64;
        r.inclusion = inclusion_proof_from_leaf_hashes(i as u64, &leaves)
            .expect("index within the tree")
            .iter()
            .map(hex)
            .collect();
    }
    let expected: Option<Vec<Record>> = proof
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Record::from_canonical(r.record.as_bytes())
                .ok()
                .filter(|rec| {
                    rec.seq == i as u64 && rec.transfer.as_deref() == Some(proof.transfer.as_str())
                })
        })
        .collect();
    let result = verify_proof(&proof, key);
    match (proof.version, expected) {
        (1, Some(records)) if !records.is_empty() => {
            let summary = result.expect("a well-formed signed proof verifies");
            assert_eq!(summary.records, records);
            assert_eq!(summary.checkpoint, cp);
        }
        _ => assert!(result.is_err(), "a bad proof verifies"),
    }
    let _ = verify_proof_cosigned(&proof, key, key);
});
