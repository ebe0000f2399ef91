//! `baylink check-config`: every problem of a config at once, each naming its key.
//!
//! Two stages. [`static_checks`] reads the file as a TOML document and walks it against
//! [`SCHEMA`] (unknown keys, wrong types, integers out of range, missing required keys), then
//! lets [`Config::parse`] judge the values: each value it refuses is reported, replaced by a
//! placeholder (required keys) or removed (optional ones), and the document parsed again, so
//! one bad value does not hide the next. What comes out is a [`Config`] in which the keys
//! with problems are marked, so [`environment_checks`] can look at the machine for the rest:
//! files the config names, the HSM (module, token, PIN, key), the certificates (key match,
//! expiry against `tls.warn_expiry`), the listen addresses, the spool and audit directories.
//!
//! `serve` runs both stages before it starts and refuses any error (see
//! `crate::commands`). The address check binds each listen address and closes it at once; it
//! runs before `serve` binds its own, so a port another process holds is named here.
//!
//! Not here: changing anything. Directories are not created (a missing one is a warning,
//! since `serve` creates it), a probe file written to check that a directory is writable is
//! removed at once, and the HSM is only logged in to.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use baylink_hsm::HsmError;
use baylink_net::transport::TransportError;
use serde::Serialize;
use toml::{Table, Value};

use crate::config::{Config, ConfigError, DeliverySection, Role, TlsKeySource};
use crate::deliver::dicomweb::StowSettings;

/// How bad a problem is: an error fails the check (and stops `serve`), a warning does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The appliance cannot run (or must not) like this.
    Error,
    /// Worth fixing soon; the appliance runs.
    Warning,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem, naming the config key it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// The dotted config key (`tls.cert`, `ingest.dicom_peers[1].address`); `config` for the
    /// file itself (unreadable, not TOML).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found, in the order found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// No errors (warnings allowed).
    pub ok: bool,
    /// The problems.
    pub problems: Vec<Problem>,
    /// Keys with a problem, and their sections when a whole section was set aside; the
    /// environment checks skip them (their values are placeholders).
    #[serde(skip)]
    bad: BTreeSet<String>,
}

impl Report {
    /// An empty report (ok).
    pub fn new() -> Report {
        Report {
            ok: true,
            ..Report::default()
        }
    }

    /// Adds an error about `key`.
    pub fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, key.into(), message.into());
    }

    /// Adds a warning about `key`.
    pub fn warning(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, key.into(), message.into());
    }

    fn push(&mut self, severity: Severity, key: String, message: String) {
        if severity == Severity::Error {
            self.ok = false;
            self.bad.insert(key.clone());
        }
        // One line per problem, whatever the cause's words.
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        let p = Problem {
            severity,
            key,
            message,
        };
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    /// Whether `key` (or its section) had a problem, so its value is not worth checking.
    fn is_bad(&self, key: &str) -> bool {
        self.bad.iter().any(|b| {
            key == b
                || key
                    .strip_prefix(b.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }

    fn mark_bad(&mut self, key: &str) {
        self.bad.insert(key.to_owned());
    }

    /// The text form: `error: <key>: <message>` per problem, then a summary line.
    pub fn render_text(&self, config: &Path) -> String {
        let mut out = String::new();
        for p in &self.problems {
            let _ = writeln!(out, "{}: {}: {}", p.severity, p.key, p.message);
        }
        let errors = self.errors().count();
        let warnings = self.problems.len() - errors;
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let _ = writeln!(
            out,
            "{}: {} ({errors} error{}, {warnings} warning{})",
            config.display(),
            if self.ok { "ok" } else { "not usable" },
            plural(errors),
            plural(warnings),
        );
        out
    }

    /// The `--json` form: `{"ok": bool, "problems": [{"severity","key","message"}]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serialises")
    }
}

/// What [`environment_checks`] may do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Bind every listen address (and close it at once) to find one already in use.
    pub bind: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { bind: true }
    }
}

// ---- the schema -----------------------------------------------------------------------------

/// The TOML type a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string (also paths, addresses, durations).
    Str,
    /// An integer in `0..=max`.
    Int(u64),
    /// An array of strings.
    StrList,
    /// A table.
    Table,
    /// An array of tables (`[[section]]`).
    TableList,
    /// A boolean.
    Bool,
    /// A table whose keys the config chooses (e.g. purposes); its values are checked by
    /// `Config::parse`.
    Map,
}

/// One known key: its dotted name (`[]` stands for any entry of an array of tables), its type,
/// and whether serde requires it (with the placeholder used when it is missing or bad).
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Dotted name, e.g. `tls.cert` or `ingest.dicom_peers[].address`.
    pub key: &'static str,
    /// The TOML type.
    pub kind: Kind,
    /// `Some(placeholder)` if the key must be present whatever the role.
    pub required: Option<&'static str>,
}

const U16: Kind = Kind::Int(u16::MAX as u64);
const U32: Kind = Kind::Int(u32::MAX as u64);
const U64: Kind = Kind::Int(i64::MAX as u64);

const fn opt(key: &'static str, kind: Kind) -> KeySpec {
    KeySpec {
        key,
        kind,
        required: None,
    }
}

const fn req(key: &'static str, kind: Kind, placeholder: &'static str) -> KeySpec {
    KeySpec {
        key,
        kind,
        required: Some(placeholder),
    }
}

/// Every key `Config::parse` reads (keep in step with the `Raw*` structs of `config.rs`).
pub const SCHEMA: &[KeySpec] = &[
    req("role", Kind::Str, ""),
    opt("id", Kind::Str),
    req("hsm", Kind::Table, ""),
    req("hsm.module", Kind::Str, "."),
    opt("hsm.softhsm_conf", Kind::Str),
    req("hsm.token_label", Kind::Str, "-"),
    req("hsm.key_label", Kind::Str, "-"),
    req("hsm.pin_file", Kind::Str, "."),
    opt("hsm.sessions", U64),
    opt("hsm.allow_extractable", Kind::Bool),
    req("peer", Kind::Table, ""),
    req("peer.signing_key", Kind::Str, "."),
    opt("peer.names", Kind::StrList),
    req("tls", Kind::Table, ""),
    req("tls.ca", Kind::Str, "."),
    req("tls.cert", Kind::Str, "."),
    req("tls.key", Kind::Str, "."),
    opt("tls.warn_expiry", Kind::Str),
    opt("transport", Kind::Table),
    opt("transport.listen", Kind::Str),
    opt("transport.connect", Kind::Str),
    opt("transport.server_name", Kind::Str),
    opt("transport.retry_for", Kind::Str),
    opt("transport.chunk_size", U32),
    opt("transport.max_in_flight", U64),
    opt("transport.max_transfers", U64),
    opt("transport.chunk_stall_timeout", Kind::Str),
    opt("transport.stream_while_sealing", Kind::Bool),
    opt("link", Kind::Table),
    opt("link.rate_mbit", U64),
    opt("link.rtt_ms", U64),
    opt("link.congestion", Kind::Str),
    opt("link.socket_buffer_bytes", U64),
    opt("link.mtu", U16),
    opt("link.max_mtu", U16),
    opt("link.receive_hold_ms", U64),
    opt("ingest", Kind::Table),
    opt("ingest.listen", Kind::Str),
    opt("ingest.dicom_listen", Kind::Str),
    opt("ingest.dicom_tls_listen", Kind::Str),
    opt("ingest.max_upload_bytes", U64),
    opt("ingest.dicom_ae_title", Kind::Str),
    opt("ingest.dicom_peers", Kind::TableList),
    req("ingest.dicom_peers[].ae_title", Kind::Str, ""),
    req("ingest.dicom_peers[].address", Kind::Str, ""),
    req("ingest.dicom_peers[].hospital", Kind::Str, ""),
    opt("ingest.dicom_peers[].purpose", Kind::Str),
    opt("ingest.dicom_peers[].commitment_host", Kind::Str),
    opt("ingest.dicom_peers[].commitment_port", U64),
    opt("ingest.dicom_peers[].commitment_ae_title", Kind::Str),
    opt("ingest.dicom_peers[].commitment_tls", Kind::Bool),
    opt("ingest.dicom_max_pdu_bytes", U32),
    opt("ingest.dicom_max_associations", U64),
    opt("ingest.dicom_commitment_max_pending", U64),
    opt("ingest.dicom_idle_timeout", Kind::Str),
    opt("ingest.header_timeout", Kind::Str),
    opt("ingest.idle_timeout", Kind::Str),
    opt("ingest.max_connections", U64),
    opt("ingest.handshake_timeout", Kind::Str),
    opt("ingest.max_unidentified_per_source", U64),
    opt("ingest.open_timeout", Kind::Str),
    opt("ingest.stow_max_parts", U64),
    opt("ingest.stow_max_failed_listed", U64),
    req("metrics", Kind::Table, ""),
    req("metrics.listen", Kind::Str, "127.0.0.1:0"),
    req("spool", Kind::Table, ""),
    req("spool.dir", Kind::Str, "."),
    opt("spool.retain", Kind::Str),
    opt("spool.reserve_bytes", U64),
    opt("quota", Kind::Table),
    opt("quota.max_open_transfers", U64),
    opt("quota.max_spool_bytes", U64),
    opt("quota.max_files", U64),
    req("audit", Kind::Table, ""),
    req("audit.dir", Kind::Str, "."),
    opt("audit.checkpoint_every", U64),
    opt("audit.checkpoint_interval", Kind::Str),
    opt("audit.patient_key", Kind::Str),
    opt("policy", Kind::Table),
    opt("policy.consents", Kind::Str),
    opt("policy.negative_list", Kind::StrList),
    opt("policy.hospitals", Kind::StrList),
    opt("policy.deidentify_purposes", Kind::StrList),
    opt("policy.deidentify_options", Kind::Map),
    opt("policy.categories", Kind::StrList),
    opt("policy.destinations", Kind::StrList),
    opt("policy.max_transfer_bytes", U64),
    opt("policy.max_files", U64),
    opt("delivery", Kind::Table),
    req("delivery.kind", Kind::Str, "dir"),
    opt("delivery.path", Kind::Str),
    opt("delivery.url", Kind::Str),
    opt("delivery.batch_bytes", U64),
    opt("delivery.requests_in_flight", U64),
    opt("delivery.ca", Kind::Str),
    opt("delivery.cert", Kind::Str),
    opt("delivery.key", Kind::Str),
    opt("delivery.retry_base", Kind::Str),
    opt("delivery.retry_max", Kind::Str),
    opt("drain", Kind::Table),
    opt("drain.timeout", Kind::Str),
    opt("limits", Kind::Table),
    opt("limits.max_files", U32),
    opt("limits.max_chunks", U32),
];

fn spec(key: &str) -> Option<&'static KeySpec> {
    SCHEMA.iter().find(|s| s.key == key)
}

/// A placeholder for a key the role requires that `Config::parse` reported missing or bad
/// (keys serde requires carry theirs in [`SCHEMA`]).
fn role_placeholder(key: &str) -> Option<&'static str> {
    match key {
        "transport.listen" | "transport.connect" => Some("127.0.0.1:0"),
        "delivery.path" => Some("."),
        "delivery.url" => Some("http://127.0.0.1/"),
        _ => spec(key).and_then(|s| s.required),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Why `v` does not fit `kind`, if it does not.
fn type_problem(kind: Kind, v: &Value) -> Option<String> {
    let expected = match kind {
        Kind::Str if v.is_str() => return None,
        Kind::Str => "a string".to_owned(),
        Kind::Int(max) => match v {
            Value::Integer(i) if *i >= 0 && (*i as u64) <= max => return None,
            Value::Integer(i) => return Some(format!("{i} is not in 0..={max}")),
            _ => "an integer".to_owned(),
        },
        Kind::StrList => match v {
            Value::Array(a) if a.iter().all(Value::is_str) => return None,
            Value::Array(_) => return Some("expected an array of strings".to_owned()),
            _ => "an array of strings".to_owned(),
        },
        Kind::Bool if v.is_bool() => return None,
        Kind::Bool => "a boolean".to_owned(),
        Kind::Map if v.is_table() => return None,
        Kind::Map => "a table".to_owned(),
        Kind::Table if v.is_table() => return None,
        Kind::Table => "a table".to_owned(),
        Kind::TableList => match v {
            Value::Array(a) if a.iter().all(Value::is_table) => return None,
            _ => "an array of tables ([[...]])".to_owned(),
        },
    };
    Some(format!("expected {expected}, found {}", type_name(v)))
}

/// Walks `table` (whose dotted name is `prefix`, schema name `schema_prefix`) against
/// [`SCHEMA`]: reports unknown keys and wrong types and removes them, reports missing
/// required keys and puts their placeholders in, so that serde accepts the result.
fn walk(table: &mut Table, prefix: &str, schema_prefix: &str, report: &mut Report) {
    let join = |p: &str, k: &str| {
        if p.is_empty() {
            k.to_owned()
        } else {
            format!("{p}.{k}")
        }
    };
    let names: Vec<String> = table.keys().cloned().collect();
    for name in names {
        let key = join(prefix, &name);
        let schema_key = join(schema_prefix, &name);
        let Some(s) = spec(&schema_key) else {
            report.error(&key, "unknown key");
            table.remove(&name);
            continue;
        };
        let value = table.get_mut(&name).expect("listed key");
        if let Some(problem) = type_problem(s.kind, value) {
            report.error(&key, problem);
            if s.kind == Kind::Table && s.required.is_some() {
                // Its keys are reported missing below and get their placeholders.
                *value = Value::Table(Table::new());
            } else {
                table.remove(&name);
                continue;
            }
        }
        match (s.kind, table.get_mut(&name)) {
            (Kind::Table, Some(Value::Table(t))) => walk(t, &key, &schema_key, report),
            (Kind::TableList, Some(Value::Array(list))) => {
                // An entry with a problem is left out (its siblings are still judged).
                let mut kept = Vec::new();
                for (i, mut entry) in std::mem::take(list).into_iter().enumerate() {
                    let entry_key = format!("{key}[{i}]");
                    let before = report.problems.len();
                    if let Value::Table(t) = &mut entry {
                        walk(t, &entry_key, &format!("{schema_key}[]"), report);
                    }
                    if report.problems.len() == before {
                        kept.push(entry);
                    }
                }
                *list = kept;
            }
            _ => {}
        }
    }
    // Required keys of this table that are absent.
    let here = if schema_prefix.is_empty() {
        String::new()
    } else {
        format!("{schema_prefix}.")
    };
    for s in SCHEMA {
        let Some(rest) = s.key.strip_prefix(here.as_str()) else {
            continue;
        };
        if rest.contains('.') || rest.contains('[') || table.contains_key(rest) {
            continue;
        }
        let Some(placeholder) = s.required else {
            continue;
        };
        let key = join(prefix, rest);
        if (report.is_bad(prefix) && !prefix.is_empty()) || report.is_bad(&key) {
            // The section itself, or the key's value, was reported already.
            report.mark_bad(&key);
        } else {
            report.error(&key, "missing (required)");
        }
        if s.key == "role" {
            continue;
        }
        let value = match s.kind {
            Kind::Table => Value::Table(Table::new()),
            _ => Value::String(placeholder.to_owned()),
        };
        table.insert(rest.to_owned(), value);
        if let Some(Value::Table(t)) = table.get_mut(rest) {
            walk(t, &key, s.key, report);
        }
    }
}

/// Sets `key` (dotted, no array entries) in `doc` to `value`, or removes it (`None`).
/// Returns whether anything changed.
fn set_key(doc: &mut Table, key: &str, value: Option<&str>) -> bool {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut at = doc;
    for p in parts {
        if !at.contains_key(p) {
            if value.is_none() {
                return false;
            }
            at.insert(p.to_owned(), Value::Table(Table::new()));
        }
        match at.get_mut(p) {
            Some(Value::Table(t)) => at = t,
            _ => return false,
        }
    }
    match value {
        Some(v) => {
            let new = Value::String(v.to_owned());
            at.insert(last.to_owned(), new.clone()) != Some(new)
        }
        None => at.remove(last).is_some(),
    }
}

/// The section of a dotted key (`delivery` for `delivery.ca`).
fn section_of(key: &str) -> &str {
    key.split(['.', '[']).next().unwrap_or(key)
}

/// Reads and judges the config file itself: syntax, keys, types, values. Returns the config
/// with placeholders where keys were bad (marked in the report), or `None` when nothing
/// further can be checked (unreadable file, not TOML, no valid role).
pub fn static_checks(path: &Path, report: &mut Report) -> Option<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            report.error("config", format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let mut doc: Table = match toml::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            let line = e
                .span()
                .map(|span| text.get(..span.start).unwrap_or("").matches('\n').count() + 1);
            let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
            report.error("config", format!("not valid TOML{at}: {}", e.message()));
            return None;
        }
    };
    let walked_clean = {
        let before = report.problems.len();
        walk(&mut doc, "", "", report);
        report.problems.len() == before
    };
    if walked_clean && let Ok(cfg) = Config::parse(path, &text) {
        return Some(cfg);
    }
    match doc.get("role").and_then(Value::as_str) {
        Some("edge" | "gateway") => {}
        Some(other) => {
            report.error("role", format!("`{other}` is not one of edge, gateway"));
            return None;
        }
        // Reported by the walk.
        None => return None,
    }
    // Let `Config::parse` judge the values, one refusal at a time.
    let mut fixed: BTreeSet<String> = BTreeSet::new();
    let mut reset: BTreeSet<String> = BTreeSet::new();
    for _ in 0..64 {
        let text = toml::to_string(&doc).expect("a TOML table serialises");
        let (key, message) = match Config::parse(path, &text) {
            Ok(cfg) => return Some(cfg),
            Err(ConfigError::Invalid { key, message, .. }) => (key, message),
            Err(ConfigError::Missing { key, role, .. }) => {
                (key, format!("missing (required for role {role})"))
            }
            Err(e @ (ConfigError::Parse { .. } | ConfigError::Read { .. })) => {
                report.error("config", e.to_string());
                return None;
            }
        };
        report.error(key, message);
        // Array entries are not addressed one by one: set the whole array aside.
        let target = if key.starts_with("ingest.dicom_peers") {
            "ingest.dicom_peers"
        } else {
            key
        };
        let changed = fixed.insert(target.to_owned())
            && set_key(
                &mut doc,
                target,
                role_placeholder(target).filter(|_| target != "ingest.dicom_peers"),
            );
        if changed {
            continue;
        }
        // Same key again (or nothing to change): set its whole section aside.
        let section = section_of(key).to_owned();
        if !reset.insert(section.clone()) {
            report.error("config", format!("further value checks stopped at `{key}`"));
            return None;
        }
        report.mark_bad(&section);
        doc.remove(&section);
        let mut fresh = Table::new();
        walk(&mut fresh, "", "", &mut Report::new());
        if let Some(v) = fresh.remove(&section) {
            doc.insert(section.clone(), v);
        }
        if section == "delivery" {
            let mut d = Table::new();
            d.insert("kind".into(), Value::String("dir".into()));
            d.insert("path".into(), Value::String(".".into()));
            doc.insert(section, Value::Table(d));
        }
    }
    report.error("config", "too many problems to check further");
    None
}

/// Both stages on the config at `path`. `prepare` runs between them with the config read
/// (the command exports `SOFTHSM2_CONF` there, before the HSM is opened).
pub fn run(
    path: &Path,
    options: Options,
    prepare: impl FnOnce(&Config),
) -> (Report, Option<Config>) {
    let mut report = Report::new();
    let cfg = static_checks(path, &mut report);
    if let Some(cfg) = &cfg {
        prepare(cfg);
        environment_checks(cfg, &mut report, options);
    }
    (report, cfg)
}

// ---- the machine ----------------------------------------------------------------------------

/// Looks at what the config names on this machine: files, the HSM, certificates, listen
/// addresses, directories. Keys `static_checks` found bad are skipped.
pub fn environment_checks(cfg: &Config, report: &mut Report, options: Options) {
    let now = SystemTime::now();
    readable_file(report, "hsm.module", &cfg.hsm.module);
    if let Some(conf) = &cfg.hsm.softhsm_conf {
        readable_file(report, "hsm.softhsm_conf", conf);
    }
    if !report.is_bad("hsm.pin_file")
        && let Err(e) = baylink_hsm::read_pin(&cfg.hsm.pin_file)
    {
        report.error("hsm.pin_file", e.to_string());
    }
    if !report.is_bad("peer.signing_key")
        && let Err(e) = crate::signing::load_public_key(&cfg.peer_signing_key)
    {
        report.error("peer.signing_key", format!("{e:#}"));
    }
    match &cfg.tls.key {
        TlsKeySource::File(key) => certificates(
            report,
            ("tls.ca", cfg.tls.ca.as_path()),
            Some((
                ("tls.cert", cfg.tls.cert.as_path()),
                ("tls.key", key.as_path()),
            )),
            cfg.tls.warn_expiry,
            now,
        ),
        // The key is on the token: `hsm` below checks it against the certificate.
        TlsKeySource::Hsm { .. } => {
            certificates(
                report,
                ("tls.ca", cfg.tls.ca.as_path()),
                None,
                cfg.tls.warn_expiry,
                now,
            );
            if !certificate_file(report, "tls.cert", &cfg.tls.cert, cfg.tls.warn_expiry, now) {
                report.error("tls.key", "cannot be checked: tls.cert is unusable");
            }
        }
    }
    if let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery {
        let pem_key = tls
            .identity
            .as_ref()
            .and_then(|(c, k)| Some((c, k.file()?)));
        certificates(
            report,
            ("delivery.ca", tls.ca.as_path()),
            pem_key.map(|(c, k)| (("delivery.cert", c.as_path()), ("delivery.key", k))),
            cfg.tls.warn_expiry,
            now,
        );
        // The key is on the token: `hsm` below checks it against the certificate.
        if let Some((cert, TlsKeySource::Hsm { .. })) = &tls.identity
            && !certificate_file(report, "delivery.cert", cert, cfg.tls.warn_expiry, now)
        {
            report.error(
                "delivery.key",
                "cannot be checked: delivery.cert is unusable",
            );
        }
    }
    if let Some(DeliverySection::Dir { path }) = &cfg.delivery
        && !report.is_bad("delivery.path")
        && path.exists()
        && !path.is_dir()
    {
        report.error(
            "delivery.path",
            format!("{} is not a directory", path.display()),
        );
    }
    if cfg.policy.consents.is_some()
        && !report.is_bad("policy.consents")
        && let Err(e) = crate::policy::Policy::load(&cfg.policy)
    {
        report.error("policy.consents", e.to_string());
    }
    let key = &cfg.audit.patient_key;
    if !report.is_bad("audit.patient_key") {
        match std::fs::File::open(key) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.warning(
                "audit.patient_key",
                format!(
                    "{} does not exist: serve creates a new random key there, and patients \
                     then hash differently from the records already in the log",
                    key.display()
                ),
            ),
            Err(e) => report.error("audit.patient_key", format!("{}: {e}", key.display())),
        }
    }
    hsm(cfg, report);
    if options.bind {
        listen_addresses(cfg, report);
    }
    directory(report, "spool.dir", &cfg.spool_dir);
    directory(report, "audit.dir", &cfg.audit_dir);
    receive_hold(cfg, report);
    commitment_tls(cfg, report);
}

/// A peer that may request Storage Commitment on the DICOM TLS port but whose listener is
/// reached in the clear: the reports of those requests never leave the edge (they go only
/// over TLS), and stay pending.
fn commitment_tls(cfg: &Config, report: &mut Report) {
    if cfg.ingest.dicom_tls_listen.is_none() {
        return;
    }
    for peer in &cfg.ingest.dicom.peers {
        if peer.commitment.as_ref().is_some_and(|c| !c.tls) {
            report.warning(
                "ingest.dicom_peers.commitment_tls",
                format!(
                    "{} ({}): a Storage Commitment request it makes on dicom_tls_listen is \
                     reported on a new association only over TLS, and commitment_tls is not \
                     set, so such a report stays pending",
                    peer.ae_title, peer.hospital
                ),
            );
        }
    }
}

/// A receive hold of more than a tenth of the round trip is mostly delay: every packet may
/// wait that long, and the `link` controller reads the wait as a queue.
fn receive_hold(cfg: &Config, report: &mut Report) {
    let hold_ms = cfg.link.receive_hold_ms();
    if hold_ms > 0 && hold_ms.saturating_mul(10) > cfg.link.rtt_ms {
        report.warning(
            "link.receive_hold_ms",
            format!(
                "{hold_ms} ms is more than a tenth of link.rtt_ms ({} ms): packets wait that \
                 long before they are read, which the link controller takes for a queue; \
                 0 reads at once",
                cfg.link.rtt_ms
            ),
        );
    }
}

fn readable_file(report: &mut Report, key: &str, path: &Path) {
    if report.is_bad(key) {
        return;
    }
    match std::fs::File::open(path) {
        Ok(f) => {
            if f.metadata().is_ok_and(|m| m.is_dir()) {
                report.error(key, format!("{} is a directory", path.display()));
            }
        }
        Err(e) => report.error(key, format!("{}: {e}", path.display())),
    }
}

/// Why a certificate's validity is a problem at `now`, if it is.
pub fn expiry_problem(
    summary: &baylink_net::probe::CertificateSummary,
    now: SystemTime,
    warn_within: Duration,
) -> Option<(Severity, String)> {
    let at = |secs: i64| {
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
        )
        .to_string()
    };
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if summary.not_before > now_secs {
        return Some((
            Severity::Error,
            format!(
                "{} is not valid before {}",
                summary.subject,
                at(summary.not_before)
            ),
        ));
    }
    match summary.remaining(now) {
        None => Some((
            Severity::Error,
            format!("{} expired on {}", summary.subject, at(summary.not_after)),
        )),
        Some(left) if left < warn_within => Some((
            Severity::Warning,
            format!(
                "{} expires on {} (in {} days, within tls.warn_expiry)",
                summary.subject,
                at(summary.not_after),
                left.as_secs() / 86_400
            ),
        )),
        Some(_) => None,
    }
}

fn certificate_file(
    report: &mut Report,
    key: &str,
    path: &Path,
    warn: Duration,
    now: SystemTime,
) -> bool {
    if report.is_bad(key) {
        return false;
    }
    match baylink_net::probe::certificate_file(path) {
        Ok(certs) => {
            // Every certificate of a CA file counts; of a chain, the leaf (first) matters
            // most, but an expired intermediate breaks it just as well.
            for c in &certs {
                if let Some((severity, message)) = expiry_problem(c, now, warn) {
                    report.push(severity, key.to_owned(), message);
                }
            }
            true
        }
        Err(e) => {
            report.error(key, format!("{e:#}"));
            false
        }
    }
}

/// A config key and the path it names.
type KeyedPath<'a> = (&'a str, &'a Path);

/// A CA file and, optionally, a certificate with its key: readable, parseable, in their
/// validity (against `warn`), and the key the certificate's.
fn certificates(
    report: &mut Report,
    ca: KeyedPath<'_>,
    identity: Option<(KeyedPath<'_>, KeyedPath<'_>)>,
    warn: Duration,
    now: SystemTime,
) {
    certificate_file(report, ca.0, ca.1, warn, now);
    let Some(((cert_key, cert), (key_key, key))) = identity else {
        return;
    };
    let cert_ok = certificate_file(report, cert_key, cert, warn, now);
    if report.is_bad(key_key) {
        return;
    }
    match baylink_net::transport::TlsIdentity::from_pem_files(cert, key) {
        Ok(_) => {}
        Err(e @ TransportError::KeyMismatch { .. }) => report.error(
            key_key,
            format!(
                "{} does not match the certificate in {cert_key} ({}): {e}",
                key.display(),
                cert.display()
            ),
        ),
        Err(TransportError::BadKey { source, .. }) => report.error(
            key_key,
            format!("{}: not a usable private key: {source}", key.display()),
        ),
        Err(e) => {
            if cert_ok {
                report.error(key_key, format!("{e:#}"));
            }
        }
    }
}

/// Opens the token and finds the key, as `serve` will; a refusal names the key to fix.
fn hsm(cfg: &Config, report: &mut Report) {
    const KEYS: [&str; 5] = [
        "hsm.module",
        "hsm.softhsm_conf",
        "hsm.token_label",
        "hsm.key_label",
        "hsm.pin_file",
    ];
    if KEYS.iter().any(|k| report.is_bad(k)) {
        return;
    }
    let Ok(config) = crate::keys::hsm_config(cfg) else {
        return; // the PIN file: reported above
    };
    let token = match baylink_hsm::Token::open(&config) {
        Ok(t) => t,
        Err(e) => {
            report.error(hsm_error_key(&e), e.to_string());
            return;
        }
    };
    if let Err(e) = token.signer() {
        report.error(hsm_error_key(&e), e.to_string());
    }
    // A TLS key on the token: found, protected, and the key of tls.cert, as `serve` checks.
    if cfg.tls.key.hsm_label().is_some()
        && !report.is_bad("tls.key")
        && !report.is_bad("tls.cert")
        && let Err(e) = crate::keys::tls_identity(cfg, &token)
    {
        report.error("tls.key", format!("{e:#}"));
    }
    // The same for a delivery.key on the token.
    if let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery
        && tls
            .identity
            .as_ref()
            .is_some_and(|(_, k)| k.hsm_label().is_some())
        && !report.is_bad("delivery.key")
        && !report.is_bad("delivery.cert")
        && let Err(e) = crate::keys::delivery_identity(cfg, &token)
    {
        report.error("delivery.key", format!("{e:#}"));
    }
}

/// The config key an HSM error is about.
fn hsm_error_key(e: &HsmError) -> &'static str {
    if e.is_pin_refused() {
        return "hsm.pin_file";
    }
    match e {
        HsmError::ModuleLoad { .. } => "hsm.module",
        HsmError::TokenNotFound { .. } => "hsm.token_label",
        HsmError::Pin(_) => "hsm.pin_file",
        HsmError::KeyNotFound { .. }
        | HsmError::PublicKeyNotFound { .. }
        | HsmError::KeyAmbiguous { .. }
        | HsmError::UnsupportedKey { .. }
        | HsmError::SelfCheck { .. }
        | HsmError::InvalidLabel { .. }
        | HsmError::BadSignatureLength { .. } => "hsm.key_label",
        _ => "hsm.module",
    }
}

/// The addresses this role listens on, with their keys and protocols.
pub fn listen_addresses_of(cfg: &Config) -> Vec<(&'static str, &'static str, SocketAddr)> {
    let mut out = vec![("metrics.listen", "tcp", cfg.metrics_listen)];
    match cfg.role {
        Role::Gateway => {
            if let Some(a) = cfg.transport.listen {
                out.push(("transport.listen", "udp", a));
            }
        }
        Role::Edge => {
            if let Some(a) = cfg.ingest.listen {
                out.push(("ingest.listen", "tcp", a));
            }
            if let Some(a) = cfg.ingest.dicom_listen {
                out.push(("ingest.dicom_listen", "tcp", a));
            }
            if let Some(a) = cfg.ingest.dicom_tls_listen {
                out.push(("ingest.dicom_tls_listen", "tcp", a));
            }
        }
    }
    out
}

/// Binds each listen address and closes it at once.
fn listen_addresses(cfg: &Config, report: &mut Report) {
    let mut seen: Vec<(&str, SocketAddr, &str)> = Vec::new();
    for (key, proto, addr) in listen_addresses_of(cfg) {
        if report.is_bad(key) {
            continue;
        }
        if addr.port() != 0
            && let Some((other, ..)) = seen.iter().find(|(_, a, p)| *a == addr && *p == proto)
        {
            report.error(key, format!("{proto} {addr} is also {other}"));
            continue;
        }
        seen.push((key, addr, proto));
        let bound = match proto {
            "udp" => UdpSocket::bind(addr).map(drop),
            _ => TcpListener::bind(addr).map(drop),
        };
        if let Err(e) = bound {
            let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                "already in use".to_owned()
            } else {
                e.to_string()
            };
            report.error(key, format!("cannot listen on {proto} {addr}: {why}"));
        }
    }
}

/// A state directory: a writable directory (missing: a warning, `serve` creates it) on a file
/// system with free space.
fn directory(report: &mut Report, key: &str, dir: &Path) {
    if report.is_bad(key) {
        return;
    }
    let existing = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => dir.to_owned(),
        Ok(_) => {
            report.error(key, format!("{} is not a directory", dir.display()));
            return;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The nearest ancestor that exists is where serve creates it.
            let Some(parent) = dir.ancestors().skip(1).find(|a| a.exists()) else {
                report.error(key, format!("{}: nothing of it exists", dir.display()));
                return;
            };
            if !parent.is_dir() {
                report.error(
                    key,
                    format!(
                        "{} cannot be created: {} is not a directory",
                        dir.display(),
                        parent.display()
                    ),
                );
                return;
            }
            report.warning(
                key,
                format!("{} does not exist; serve creates it", dir.display()),
            );
            parent.to_owned()
        }
        Err(e) => {
            report.error(key, format!("{}: {e}", dir.display()));
            return;
        }
    };
    if let Err(e) = writable(&existing) {
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            report.warning(
                key,
                format!(
                    "{}: no space left: transfers pause until space is freed",
                    existing.display()
                ),
            );
        } else {
            report.error(key, format!("{} is not writable: {e}", existing.display()));
        }
        return;
    }
    match nix::sys::statvfs::statvfs(existing.as_path()) {
        Ok(s) => {
            #[allow(clippy::useless_conversion)] // the types differ between targets
            let free = u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()));
            if free == 0 {
                report.warning(
                    key,
                    format!(
                        "the file system of {} is full: transfers pause until space is freed",
                        existing.display()
                    ),
                );
            }
        }
        Err(e) => report.error(
            key,
            format!("cannot read the free space of {}: {e}", existing.display()),
        ),
    }
}

/// Creates and removes a probe file in `dir`.
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe: PathBuf = dir.join(format!(".baylink-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = r#"
role = "gateway"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "baylink-gateway"
key_label = "baylink-signing"
pin_file = "secrets/gateway.pin"
[peer]
signing_key = "keys/edge.pub.pem"
names = ["edge"]
[tls]
ca = "pki/ca.pem"
cert = "pki/gateway.pem"
key = "pki/gateway.key"
[transport]
listen = "127.0.0.1:47402"
[metrics]
listen = "127.0.0.1:47403"
[spool]
dir = "spool/gateway"
[audit]
dir = "audit/gateway"
[delivery]
kind = "dir"
path = "delivered"
"#;

    /// Runs the static checks on `text` as a config file.
    fn check(text: &str) -> (Report, Option<Config>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, text).unwrap();
        let mut report = Report::new();
        let cfg = static_checks(&path, &mut report);
        (report, cfg)
    }

    fn keys(report: &Report) -> Vec<&str> {
        report.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn a_good_config_has_no_problem_and_parses_as_serve_would() {
        let (report, cfg) = check(GATEWAY);
        assert!(report.ok && report.problems.is_empty(), "{report:?}");
        let cfg = cfg.unwrap();
        assert_eq!(cfg.tls.warn_expiry, crate::config::DEFAULT_WARN_EXPIRY);
    }

    #[test]
    fn a_receive_hold_beyond_a_tenth_of_the_round_trip_is_warned_of() {
        let warned = |link: &str| {
            let (_, cfg) = check(&format!("{GATEWAY}\n[link]\n{link}\n"));
            let mut report = Report::new();
            receive_hold(&cfg.unwrap(), &mut report);
            keys(&report) == ["link.receive_hold_ms"]
        };
        // The defaults never warn: 1 ms from 20 ms up, none below.
        assert!(!warned("rtt_ms = 10"));
        assert!(!warned("rtt_ms = 20"));
        assert!(!warned("rtt_ms = 50\nreceive_hold_ms = 5"));
        assert!(warned("rtt_ms = 10\nreceive_hold_ms = 2"));
        assert!(warned("rtt_ms = 20\nreceive_hold_ms = 3"));
    }

    #[test]
    fn the_example_config_knows_every_key_it_names() {
        let (report, cfg) = check(include_str!("../../systemd/baylink.example.toml"));
        assert!(report.problems.is_empty(), "{report:?}");
        assert!(cfg.is_some());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_all_reported() {
        let text = GATEWAY
            .replace("[tls]", "colour = \"blue\"\n[tls]\nwarn_expiry = 30")
            .replace("[metrics]", "[metrics]\nport = 1")
            .replace("[spool]", "[spool]\nretain = 3")
            + "[link]\nmtu = 70000\nrate_mbit = \"fast\"\n[policy]\nhospitals = [\"a\", 2]\n\
               [bogus]\nx = 1\n";
        let (report, cfg) = check(&text);
        assert!(!report.ok);
        let mut got = keys(&report);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "bogus",
                "link.mtu",
                "link.rate_mbit",
                "metrics.port",
                "peer.colour",
                "policy.hospitals",
                "spool.retain",
                "tls.warn_expiry",
            ],
            "{report:?}"
        );
        // What is left is the config without them, so the machine can still be checked.
        let cfg = cfg.unwrap();
        assert_eq!(cfg.link.mtu, None);
        assert!(report.is_bad("link.mtu") && !report.is_bad("link"));
        assert!(!report.is_bad("tls.cert"));
    }

    #[test]
    fn every_bad_value_is_reported_not_just_the_first() {
        let text = GATEWAY
            .replace("kind = \"dir\"", "kind = \"ftp\"")
            .replace("listen = \"127.0.0.1:47403\"", "listen = \"nowhere\"")
            .replace(
                "[audit]",
                "[audit]\ncheckpoint_every = 0\ncheckpoint_interval = \"soon\"",
            )
            + "[link]\ncongestion = \"reno\"\n[ingest]\ndicom_ae_title = \"FAR-TOO-LONG-AE-TITLE\"\n";
        let (report, cfg) = check(&text);
        let mut got = keys(&report);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "audit.checkpoint_every",
                "audit.checkpoint_interval",
                "delivery.kind",
                "ingest.dicom_ae_title",
                "link.congestion",
                "metrics.listen",
            ],
            "{report:?}"
        );
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.severity == Severity::Error)
        );
        let cfg = cfg.unwrap();
        assert!(report.is_bad("metrics.listen"));
        assert_eq!(cfg.metrics_listen.port(), 0);
    }

    #[test]
    fn missing_keys_are_named_with_the_role_that_needs_them() {
        let text = GATEWAY
            .replace("listen = \"127.0.0.1:47402\"", "")
            .replace("key = \"pki/gateway.key\"", "")
            .replace("[delivery]\nkind = \"dir\"\npath = \"delivered\"", "");
        let (report, cfg) = check(&text);
        let by_key = |k: &str| report.problems.iter().find(|p| p.key == k).cloned();
        assert!(by_key("tls.key").unwrap().message.contains("missing"));
        assert!(
            by_key("transport.listen")
                .unwrap()
                .message
                .contains("required for role gateway"),
            "{report:?}"
        );
        assert!(by_key("delivery.kind").is_some(), "{report:?}");
        assert!(cfg.is_some());
    }

    #[test]
    fn a_repeated_value_error_sets_its_section_aside() {
        // Plain http with a CA and a client identity: removing delivery.ca leaves the
        // identity, which is refused under the same key; the section goes instead.
        let text = GATEWAY.replace(
            "kind = \"dir\"\npath = \"delivered\"",
            "kind = \"dicomweb\"\nurl = \"http://store\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"",
        );
        let (report, cfg) = check(&text);
        assert_eq!(keys(&report), ["delivery.ca"], "{report:?}");
        assert!(cfg.is_some());
        assert!(report.is_bad("delivery.cert"));
    }

    #[test]
    fn dicom_peer_entries_are_named_by_position() {
        let text = format!(
            "{GATEWAY}\n[[ingest.dicom_peers]]\nae_title = \"A\"\naddress = \"127.0.0.1\"\nhospital = \"h\"\n\
             [[ingest.dicom_peers]]\nae_title = \"B\"\naddress = 7\nhospital = \"h\"\nfloor = 2\n"
        );
        let (report, cfg) = check(&text);
        let mut got = keys(&report);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "ingest.dicom_peers[1].address",
                "ingest.dicom_peers[1].floor"
            ],
            "{report:?}"
        );
        assert_eq!(cfg.unwrap().ingest.dicom.peers.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_toml_or_has_no_role_stops_early() {
        let (report, cfg) = check("role = \n");
        assert_eq!(keys(&report), ["config"]);
        assert!(
            report.problems[0]
                .message
                .starts_with("not valid TOML at line "),
            "{report:?}"
        );
        assert!(cfg.is_none());
        let (report, cfg) = check(&GATEWAY.replace("role = \"gateway\"", "role = \"relay\""));
        assert_eq!(keys(&report), ["role"], "{report:?}");
        assert!(cfg.is_none());
    }

    #[test]
    fn every_schema_key_has_the_type_config_parse_expects() {
        // A wrong type for any known key is refused by Config::parse too (the schema does
        // not invent types), and the right type of an optional key is not refused as unknown.
        for s in SCHEMA
            .iter()
            .filter(|s| !s.key.contains('[') && !matches!(s.kind, Kind::Table | Kind::TableList))
        {
            let wrong = match s.kind {
                Kind::Str | Kind::StrList | Kind::Table | Kind::TableList | Kind::Map => "true",
                Kind::Int(_) | Kind::Bool => "\"1\"",
            };
            let (section, name) = match s.key.split_once('.') {
                Some((sec, name)) => (Some(sec), name),
                None => (None, s.key),
            };
            // Without the original line of that key, if the base config has one.
            let comment =
                |t: &str| t.replacen(&format!("\n{name} = "), &format!("\n# {name} = "), 1);
            let base = match section.and_then(|sec| GATEWAY.find(&format!("[{sec}]\n"))) {
                Some(at) => format!("{}{}", &GATEWAY[..at], comment(&GATEWAY[at..])),
                None if section.is_none() => comment(GATEWAY),
                None => GATEWAY.to_owned(),
            };
            let text = match section {
                Some(sec) if base.contains(&format!("[{sec}]")) => base.replacen(
                    &format!("[{sec}]\n"),
                    &format!("[{sec}]\n{name} = {wrong}\n"),
                    1,
                ),
                Some(sec) => format!("{base}\n[{sec}]\n{name} = {wrong}\n"),
                None => format!("{name} = {wrong}\n{base}"),
            };
            let (report, _) = check(&text);
            assert!(
                report.problems.iter().any(|p| p.key == s.key),
                "{}: {report:?}",
                s.key
            );
            assert!(
                Config::parse(Path::new("g.toml"), &text).is_err(),
                "{} = {wrong} is accepted by Config::parse",
                s.key
            );
        }
    }

    #[test]
    fn expiry_is_an_error_once_past_and_a_warning_within_warn_expiry() {
        let day = 86_400;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * day);
        let cert = |before: u64, after: u64| baylink_net::probe::CertificateSummary {
            subject: "CN=edge".into(),
            issuer: "CN=ca".into(),
            not_before: i64::try_from(before * day).unwrap(),
            not_after: i64::try_from(after * day).unwrap(),
        };
        let warn = Duration::from_secs(30 * day);
        assert_eq!(expiry_problem(&cert(900, 1_100), now, warn), None);
        let (s, m) = expiry_problem(&cert(900, 1_010), now, warn).unwrap();
        assert_eq!(s, Severity::Warning);
        assert!(m.contains("in 10 days"), "{m}");
        let (s, m) = expiry_problem(&cert(900, 999), now, warn).unwrap();
        assert_eq!(s, Severity::Error);
        assert!(m.contains("expired"), "{m}");
        let (s, m) = expiry_problem(&cert(1_001, 1_100), now, warn).unwrap();
        assert_eq!(s, Severity::Error);
        assert!(m.contains("not valid before"), "{m}");
    }

    #[test]
    fn text_and_json_forms() {
        let mut r = Report::new();
        r.warning("tls.cert", "expires soon");
        assert!(r.ok);
        r.error("metrics.listen", "cannot listen");
        assert!(!r.ok);
        let text = r.render_text(Path::new("edge.toml"));
        assert_eq!(
            text,
            "warning: tls.cert: expires soon\nerror: metrics.listen: cannot listen\n\
             edge.toml: not usable (1 error, 1 warning)\n"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["problems"][1]["severity"], "error");
        assert_eq!(v["problems"][1]["key"], "metrics.listen");
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn a_directory_is_checked_for_existence_and_writability() {
        let root = tempfile::tempdir().unwrap();
        let mut r = Report::new();
        directory(&mut r, "spool.dir", root.path());
        assert!(r.problems.is_empty(), "{r:?}");
        directory(&mut r, "spool.dir", &root.path().join("a/b"));
        assert_eq!(r.problems[0].severity, Severity::Warning);
        let file = root.path().join("f");
        std::fs::write(&file, b"").unwrap();
        directory(&mut r, "audit.dir", &file);
        assert_eq!(r.problems[1].severity, Severity::Error);
        assert!(r.problems[1].message.contains("not a directory"));
    }

    #[test]
    fn an_address_in_use_is_named() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let text = GATEWAY.replace(
            "listen = \"127.0.0.1:47403\"",
            &format!("listen = \"{}\"", held.local_addr().unwrap()),
        );
        let (mut report, cfg) = check(&text);
        let mut cfg = cfg.unwrap();
        cfg.transport.listen = Some("127.0.0.1:0".parse().unwrap());
        listen_addresses(&cfg, &mut report);
        assert_eq!(keys(&report), ["metrics.listen"]);
        assert!(report.problems[0].message.contains("already in use"));
    }
}
