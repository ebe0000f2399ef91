//! Unit tests of the audit log against a real SoftHSM token.

#![allow(clippy::unwrap_used)]

use std::io::Write;

use baylink_hsm::{PublicKey, Token};

use super::testing::Fixture;
use super::*;

const PATIENT: &str = "P-7731-SECRET";

fn event(i: usize) -> Event {
    Event {
        transfer: Some(format!("t-{}", i / 3)),
        patient_id: Some(PATIENT.into()),
        category: Some("diagnostic-image".into()),
        consent_ref: Some(format!("CONSENT-{PATIENT}")),
        merkle_root: Some([i as u8; 32]),
        detail: Some(format!("step {i} for {PATIENT}")),
        ..Event::new(Kind::Sealed)
    }
}

#[test]
#[serial_test::serial]
fn a_patient_key_in_the_audit_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    // Created outside the log directory, mode 0600.
    let log = f.open(100);
    log.append_blocking(event(0)).unwrap();
    drop(log);
    let key = f.secrets.path().join("patient.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!f.path(PATIENT_KEY_FILE).exists());

    // One left in the directory by an older version: refused, naming both places.
    std::fs::copy(&key, f.path(PATIENT_KEY_FILE)).unwrap();
    let e = Log::open(&f.settings(100), f.signer.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&f.path(PATIENT_KEY_FILE).display().to_string()),
        "{e}"
    );
    assert!(e.contains(&key.display().to_string()), "{e}");
    std::fs::remove_file(f.path(PATIENT_KEY_FILE)).unwrap();

    // A key path that reaches into the directory through a symbolic link: refused.
    let link = f.secrets.path().join("into-audit");
    std::os::unix::fs::symlink(f.dir.path(), &link).unwrap();
    let settings = LogSettings {
        patient_key: link.join("k"),
        ..f.settings(100)
    };
    let e = Log::open(&settings, f.signer.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("inside audit.dir"), "{e}");
    f.open(100);
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
#[serial_test::serial]
fn clean_log_verifies_with_checkpoints_every_n_and_on_demand() {
    let f = Fixture::new();
    let log = f.open(4);
    for i in 0..10 {
        assert_eq!(log.append_blocking(event(i)).unwrap(), i as u64);
    }
    assert_eq!(log.checkpoint_blocking().unwrap(), Some(10));
    assert_eq!(
        log.checkpoint_blocking().unwrap(),
        None,
        "nothing new to sign"
    );
    let s = f.verify().unwrap();
    assert_eq!(s.records, 10);
    assert_eq!(s.checkpoints, 3, "at 4, at 8, and on demand at 10");
    assert_eq!(s.signed_size, 10);
    assert_eq!(s.origin.as_deref(), Some("baylink.audit/edge"));

    // The latest checkpoint file is a plain signed note in tlog-checkpoint form.
    let latest = std::fs::read_to_string(f.path(LATEST_CHECKPOINT_FILE)).unwrap();
    let cp = note::open(&latest, &f.key(), Some("baylink.audit/edge")).unwrap();
    assert_eq!(cp.size, 10);
    assert_eq!(cp.root, s.root);
    assert!(latest.starts_with("baylink.audit/edge\n10\n"));
    assert!(latest.contains("\n\n\u{2014} baylink.audit/edge "));
}

#[test]
#[serial_test::serial]
fn patient_id_never_reaches_the_files() {
    let f = Fixture::new();
    let log = f.open(2);
    for i in 0..3 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    for name in [RECORDS_FILE, CHECKPOINTS_FILE, LATEST_CHECKPOINT_FILE] {
        let bytes = std::fs::read(f.path(name)).unwrap();
        assert!(
            !bytes
                .windows(PATIENT.len())
                .any(|w| w == PATIENT.as_bytes()),
            "{name} holds the raw patient id"
        );
    }
    let text = std::fs::read_to_string(f.path(RECORDS_FILE)).unwrap();
    assert!(
        text.contains(&log.patient_ref(PATIENT)),
        "the keyed hash is recorded"
    );
    // The same key is used after a reopen (the hash is stable per appliance).
    let again = f.open(2);
    assert_eq!(again.patient_ref(PATIENT), log.patient_ref(PATIENT));
}

#[test]
#[serial_test::serial]
fn two_writers_interleave_whole_records() {
    let f = Fixture::new();
    let a = f.open(5);
    let b = f.open(5);
    for i in 0..12 {
        let log = if i % 2 == 0 { &a } else { &b };
        assert_eq!(log.append_blocking(event(i)).unwrap(), i as u64);
    }
    a.checkpoint_blocking().unwrap();
    assert_eq!(
        b.checkpoint_blocking().unwrap(),
        None,
        "b sees a's checkpoint"
    );
    let s = f.verify().unwrap();
    assert_eq!((s.records, s.checkpoints), (12, 3));
}

#[test]
#[serial_test::serial]
fn torn_tail_fails_verify_until_open_repairs_it() {
    let f = Fixture::new();
    let log = f.open(100);
    for i in 0..5 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    let good_len = std::fs::metadata(f.path(RECORDS_FILE)).unwrap().len();
    // A crash mid-append: part of a sixth line, no newline.
    let (line, _) = log.inner.record(event(5), 5).line();
    std::fs::OpenOptions::new()
        .append(true)
        .open(f.path(RECORDS_FILE))
        .unwrap()
        .write_all(&line[..line.len() / 2])
        .unwrap();
    match f.verify() {
        Err(AuditError::BadRecord { seq: 5, offset, .. }) => assert_eq!(offset, good_len),
        other => panic!("expected record 5 to be reported torn, got {other:?}"),
    }
    drop(log);
    let log = f.open(100);
    assert_eq!(
        std::fs::metadata(f.path(RECORDS_FILE)).unwrap().len(),
        good_len
    );
    assert_eq!(f.verify().unwrap().records, 5);
    assert_eq!(
        log.append_blocking(event(5)).unwrap(),
        5,
        "appends continue after repair"
    );
}

#[test]
#[serial_test::serial]
fn tampering_is_named() {
    let f = Fixture::new();
    let log = f.open(3);
    for i in 0..7 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    let records = f.path(RECORDS_FILE);
    let checkpoints = f.path(CHECKPOINTS_FILE);
    let orig_records = lines_of(&records);
    let orig_cps = lines_of(&checkpoints);
    let restore = || {
        write_lines(&records, &orig_records);
        write_lines(&checkpoints, &orig_cps);
        f.verify().unwrap();
    };
    restore();

    // Reordered records: the first out-of-place one is named.
    let mut l = orig_records.clone();
    l.swap(2, 4);
    write_lines(&records, &l);
    let e = f.verify().unwrap_err();
    assert!(matches!(e, AuditError::BadRecord { seq: 2, .. }), "{e}");
    assert!(e.to_string().contains("record 2 at byte"), "{e}");
    restore();

    // One edited byte in record 3.
    let mut l = orig_records.clone();
    l[3] = l[3].replace("diagnostic-image", "diagnostic-imagf");
    write_lines(&records, &l);
    let e = f.verify().unwrap_err();
    assert!(matches!(e, AuditError::BadRecord { seq: 3, .. }), "{e}");
    restore();

    // Truncated at a record boundary: the checkpoint claiming more is named.
    write_lines(&records, &orig_records[..5]);
    let e = f.verify().unwrap_err();
    assert!(
        matches!(e, AuditError::BadCheckpoint { index: 2, .. }),
        "checkpoint 2 (size 6) is the first to claim more: {e}"
    );
    restore();

    // Truncated mid-record.
    let mut bytes = std::fs::read(&records).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&records, bytes).unwrap();
    let e = f.verify().unwrap_err();
    assert!(matches!(e, AuditError::BadRecord { seq: 6, .. }), "{e}");
    restore();

    // A checkpoint with a bad signature (root edited inside the signed text).
    let mut c = orig_cps.clone();
    let note = checkpoint_text(&c[1]);
    let mut lines: Vec<&str> = note.split('\n').collect();
    let forged_root = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    lines[2] = &forged_root;
    c[1] = serde_json::json!({ "note": lines.join("\n") }).to_string();
    write_lines(&checkpoints, &c);
    let e = f.verify().unwrap_err();
    assert!(
        matches!(e, AuditError::BadCheckpoint { index: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("does not verify"), "{e}");
    restore();

    // A record rewritten with a recomputed leaf hash: the checkpoint root catches it.
    let mut l = orig_records.clone();
    let (_, json) = l[1].split_once(' ').unwrap();
    let json = json.replace("diagnostic-image", "diagnostic-imagf");
    l[1] = format!("{} {json}", hex::encode(leaf_hash(json.as_bytes())));
    write_lines(&records, &l);
    let e = f.verify().unwrap_err();
    assert!(
        matches!(e, AuditError::BadCheckpoint { index: 1, .. }),
        "{e}"
    );
    restore();
}

fn checkpoint_text(line: &str) -> String {
    verify::checkpoint_note(line.as_bytes()).unwrap()
}

use base64::Engine;
use baylink_net::merkle::leaf_hash;

#[test]
#[serial_test::serial]
fn inconsistent_checkpoints_are_refused() {
    let f = Fixture::new();
    let log = f.open(100);
    for i in 0..4 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    // A validly signed head for a forked history: 6 records whose first 4 differ.
    let forked: Vec<Digest> = (0..6).map(|i| leaf_hash(&[i as u8, 0xee])).collect();
    let cp = note::Checkpoint {
        origin: log.origin().to_owned(),
        size: 6,
        root: root_from_leaf_hashes(&forked),
        time_ms: None,
    };
    let body = cp.body();
    let sig = f.signer.sign(body.as_bytes()).unwrap();
    let text = note::signed_note(&body, log.origin(), &f.key(), &sig.0);
    let mut line = serde_json::json!({ "note": text }).to_string();
    line.push('\n');
    for i in 4..6 {
        log.append_blocking(event(i)).unwrap();
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(f.path(CHECKPOINTS_FILE))
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    let e = f.verify().unwrap_err();
    assert!(
        matches!(e, AuditError::BadCheckpoint { index: 2, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("not consistent with checkpoint 1"),
        "{e}"
    );
}

#[test]
#[serial_test::serial]
fn proofs_verify_offline_and_edits_are_refused() {
    let f = Fixture::new();
    let log = f.open(100);
    for i in 0..11 {
        log.append_blocking(event(i)).unwrap();
    }
    // Transfer t-3 has records 9 and 10: not covered until a checkpoint.
    assert!(matches!(
        prove(f.dir.path(), "t-3"),
        Err(AuditError::NotFound(_))
    ));
    log.checkpoint_blocking().unwrap();
    let proof = prove(f.dir.path(), "t-3").unwrap();
    assert_eq!(
        proof.records.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![9, 10]
    );
    let ok = verify_proof(&proof, &f.key()).unwrap();
    assert_eq!(ok.checkpoint.size, 11);
    assert_eq!(ok.records.len(), 2);

    // Through JSON, as the CLI does.
    let json = serde_json::to_string(&proof).unwrap();
    let back: Proof = serde_json::from_str(&json).unwrap();
    verify_proof(&back, &f.key()).unwrap();

    let mut p = proof.clone();
    p.records[0].record = p.records[0]
        .record
        .replace("diagnostic-image", "genetic-data");
    assert!(verify_proof(&p, &f.key()).is_err());
    let mut p = proof.clone();
    p.records[1].inclusion[0] = "00".repeat(32);
    assert!(
        verify_proof(&p, &f.key())
            .unwrap_err()
            .to_string()
            .contains("not included")
    );
    let mut p = proof.clone();
    p.transfer = "t-2".into();
    assert!(verify_proof(&p, &f.key()).is_err());
    let mut p = proof.clone();
    p.checkpoint = p.checkpoint.replace("\n11\n", "\n12\n");
    assert!(
        verify_proof(&p, &f.key())
            .unwrap_err()
            .to_string()
            .contains("does not verify")
    );
    // Another key: the signature is not by it.
    let other = f.token.generate_key("other").unwrap();
    assert!(verify_proof(&proof, &other).is_err());
    assert!(matches!(
        prove(f.dir.path(), "t-9"),
        Err(AuditError::NotFound(_))
    ));
}

#[test]
#[serial_test::serial]
fn witness_cosigns_extensions_and_refuses_forks() {
    use super::witness::{self, Witness, WitnessRefusal};
    let f = Fixture::new();
    let edge = f.open(100);
    // The gateway: its own key and log directory on the same token.
    f.token.generate_key("gw").unwrap();
    let gw_signer = {
        let hsm_cfg = f.hsm.config("gw");
        Token::open(&hsm_cfg).unwrap().signer().unwrap()
    };
    let gw_dir = tempfile::tempdir().unwrap();
    let gw_log = Log::open(
        &LogSettings {
            dir: gw_dir.path().to_owned(),
            appliance_id: "gateway".into(),
            checkpoint_every: 100,
            patient_key: f.secrets.path().join("gateway.patient.key"),
        },
        gw_signer.clone(),
    )
    .unwrap();
    let w = Witness::new(gw_log, "gateway", f.key());

    for i in 0..3 {
        edge.append_blocking(event(i)).unwrap();
    }
    edge.checkpoint_blocking().unwrap();
    let (cp3, old, proof) = witness::request(&edge).unwrap().unwrap();
    assert_eq!(old, 0);
    let line = w.cosign("edge", &cp3, old, &proof).unwrap();
    assert!(
        line.starts_with("\u{2014} baylink.witness/gateway "),
        "{line}"
    );
    witness::store(&edge, &cp3, &line, gw_signer.public_key()).unwrap();
    assert!(
        witness::request(&edge).unwrap().is_none(),
        "already cosigned"
    );
    assert_eq!(
        anchored(&f).cosigned,
        Some(anchor::Cosigned {
            checkpoint: cp3.clone(),
            cosignature: line.clone()
        }),
        "the HSM anchor keeps the latest cosignature"
    );
    // The cosignature does not verify under the edge key, nor over another checkpoint.
    assert!(witness::verify_cosignature(&cp3, &line, &f.key()).is_err());
    let mut bad = line.clone();
    let at = bad.len() - 3;
    let c = if &bad[at..=at] == "A" { "B" } else { "A" };
    bad.replace_range(at..=at, c);
    assert!(witness::store(&edge, &cp3, &bad, gw_signer.public_key()).is_err());

    // An extension: consistent, cosigned.
    for i in 3..7 {
        edge.append_blocking(event(i)).unwrap();
    }
    edge.checkpoint_blocking().unwrap();
    let (cp7, old, proof) = witness::request(&edge).unwrap().unwrap();
    assert_eq!(old, 3);
    let line7 = w.cosign("edge", &cp7, old, &proof).unwrap();
    witness::verify_cosignature(&cp7, &line7, gw_signer.public_key()).unwrap();

    // A fork of size 9 signed by the edge key, whose first 7 leaves differ: refused.
    let forked: Vec<Digest> = (0..9).map(|i| leaf_hash(&[i as u8, 0xee])).collect();
    let body = note::Checkpoint {
        origin: edge.origin().to_owned(),
        size: 9,
        root: root_from_leaf_hashes(&forked),
        time_ms: None,
    }
    .body();
    let sig = f.signer.sign(body.as_bytes()).unwrap();
    let fork = note::signed_note(&body, edge.origin(), &f.key(), &sig.0);
    let fork_proof = baylink_net::merkle::consistency_proof_from_leaf_hashes(7, &forked).unwrap();
    let e = w.cosign("edge", &fork, 7, &fork_proof).unwrap_err();
    assert!(matches!(e, WitnessRefusal::Inconsistent(_)), "{e}");
    // A proof from another size than the cosigned one: refused.
    let e = w.cosign("edge", &fork, 3, &fork_proof).unwrap_err();
    assert!(matches!(e, WitnessRefusal::Inconsistent(_)), "{e}");
    // Not signed by the pinned edge key: refused.
    let e = w
        .cosign("edge", &fork.replace("\n9\n", "\n10\n"), 7, &fork_proof)
        .unwrap_err();
    assert!(matches!(e, WitnessRefusal::BadCheckpoint(_)), "{e}");
    // The honest checkpoint presented by another authenticated edge name: refused.
    let e = w.cosign("edge-b", &cp7, 7, &[]).unwrap_err();
    assert!(matches!(e, WitnessRefusal::BadCheckpoint(_)), "{e}");
    // The gateway's witness state rewound in its audit.dir: the HSM's copy still holds, so
    // the fork is not taken on first use.
    std::fs::remove_dir_all(gw_dir.path().join(witness::WITNESS_DIR)).unwrap();
    let e = w.cosign("edge", &fork, 0, &[]).unwrap_err();
    assert!(matches!(e, WitnessRefusal::Inconsistent(_)), "{e}");
    assert!(e.to_string().contains("last cosigned size 7"), "{e}");
    // The witness still accepts the honest log's next checkpoint.
    edge.append_blocking(event(7)).unwrap();
    edge.checkpoint_blocking().unwrap();
    witness::store(&edge, &cp7, &line7, gw_signer.public_key()).unwrap();
    let (cp8, old, proof) = witness::request(&edge).unwrap().unwrap();
    assert_eq!(old, 7);
    w.cosign("edge", &cp8, old, &proof).unwrap();
    drop(w);
    drop(gw_signer);
}

#[test]
#[serial_test::serial]
fn a_log_truncated_while_open_is_refused() {
    let f = Fixture::new();
    let log = f.open(100);
    for i in 0..3 {
        log.append_blocking(event(i)).unwrap();
    }
    let l = lines_of(&f.path(RECORDS_FILE));
    write_lines(&f.path(RECORDS_FILE), &l[..1]);
    let e = log.append_blocking(event(3)).unwrap_err();
    assert!(
        e.to_string().contains("acknowledged lines were removed"),
        "{e}"
    );
    assert_eq!(
        lines_of(&f.path(RECORDS_FILE)).len(),
        1,
        "nothing appended on top"
    );
}

/// The HSM anchor of the fixture's log, as `(what, note)` pairs for [`verify_kept`].
fn anchored(f: &Fixture) -> anchor::Anchor {
    anchor::read(&f.token, "baylink.audit/edge")
        .unwrap()
        .expect("the log is anchored")
}

#[test]
#[serial_test::serial]
fn a_rewound_log_fails_against_its_hsm_anchor_naming_both_sizes() {
    let f = Fixture::new();
    let log = f.open(3);
    assert!(anchor::read(&f.token, log.origin()).unwrap().is_none());
    for i in 0..10 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    let held = anchored(&f);
    let cp = note::open(&held.checkpoint, &f.key(), Some(log.origin())).unwrap();
    assert_eq!(cp.size, 10, "the anchor follows every checkpoint");
    f.verify().unwrap();
    verify_kept(f.dir.path(), &f.key(), &held.kept()).unwrap();

    let records = f.path(RECORDS_FILE);
    let checkpoints = f.path(CHECKPOINTS_FILE);
    let (all_records, all_cps) = (lines_of(&records), lines_of(&checkpoints));
    assert_eq!(all_cps.len(), 4, "at 3, 6, 9 and 10");
    let kept_check = || verify_kept(f.dir.path(), &f.key(), &held.kept());

    // Both files truncated together to the checkpoint at 6: every line left still verifies.
    write_lines(&records, &all_records[..6]);
    write_lines(&checkpoints, &all_cps[..2]);
    assert_eq!(f.verify().unwrap().records, 6, "the files alone look clean");
    let e = kept_check().unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::Rewound {
                records: 6,
                size: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "records.log holds 6 records but the HSM-anchored checkpoint covers 10: the log was rewound"
    );
    // The appliance does not write on top of it either.
    let e = Log::open(&f.settings(3), f.signer.clone()).unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::Rewound {
                records: 6,
                size: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(lines_of(&records).len(), 6, "nothing appended");

    // Both emptied.
    write_lines(&records, &[]);
    write_lines(&checkpoints, &[]);
    assert_eq!(f.verify().unwrap().records, 0);
    let e = kept_check().unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::Rewound {
                records: 0,
                size: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(Log::open(&f.settings(3), f.signer.clone()).is_err());

    // Records intact, the latest checkpoints removed.
    write_lines(&records, &all_records);
    write_lines(&checkpoints, &all_cps[..3]);
    let e = kept_check().unwrap_err();
    assert!(
        matches!(
            e,
            AuditError::CheckpointsRemoved {
                signed: 9,
                size: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("covers 9 records"), "{e}");

    // As many records as anchored, but others (leaf hashes recomputed), no checkpoints.
    let other: Vec<String> = (0..10)
        .map(|i| {
            let (line, _) = log.inner.record(event(i + 50), i as u64).line();
            String::from_utf8(line).unwrap().trim_end().to_owned()
        })
        .collect();
    write_lines(&records, &other);
    write_lines(&checkpoints, &[]);
    f.verify().unwrap();
    let e = kept_check().unwrap_err();
    assert!(matches!(e, AuditError::Rewritten { size: 10, .. }), "{e:?}");

    // Restored: the appliance opens it and carries on.
    write_lines(&records, &all_records);
    write_lines(&checkpoints, &all_cps);
    drop(log);
    let log = f.open(3);
    log.append_blocking(event(10)).unwrap();
    assert_eq!(log.checkpoint_blocking().unwrap(), Some(11));
    verify_kept(f.dir.path(), &f.key(), &anchored(&f).kept()).unwrap();
}

#[test]
#[serial_test::serial]
fn a_checkpoint_kept_by_the_peer_bounds_the_log() {
    let f = Fixture::new();
    let log = f.open(100);
    for i in 0..5 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    let kept5 = std::fs::read_to_string(f.path(LATEST_CHECKPOINT_FILE)).unwrap();
    for i in 5..8 {
        log.append_blocking(event(i)).unwrap();
    }
    log.checkpoint_blocking().unwrap();
    let what = "the peer's checkpoint kept.note";
    // A longer log that extends it: fine.
    let s = verify_kept(f.dir.path(), &f.key(), &[(what, &kept5)]).unwrap();
    assert_eq!(s.records, 8);
    // Rewound below it (files only).
    let records = f.path(RECORDS_FILE);
    let checkpoints = f.path(CHECKPOINTS_FILE);
    write_lines(&records, &lines_of(&records)[..3]);
    write_lines(&checkpoints, &[]);
    let e = verify_kept(f.dir.path(), &f.key(), &[(what, &kept5)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "records.log holds 3 records but the peer's checkpoint kept.note covers 5: the log was rewound"
    );
    // A checkpoint not signed by the appliance key is no evidence: refused as such.
    f.token.generate_key("other").unwrap();
    let other = Token::open(&f.hsm.config("other"))
        .unwrap()
        .signer()
        .unwrap();
    let body = note::split_note(&kept5).unwrap().0.to_owned();
    let sig = other.sign(body.as_bytes()).unwrap();
    let forged = note::signed_note(&body, log.origin(), other.public_key(), &sig.0);
    let e = verify_kept(f.dir.path(), &f.key(), &[(what, &forged)]).unwrap_err();
    assert!(matches!(e, AuditError::BadAnchor { .. }), "{e:?}");
    drop(other);
}

#[test]
fn parsers_never_panic_on_arbitrary_input() {
    // The P-256 generator point: a valid key for driving the verifiers.
    let g = hex::decode(
        "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
         4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5",
    )
    .unwrap();
    let key = PublicKey::from_sec1(&g).unwrap();
    // Deterministic mutations (xorshift) of well-formed inputs.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (line, _) = Record::from_canonical(br#"{"v":1,"seq":0,"time_ms":1,"kind":"sent","appliance":"e","transfer":null,"hospital":null,"peer":null,"patient":null,"category":null,"purpose":null,"destination":null,"consent":null,"declaration_digest":null,"merkle_root":null,"manifest_digest":null,"rule":null,"detail":null}"#)
        .unwrap()
        .line();
    let seeds = [
        String::from_utf8(line).unwrap(),
        "baylink.audit/edge\n3\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime 5\n\n\u{2014} baylink.audit/edge AAAAAAAAAAAA\n".to_owned(),
        r#"{"version":1,"transfer":"t","checkpoint":"x","records":[{"index":0,"record":"{}","inclusion":["00"]}]}"#.to_owned(),
    ];
    for seed in &seeds {
        for _ in 0..2000 {
            let mut b = seed.as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len().max(1);
                match next() % 3 {
                    0 if i < b.len() => b[i] = next() as u8,
                    1 if i < b.len() => {
                        b.remove(i);
                    }
                    _ => b.insert(i.min(b.len()), next() as u8),
                }
            }
            let _ = record::parse_line(&b);
            let text = String::from_utf8_lossy(&b);
            let _ = note::open(&text, &key, None);
            let _ = note::Checkpoint::parse_body(&text);
            let _ = witness::verify_cosignature(&text, &text, &key);
            if let Ok(p) = serde_json::from_slice::<Proof>(&b) {
                let _ = verify_proof(&p, &key);
            }
        }
    }
}
