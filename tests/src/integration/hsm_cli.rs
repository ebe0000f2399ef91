//! `baylink hsm …` against the dev-env's SoftHSM tokens.

use std::process::Command;

use baylink_tests::{Deployment, baylink_bin};

fn hsm(d: &Deployment, args: &[&str]) -> std::process::Output {
    Command::new(baylink_bin())
        .arg("hsm")
        .args(args)
        .arg("--config")
        .arg(d.edge_config())
        .output()
        .unwrap()
}

#[test]
fn pubkey_prints_the_key_dev_env_pinned_on_the_other_side() {
    let d = Deployment::new().unwrap();
    let out = hsm(&d, &["pubkey"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pinned = std::fs::read_to_string(d.path("keys/edge.pub.pem")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), pinned);
}

#[test]
fn keygen_creates_a_key_once_and_refuses_the_label_again() {
    let d = Deployment::new().unwrap();
    let out = hsm(&d, &["keygen", "--label", "rotation-2027"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-----BEGIN PUBLIC KEY-----"));
    let again = hsm(&d, &["keygen", "--label", "rotation-2027"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("rotation-2027"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn info_names_the_token_and_finds_the_key() {
    let d = Deployment::new().unwrap();
    let out = hsm(&d, &["info"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("baylink-edge"), "{text}");
    assert!(text.contains("baylink-signing"), "{text}");
}
