//! `baylink-bench fairness`: how the edge's send slots are shared between hospitals.
//!
//! One dev-env deployment; the gateway and the edge run as `baylink serve`. Hospital B
//! uploads `--count` studies of `--small` bytes one after another over HTTPS (declare, PUT,
//! commit, wait for `committed`), first alone, then while hospital A's one transfer of
//! `--big` bytes is being sent. Reported: B's per-study latency (declare → `committed`,
//! hdrhistogram) p50/p95/max alone and beside A (the studies committed while A was still
//! sending; those of the second round committed after A are reported apart), and A's throughput (commit answered → `committed`).
//! `--max-transfers 1` runs the edge with one send slot, as the edge sent before
//! `transport.max_transfers`, for the comparison.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::baylink_run::{Deployment, Gateway, probe_base_port};
use crate::ingest::{Client, default_baylink, gbit, start_edge, work_dir};
use crate::payload;
use crate::size::parse_size;

/// Arguments of `baylink-bench fairness`.
#[derive(Debug, clap::Args)]
pub struct FairnessArgs {
    /// Hospital A's one large transfer (bytes, or with a unit: 4GiB, 512MiB).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    big: u64,
    /// Each of hospital B's studies.
    #[arg(long, default_value = "20MiB", value_parser = parse_size)]
    small: u64,
    /// Studies hospital B sends, one after another, alone and again beside A.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    count: u32,
    /// `transport.max_transfers` of the edge (default: the appliance's default); 1 is the
    /// edge's behaviour before the setting, one transfer at a time.
    #[arg(long)]
    max_transfers: Option<u32>,
    /// Where the JSON report goes.
    #[arg(long)]
    json: PathBuf,
    /// The baylink binary (default: next to this one).
    #[arg(long)]
    baylink: Option<PathBuf>,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Latency figures in milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    studies: u64,
    p50: f64,
    p95: f64,
    max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            studies: h.len(),
            p50: h.value_at_quantile(0.5) as f64 / 1000.0,
            p95: h.value_at_quantile(0.95) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    big_bytes: u64,
    small_bytes: u64,
    count: u32,
    /// `transport.max_transfers` the edge ran with (`null`: its default).
    max_transfers: Option<u32>,
    /// Hospital B's study latency, declare → `committed`, B alone.
    small_alone_ms: Latency,
    /// The same for the studies committed while hospital A's large transfer was being sent.
    small_beside_big_ms: Latency,
    /// The studies of the second round committed after A's transfer was (0 of them when A
    /// outlasted the round).
    small_after_big_ms: Latency,
    /// Studies of the second round committed while A's transfer was still being sent.
    small_committed_while_big_sending: u32,
    /// p95 beside A / p95 alone.
    p95_ratio: f64,
    /// A: commit answered → `committed`.
    big_seconds: f64,
    big_gbit_per_s: f64,
    /// A's PUT (the upload into the edge's spool), not part of the figures above.
    big_upload_seconds: f64,
}

fn hospital(base_port: u16, env: &Path, name: &str) -> Client {
    Client {
        base: format!("https://127.0.0.1:{base_port}"),
        ca: env.join("pki/ca.pem"),
        cert: env.join(format!("pki/{name}.pem")),
        key: env.join(format!("pki/{name}.key")),
    }
}

/// Sets `transport.max_transfers` in the edge's config.
fn set_max_transfers(config: &Path, n: u32) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("{}", config.display()))?;
    let transport = doc
        .entry("transport")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("[transport] is not a table")?;
    transport.insert("max_transfers".into(), toml::Value::Integer(i64::from(n)));
    std::fs::write(config, toml::to_string(&doc)?)?;
    Ok(())
}

/// One study of hospital B: declare → `committed`.
async fn study(b: &Client, file: &payload::PayloadFile) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let id = b.declare().await?;
    b.put(&id, &file.path, &file.name).await?;
    b.commit(&id).await?;
    b.wait_committed(&id).await?;
    Ok(started.elapsed())
}

fn record(h: &mut Histogram<u64>, took: Duration) -> anyhow::Result<()> {
    h.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
    Ok(())
}

/// Runs the fairness bench and writes the JSON report.
pub async fn run(args: FairnessArgs) -> anyhow::Result<()> {
    ensure!(
        args.big > 0 && args.small > 0,
        "--big and --small must be > 0"
    );
    let baylink = match &args.baylink {
        Some(b) => b.clone(),
        None => default_baylink()?,
    };
    let (work, _tmp) = work_dir(args.work_dir.as_deref(), "baylink-fairness-")?;
    let base_port = probe_base_port()?;
    let env = work.join("env");
    let mut deployment = Deployment::create(&baylink, &env, base_port).await?;
    if let Some(n) = args.max_transfers {
        set_max_transfers(&env.join("edge.toml"), n)?;
        deployment = Deployment::load(&env)?;
    }
    let gateway = Gateway::start(&baylink, &deployment, &work, None).await?;
    let (mut edge, _) = start_edge(&baylink, &deployment.edge.path, &work).await?;
    let a = Arc::new(hospital(base_port, &env, "hospital-a"));
    let b = hospital(base_port, &env, "hospital-b");

    let small_dir = work.join("small");
    std::fs::create_dir_all(&small_dir)?;
    let small = payload::generate(&small_dir, args.small, 1, 21)?.remove(0);

    eprintln!(
        "hospital B alone: {} studies of {} bytes",
        args.count, args.small
    );
    let mut alone = Histogram::<u64>::new(3)?;
    for _ in 0..args.count {
        record(&mut alone, study(&b, &small).await?)?;
    }

    let big_dir = work.join("big");
    std::fs::create_dir_all(&big_dir)?;
    let big = payload::generate(&big_dir, args.big, 1, 22)?.remove(0);
    eprintln!("hospital A uploads {} bytes", args.big);
    let big_id = a.declare().await?;
    let put = a.put(&big_id, &big.path, &big.name).await?;
    // The edge holds its own copy now; the source is not needed (the disk may be small).
    std::fs::remove_file(&big.path)?;
    a.commit(&big_id).await?;
    let committed_at = Instant::now();
    let big_done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (a, id, done) = (a.clone(), big_id.clone(), big_done.clone());
        tokio::spawn(async move {
            a.wait_committed(&id).await?;
            done.store(true, Ordering::SeqCst);
            anyhow::Ok(committed_at.elapsed())
        })
    };
    // B's studies begin once A's transfer holds a slot (or waits for one).
    while a.state(&big_id).await? == "sealed" && !big_done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "hospital B beside A: {} studies of {} bytes",
        args.count, args.small
    );
    let mut beside = Histogram::<u64>::new(3)?;
    let mut after = Histogram::<u64>::new(3)?;
    let mut overlapped = 0;
    for n in 0..args.count {
        let took = study(&b, &small).await?;
        let sending = !big_done.load(Ordering::SeqCst);
        overlapped += u32::from(sending);
        eprintln!(
            "  study {}: {:.2} s{}",
            n + 1,
            took.as_secs_f64(),
            if sending { "" } else { " (A done)" }
        );
        if sending {
            record(&mut beside, took)?;
        } else {
            record(&mut after, took)?;
        }
    }
    let big_seconds = waiter.await??.as_secs_f64();

    let (alone_l, beside_l) = (Latency::of(&alone), Latency::of(&beside));
    let report = Report {
        big_bytes: args.big,
        small_bytes: args.small,
        count: args.count,
        max_transfers: args.max_transfers,
        p95_ratio: if alone_l.p95 > 0.0 {
            beside_l.p95 / alone_l.p95
        } else {
            0.0
        },
        small_alone_ms: alone_l,
        small_beside_big_ms: beside_l,
        small_after_big_ms: Latency::of(&after),
        small_committed_while_big_sending: overlapped,
        big_seconds,
        big_gbit_per_s: gbit(args.big, big_seconds),
        big_upload_seconds: put.as_secs_f64(),
    };
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.json, &json)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    println!("{json}");
    edge.kill().await?;
    gateway.stop().await?;
    Ok(())
}

fn print_table(r: &Report) {
    eprintln!(
        "\n| hospital B, {} × {} MiB | p50 ms | p95 ms | max ms |",
        r.count,
        r.small_bytes >> 20
    );
    eprintln!("|---|---|---|---|");
    for (what, l) in [
        ("alone", &r.small_alone_ms),
        ("while A's transfer was sending", &r.small_beside_big_ms),
        ("second round, after A's transfer", &r.small_after_big_ms),
    ] {
        eprintln!(
            "| {what} ({} studies) | {:.0} | {:.0} | {:.0} |",
            l.studies, l.p50, l.p95, l.max
        );
    }
    eprintln!(
        "\nA: {} MiB in {:.1} s ({:.2} Gbit/s); {} of B's {} studies committed while A was sending; p95 ratio {:.2}",
        r.big_bytes >> 20,
        r.big_seconds,
        r.big_gbit_per_s,
        r.small_committed_while_big_sending,
        r.count,
        r.p95_ratio
    );
}
