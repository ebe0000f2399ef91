//! The audit log through the real binary: records on both appliances, `audit verify`,
//! `audit prove` / `verify-proof` offline with only the PEM key, tampering, torn tails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use baylink_tests::{Deployment, baylink_bin, payload};

fn baylink(args: &[&str]) -> Output {
    Command::new(baylink_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("baylink runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns the last stdout line.
fn ok_last_line(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// Asserts failure with `needle` in stderr.
fn fails_naming(out: &Output, needle: &str) {
    assert!(
        !out.status.success(),
        "expected failure; stdout: {}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(needle),
        "stderr does not name `{needle}`: {err}"
    );
}

fn kinds(records: &Path) -> Vec<String> {
    std::fs::read_to_string(records)
        .unwrap()
        .lines()
        .map(|l| {
            let json: serde_json::Value =
                serde_json::from_str(l.split_once(' ').unwrap().1).unwrap();
            json["kind"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn assert_audit_ok(line: &str, records: usize) {
    let prefix = format!("audit ok: {records} records, root ");
    let root = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("last line: {line}"));
    assert_eq!(root.len(), 64, "{line}");
    assert!(root.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
}

/// One transfer edge -> gateway, gateway stopped (drained: delivered, shutdown checkpoint).
fn one_transfer(d: &Deployment) -> String {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let f = payload(&src, "study.dcm", 300_000, 11).unwrap();
    let (_, id) = d.send_ok(&[&f], &gateway);
    assert!(gateway.terminate().unwrap().success());
    id
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `edge-fork.toml`: the edge with a copy of its audit directory as it is now
/// (`audit/fork`) and a clone of its HSM token, so both can be continued differently.
fn fork_edge(d: &Deployment) {
    copy_dir(&d.path("audit/edge"), &d.path("audit/fork"));
    std::fs::copy(d.edge_config(), d.path("edge-fork.toml")).unwrap();
    d.set("edge-fork.toml", "audit", "dir", "\"audit/fork\"")
        .unwrap();
    let conf = d.clone_hsm("fork").unwrap();
    d.set(
        "edge-fork.toml",
        "hsm",
        "softhsm_conf",
        &format!("\"{conf}\""),
    )
    .unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, l: &[String]) {
    std::fs::write(path, l.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn clean_transfer_is_recorded_and_verifies_on_both_sides() {
    let d = Deployment::new().unwrap();
    let id = one_transfer(&d);

    let edge_records = d.path("audit/edge/records.log");
    assert_eq!(
        kinds(&edge_records),
        ["declared", "sealed", "sent", "receipted"]
    );
    assert_eq!(
        kinds(&d.path("audit/gateway/records.log")),
        ["committed", "delivered"]
    );
    assert!(
        std::fs::read_to_string(&edge_records)
            .unwrap()
            .contains(&id)
    );

    let edge = d.edge_config();
    let gw = d.gateway_config();
    assert_audit_ok(
        &ok_last_line(&baylink(&[
            "audit",
            "verify",
            "--config",
            edge.to_str().unwrap(),
        ])),
        4,
    );
    assert_audit_ok(
        &ok_last_line(&baylink(&[
            "audit",
            "verify",
            "--config",
            gw.to_str().unwrap(),
        ])),
        2,
    );
    // An auditor with only the directory and the public key gets the same answer.
    let dir = d.path("audit/edge");
    let pem = d.path("keys/edge.pub.pem");
    let line = ok_last_line(&baylink(&[
        "audit",
        "verify",
        "--dir",
        dir.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
    ]));
    assert_audit_ok(&line, 4);
    // With the gateway's key as witness key, the stored cosignature is checked too.
    let witness = d.path("keys/gateway.pub.pem");
    let out = baylink(&[
        "audit",
        "verify",
        "--dir",
        dir.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
        "--witness-key",
        witness.to_str().unwrap(),
    ]);
    assert_audit_ok(&ok_last_line(&out), 4);
    assert!(text(&out.stdout).contains("cosignatures: 1 verified, the latest cosigns 4 records"));
    let out = baylink(&[
        "audit",
        "verify",
        "--dir",
        dir.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
        "--witness-key",
        pem.to_str().unwrap(),
    ]);
    fails_naming(&out, "cosignature 1 at byte 0");
    // The gateway's key does not verify the edge's log.
    let wrong = d.path("keys/gateway.pub.pem");
    fails_naming(
        &baylink(&[
            "audit",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--public-key",
            wrong.to_str().unwrap(),
        ]),
        "checkpoint 1",
    );

    // The patient id appears in no audit file of either appliance (only its keyed hash).
    for side in ["audit/edge", "audit/gateway"] {
        for e in std::fs::read_dir(d.path(side)).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                continue; // the gateway's witness state holds edge checkpoints only
            }
            let bytes = std::fs::read(path).unwrap();
            assert!(
                !bytes.windows(6).any(|w| w == b"P-0001"),
                "the patient id is in {side}"
            );
        }
    }
}

#[test]
fn proofs_verify_offline_with_only_the_public_key() {
    let d = Deployment::new().unwrap();
    let id = one_transfer(&d);
    for (config, pem, other, count) in [
        ("edge.toml", "keys/edge.pub.pem", "keys/gateway.pub.pem", 4),
        (
            "gateway.toml",
            "keys/gateway.pub.pem",
            "keys/edge.pub.pem",
            2,
        ),
    ] {
        let out = baylink(&[
            "audit",
            "prove",
            "--config",
            d.path(config).to_str().unwrap(),
            "--transfer",
            &id,
        ]);
        assert!(out.status.success(), "prove: {}", text(&out.stderr));
        let proof: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(proof["records"].as_array().unwrap().len(), count);

        // Offline: a fresh directory holding only the proof and the PEM.
        let alone = tempfile::tempdir().unwrap();
        let proof_file = alone.path().join("proof.json");
        std::fs::write(&proof_file, &out.stdout).unwrap();
        let key = alone.path().join("key.pem");
        std::fs::copy(d.path(pem), &key).unwrap();
        let line = ok_last_line(&baylink(&[
            "audit",
            "verify-proof",
            "--public-key",
            key.to_str().unwrap(),
            proof_file.to_str().unwrap(),
        ]));
        assert!(
            line.starts_with(&format!("proof ok: transfer {id}, {count} records")),
            "{line}"
        );

        // Another key: refused.
        fails_naming(
            &baylink(&[
                "audit",
                "verify-proof",
                "--public-key",
                d.path(other).to_str().unwrap(),
                proof_file.to_str().unwrap(),
            ]),
            "no signature",
        );
        // An edited proof: refused, naming the record.
        let mut edited = proof.clone();
        let r = edited["records"][0]["record"]
            .as_str()
            .unwrap()
            .replace("\"seq\":", "\"seq\": ");
        edited["records"][0]["record"] = serde_json::Value::String(r);
        std::fs::write(&proof_file, serde_json::to_vec(&edited).unwrap()).unwrap();
        fails_naming(
            &baylink(&[
                "audit",
                "verify-proof",
                "--public-key",
                key.to_str().unwrap(),
                proof_file.to_str().unwrap(),
            ]),
            "record",
        );
        let mut edited = proof.clone();
        let path0 = edited["records"][0]["inclusion"][0]
            .as_str()
            .unwrap()
            .to_owned();
        let (first, rest) = path0.split_at(1);
        let flipped = format!("{}{rest}", if first == "0" { "1" } else { "0" });
        edited["records"][0]["inclusion"][0] = serde_json::Value::String(flipped);
        std::fs::write(&proof_file, serde_json::to_vec(&edited).unwrap()).unwrap();
        fails_naming(
            &baylink(&[
                "audit",
                "verify-proof",
                "--public-key",
                key.to_str().unwrap(),
                proof_file.to_str().unwrap(),
            ]),
            "not included in the signed checkpoint",
        );
    }
    // An unknown transfer: non-zero with the reason.
    fails_naming(
        &baylink(&[
            "audit",
            "prove",
            "--config",
            d.edge_config().to_str().unwrap(),
            "--transfer",
            "nope",
        ]),
        "no record of transfer nope",
    );
}

#[test]
fn tampering_is_detected_and_named() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "audit", "checkpoint_every", "2")
        .unwrap();
    one_transfer(&d);
    // A refused declaration adds record 4 and the exit checkpoint signs 5 records.
    let out = d
        .send(&["--no-progress", "--patient", "P-0099", "/dev/null"])
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // A fork: the same log up to here, continued differently under the same HSM key (by a
    // clone of the edge's HSM: the edge's own token would refuse a log that lost its head).
    let fork_dir = d.path("audit/fork");
    fork_edge(&d);
    for (config, patient) in [("edge-fork.toml", "P-0098"), ("edge.toml", "P-0097")] {
        let out = baylink(&[
            "send",
            "--config",
            d.path(config).to_str().unwrap(),
            "--no-progress",
            "--patient",
            patient,
            "/dev/null",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    }
    let base = d.path("audit/edge");
    let pem = d.path("keys/edge.pub.pem");
    let verify = |dir: &Path| {
        baylink(&[
            "audit",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--public-key",
            pem.to_str().unwrap(),
        ])
    };
    assert_audit_ok(&ok_last_line(&verify(&base)), 6);
    assert_audit_ok(&ok_last_line(&verify(&fork_dir)), 6);
    let cps = lines(&base.join("checkpoints.log"));
    assert_eq!(
        cps.len(),
        4,
        "checkpoints at 2, 4, 5 (exit of the refused send) and 6"
    );

    let case = |name: &str, tamper: &dyn Fn(&Path), needle: &str| {
        let dir: PathBuf = d.path(&format!("tampered-{name}"));
        copy_dir(&base, &dir);
        tamper(&dir);
        let out = verify(&dir);
        assert!(!out.status.success(), "{name}: verify passed");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle),
            "{name}: stderr does not name `{needle}`: {err}"
        );
    };
    let records = |dir: &Path| dir.join("records.log");
    let checkpoints = |dir: &Path| dir.join("checkpoints.log");

    case(
        "truncated-mid-record",
        &|dir| {
            let mut b = std::fs::read(records(dir)).unwrap();
            b.truncate(b.len() - 20);
            std::fs::write(records(dir), b).unwrap();
        },
        "record 5 at byte",
    );
    case(
        "truncated-at-boundary",
        &|dir| {
            let l = lines(&records(dir));
            write_lines(&records(dir), &l[..5]);
        },
        "checkpoint 4 at byte",
    );
    case(
        "reordered",
        &|dir| {
            let mut l = lines(&records(dir));
            l.swap(1, 2);
            write_lines(&records(dir), &l);
        },
        "record 1 at byte",
    );
    case(
        "edited-byte",
        &|dir| {
            let mut b = std::fs::read(records(dir)).unwrap();
            let l = lines(&records(dir));
            let at = l[..3].iter().map(|x| x.len() + 1).sum::<usize>() + 100;
            b[at] ^= 0x01;
            std::fs::write(records(dir), b).unwrap();
        },
        "record 3 at byte",
    );
    case(
        "bad-signature",
        &|dir| {
            let mut l = lines(&checkpoints(dir));
            // Change the signed time line of checkpoint 2: its signature no longer verifies.
            let i = l[1].find("\\ntime ").unwrap() + "\\ntime ".len();
            let digit = l[1].as_bytes()[i];
            let other = if digit == b'1' { "2" } else { "1" };
            l[1].replace_range(i..=i, other);
            write_lines(&checkpoints(dir), &l);
        },
        "checkpoint 2 at byte",
    );
    let fork_cps = lines(&fork_dir.join("checkpoints.log"));
    case(
        "inconsistent-checkpoints",
        &|dir| {
            let mut l = lines(&checkpoints(dir));
            l.push(fork_cps.last().unwrap().clone());
            write_lines(&checkpoints(dir), &l);
        },
        "checkpoint 5 at byte",
    );
    let out = verify(&d.path("tampered-inconsistent-checkpoints"));
    assert!(
        text(&out.stderr).contains("not consistent with checkpoint 4"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn torn_tail_is_repaired_on_open() {
    let d = Deployment::new().unwrap();
    one_transfer(&d);
    let records = d.path("audit/edge/records.log");
    let good = std::fs::read(&records).unwrap();
    // A crash mid-append: half of a copy of the last line, no newline.
    let last = good[..good.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    let mut torn = good.clone();
    torn.extend_from_slice(&last[..last.len() / 2]);
    std::fs::write(&records, &torn).unwrap();
    let edge = d.edge_config();
    let edge = edge.to_str().unwrap();
    fails_naming(
        &baylink(&["audit", "verify", "--config", edge]),
        "record 4 at byte",
    );
    // Any command that opens the log for writing repairs it.
    let out = baylink(&["audit", "checkpoint", "--config", edge]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("torn tail"),
        "the repair is logged: {}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&records).unwrap(), good);
    assert_audit_ok(
        &ok_last_line(&baylink(&["audit", "verify", "--config", edge])),
        4,
    );
}

#[test]
fn a_failed_send_is_recorded_as_failed() {
    let d = Deployment::new().unwrap();
    // The edge presents a certificate from another CA: the gateway refuses the handshake.
    d.set("edge.toml", "tls", "cert", "\"pki/rogue.pem\"")
        .unwrap();
    d.set("edge.toml", "tls", "key", "\"pki/rogue.key\"")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let f = payload(&src, "a.dcm", 1000, 3).unwrap();
    let out = d.send(&["--no-progress", f.to_str().unwrap()]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    drop(gateway);
    assert_eq!(
        kinds(&d.path("audit/edge/records.log")),
        ["declared", "sealed", "failed"]
    );
    let last = lines(&d.path("audit/edge/records.log")).pop().unwrap();
    assert!(
        last.contains("gateway refused: TLS handshake refused"),
        "{last}"
    );
    let edge = d.edge_config();
    assert_audit_ok(
        &ok_last_line(&baylink(&[
            "audit",
            "verify",
            "--config",
            edge.to_str().unwrap(),
        ])),
        3,
    );
}

#[test]
fn gateway_witness_refuses_a_forked_edge_log() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let f = payload(&src, "a.dcm", 5000, 5).unwrap();
    let out = d.send(&["--no-progress", f.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A copy of the edge log as cosigned so far, continued differently below.
    fork_edge(&d);

    let out = d.send(&["--no-progress", f.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("not witnessed"),
        "the honest extension is cosigned: {}",
        text(&out.stderr)
    );
    assert_eq!(lines(&d.path("audit/edge/cosignatures.log")).len(), 2);

    let out = baylink(&[
        "send",
        "--config",
        d.path("edge-fork.toml").to_str().unwrap(),
        "--no-progress",
        f.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("not witnessed") && err.contains("inconsistent checkpoint refused"),
        "{err}"
    );
    assert_eq!(
        lines(&d.path("audit/fork/cosignatures.log")).len(),
        1,
        "no cosignature stored for the fork"
    );
    let metrics = d.metrics(true).unwrap();
    assert!(
        metrics.contains("baylink_audit_witness_refusals_total 1"),
        "{metrics}"
    );
    drop(gateway);
}

/// The tree size a `checkpoints.log` line signs.
fn checkpoint_size(line: &str) -> usize {
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    json["note"]
        .as_str()
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_rewound_log_fails_verification_naming_both_sizes() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "audit", "checkpoint_every", "2")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    for seed in 0..3 {
        let f = payload(&src, &format!("s{seed}.dcm"), 20_000, seed).unwrap();
        d.send_ok(&[&f], &gateway);
    }
    // What the gateway's witness kept of the edge log: a checkpoint from the other side.
    let kept = d.path("kept-by-gateway.note");
    std::fs::copy(d.path("audit/gateway/witness/baylink.audit_edge"), &kept).unwrap();
    drop(gateway);

    let dir = d.path("audit/edge");
    let (records, checkpoints) = (dir.join("records.log"), dir.join("checkpoints.log"));
    let (all_records, all_cps) = (lines(&records), lines(&checkpoints));
    let n = all_records.len();
    assert!(all_cps.len() >= 4, "several checkpoints: {all_cps:?}");
    assert_eq!(checkpoint_size(all_cps.last().unwrap()), n);
    let edge = d.edge_config();
    let edge = edge.to_str().unwrap();
    let pem = d.path("keys/edge.pub.pem");
    let pem = pem.to_str().unwrap();
    let kept = kept.to_str().unwrap();
    let out = baylink(&[
        "audit",
        "verify",
        "--config",
        edge,
        "--peer-checkpoint",
        kept,
    ]);
    assert_audit_ok(&ok_last_line(&out), n);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("holds the checkpoint of {n} records")),
        "{stdout}"
    );

    // (a) Both files truncated together to an earlier checkpoint.
    let earlier = &all_cps[..2];
    let size = checkpoint_size(&earlier[1]);
    write_lines(&records, &all_records[..size]);
    write_lines(&checkpoints, earlier);
    // The files alone still look clean to an auditor without the anchor…
    assert_audit_ok(
        &ok_last_line(&baylink(&[
            "audit",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--public-key",
            pem,
        ])),
        size,
    );
    // …but not against the HSM anchor, nor against what the gateway kept.
    fails_naming(
        &baylink(&["audit", "verify", "--config", edge]),
        &format!(
            "records.log holds {size} records but the HSM-anchored checkpoint covers {n}: \
             the log was rewound"
        ),
    );
    fails_naming(
        &baylink(&[
            "audit",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--public-key",
            pem,
            "--peer-checkpoint",
            kept,
        ]),
        &format!("records.log holds {size} records but the peer's checkpoint {kept} covers {n}"),
    );
    // The edge does not write on top of it.
    let out = d.send(&["--no-progress", "/dev/null"]).unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("records.log holds {size} records")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(lines(&records).len(), size, "nothing appended");

    // (b) Both files emptied.
    std::fs::write(&records, "").unwrap();
    std::fs::write(&checkpoints, "").unwrap();
    fails_naming(
        &baylink(&["audit", "verify", "--config", edge]),
        &format!("records.log holds 0 records but the HSM-anchored checkpoint covers {n}"),
    );
    fails_naming(
        &baylink(&[
            "audit",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--public-key",
            pem,
            "--peer-checkpoint",
            kept,
        ]),
        "records.log holds 0 records",
    );

    // Restored from a copy as new as the anchor: verifies again.
    write_lines(&records, &all_records);
    write_lines(&checkpoints, &all_cps);
    assert_audit_ok(
        &ok_last_line(&baylink(&[
            "audit",
            "verify",
            "--config",
            edge,
            "--peer-checkpoint",
            kept,
        ])),
        n,
    );
}

#[test]
fn a_witness_refusal_stops_the_edge_and_fails_healthz() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let f = payload(&src, "a.dcm", 5000, 5).unwrap();
    d.send_ok(&[&f], &gateway);
    // An edge rewound with its HSM (a clone taken now) to what the witness cosigned so far…
    fork_edge(&d);
    d.set("edge-fork.toml", "audit", "checkpoint_interval", "\"1s\"")
        .unwrap();
    // …while the real edge's log grows and is cosigned.
    d.send_ok(&[&f], &gateway);

    let fork = d.path("edge-fork.toml");
    let edge = d.serve(&fork).expect("forked edge starts");
    assert_eq!(d.healthz(false).unwrap(), 200, "{}", edge.log());
    assert!(
        d.metrics(false)
            .unwrap()
            .contains("baylink_audit_witness_refused 0")
    );
    // The forked edge's log grows differently; the witness refuses it.
    let send_fork = || {
        baylink(&[
            "send",
            "--config",
            fork.to_str().unwrap(),
            "--no-progress",
            f.to_str().unwrap(),
        ])
    };
    let out = send_fork();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("inconsistent checkpoint refused"),
        "{}",
        text(&out.stderr)
    );
    // The service sees the refusal itself at its next checkpoint: an error, not a warning.
    let line = edge.wait_for_log(
        &["ERROR", "witness refused this edge's audit log"],
        Duration::from_secs(60),
    );
    assert!(line.contains("sending is stopped"), "{line}");
    assert_eq!(d.healthz(false).unwrap(), 503);
    let metrics = d.metrics(false).unwrap();
    assert!(
        metrics.contains("baylink_audit_witness_refused 1"),
        "{metrics}"
    );
    // Nothing more is sent.
    let out = send_fork();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sending is stopped"),
        "{}",
        text(&out.stderr)
    );
    drop(edge);
    drop(gateway);
}

#[test]
fn a_witness_that_does_not_answer_is_not_a_refusal() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "audit", "checkpoint_interval", "\"1s\"")
        .unwrap();
    // A refused declaration: a record and a checkpoint the gateway has not witnessed.
    let out = d
        .send(&["--no-progress", "--patient", "P-0099", "/dev/null"])
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The gateway is not running: the witness request fails on the link.
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    let line = edge.wait_for_log(&["WARN", "not witnessed"], Duration::from_secs(60));
    assert!(!line.contains("witness refused"), "{line}");
    assert_eq!(d.healthz(false).unwrap(), 200, "{}", edge.log());
    assert!(
        d.metrics(false)
            .unwrap()
            .contains("baylink_audit_witness_refused 0")
    );
    assert!(!edge.log().contains("ERROR"), "{}", edge.log());
    drop(edge);
}
