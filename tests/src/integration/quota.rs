//! `[quota]` and `spool.reserve_bytes`: what one hospital may hold at the edge. Each refusal
//! answers 429 (a quota) or 507 (the reserve) with the key in the body, and leaves the other
//! hospital's allowance untouched.

use baylink_tests::{Deployment, Service, payload};

use super::dicom::{instance, run, scu, store_responses, text};
use super::ingest::{Api, dicom, multipart, stow_with, transfers};

const A: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;
const B: &str = r#"{"patient_id":"P-0002","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

fn edge_with(d: &Deployment, section: &str, key: &str, value: &str) -> Service {
    d.set("edge.toml", section, key, value).unwrap();
    d.serve(&d.edge_config()).unwrap()
}

fn open(api: &Api<'_>, who: &str, decl: &str) -> String {
    let a = api.declare(who, decl);
    assert_eq!(a.status, 201, "{who}: {a:?}");
    a.json()["id"].as_str().unwrap().to_owned()
}

fn assert_quota(a: &super::ingest::Answer, status: u16, key: &str) {
    assert_eq!(a.status, status, "{a:?}");
    assert_eq!(a.json()["quota"], key, "{a:?}");
    assert!(a.json()["error"].as_str().unwrap().contains(key), "{a:?}");
}

#[test]
fn open_transfers_over_the_quota_are_refused_429_per_hospital() {
    let d = Deployment::new().unwrap();
    let _edge = edge_with(&d, "quota", "max_open_transfers", "2");
    let api = Api { d: &d };
    let first = open(&api, "hospital-a", A);
    open(&api, "hospital-a", A);
    assert_quota(
        &api.declare("hospital-a", A),
        429,
        "quota.max_open_transfers",
    );
    // Another hospital has its own allowance.
    open(&api, "hospital-b", B);
    // A committed transfer no longer counts.
    let dir = d.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let f = payload(&dir, "f", 1000, 1).unwrap();
    assert_eq!(api.put("hospital-a", &first, "f", &f, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &first).status, 202);
    open(&api, "hospital-a", A);
}

#[test]
fn files_over_the_quota_are_refused_429_on_put_and_stow() {
    let d = Deployment::new().unwrap();
    let _edge = edge_with(&d, "quota", "max_files", "2");
    let api = Api { d: &d };
    let dir = d.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let f = payload(&dir, "f", 1000, 1).unwrap();
    let id = open(&api, "hospital-a", A);
    assert_eq!(api.put("hospital-a", &id, "1", &f, &[]).status, 201);
    assert_eq!(api.put("hospital-a", &id, "2", &f, &[]).status, 201);
    assert_quota(
        &api.put("hospital-a", &id, "3", &f, &[]),
        429,
        "quota.max_files",
    );

    // STOW-RS: three instances in one request; the request is refused and keeps nothing.
    let before = transfers(&d).len();
    let instances: Vec<_> = (1..=3)
        .map(|i| {
            dicom(
                &dir,
                &format!("{i}.dcm"),
                "P-0001",
                &format!("1.2.826.0.1.3680043.2.1125.8.{i}"),
                false,
                0,
            )
        })
        .collect();
    let refs: Vec<&std::path::Path> = instances.iter().map(|p| p.as_path()).collect();
    let body = multipart(&dir, &refs);
    let (r, _) = stow_with(&api, &body, "");
    assert_quota(&r, 429, "quota.max_files");
    assert_eq!(
        transfers(&d).len(),
        before,
        "the request's transfer is dropped"
    );
}

#[test]
fn files_over_the_quota_fail_on_c_store_before_their_success_status() {
    let d = Deployment::new().unwrap();
    let _edge = edge_with(&d, "quota", "max_files", "2");
    let src = d.path("instances");
    let files: Vec<_> = (81..=83)
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .args(["-v", "-nh"])
        .args(&files));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 2, "{t}");
    // The third is refused (out of resources) before it is acknowledged.
    assert_eq!(store_responses(&t, "Refused: OutOfResources"), 1, "{t}");
}

#[test]
fn spool_bytes_over_the_quota_are_refused_429_across_transfers() {
    let d = Deployment::new().unwrap();
    let _edge = edge_with(&d, "quota", "max_spool_bytes", "1048576");
    let api = Api { d: &d };
    let dir = d.path("src");
    std::fs::create_dir_all(&dir).unwrap();
    let f = payload(&dir, "f", 600 * 1024, 1).unwrap();
    let one = open(&api, "hospital-a", A);
    assert_eq!(api.put("hospital-a", &one, "f", &f, &[]).status, 201);
    let two = open(&api, "hospital-a", A);
    assert_quota(
        &api.put("hospital-a", &two, "f", &f, &[]),
        429,
        "quota.max_spool_bytes",
    );
    // The same bytes are fine for another hospital.
    let b = open(&api, "hospital-b", B);
    assert_eq!(api.put("hospital-b", &b, "f", &f, &[]).status, 201);
    // Once committed, hospital-a's bytes are no longer held by an open transfer.
    assert_eq!(api.commit("hospital-a", &one).status, 202);
    assert_eq!(api.put("hospital-a", &two, "f", &f, &[]).status, 201);
}

/// The edge's spool on a 16 MiB tmpfs with 12 MiB reserved: an 8 MiB upload would eat into
/// the reserve (507), a 1 MiB one fits.
#[test]
fn uploads_never_use_the_spool_reserve() {
    if let Some(why) = baylink_tests::mount_namespace_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let d = Deployment::new().unwrap();
    d.set(
        "edge.toml",
        "spool",
        "reserve_bytes",
        &(12u64 << 20).to_string(),
    )
    .unwrap();
    let _edge = d
        .serve_on_small_disk(&d.edge_config(), "spool/edge", "16m")
        .unwrap();
    let api = Api { d: &d };
    let id = open(&api, "hospital-a", A);
    let big = payload(d.dir.path(), "big", 8 << 20, 6).unwrap();
    assert_quota(
        &api.put("hospital-a", &id, "big", &big, &[]),
        507,
        "spool.reserve_bytes",
    );
    let small = payload(d.dir.path(), "small", 1 << 20, 7).unwrap();
    assert_eq!(api.put("hospital-a", &id, "small", &small, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);
}
