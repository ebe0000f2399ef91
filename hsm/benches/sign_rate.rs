//! Signing rate on SoftHSM: one session on one thread, then pools of 2 and 4 sessions with as
//! many threads, and 4 threads sharing one session.
//!
//! `cargo bench -p baylink-hsm --features testing --bench sign_rate`
//! Environment: `BAYLINK_BENCH_SECS` (default 3) per run; `BAYLINK_BENCH_JSON=path` writes the
//! results as JSON. Each signature includes the software SHA-256 and the verification that
//! `Signer::sign` always does; the verification cost alone is measured too, and so is the token
//! alone (raw cryptoki, one session, no verification) for comparison.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use baylink_hsm::testing::SoftHsm;
use baylink_hsm::{Signer, Token};
use serde_json::json;

const KEY: &str = "bench";

struct Run {
    name: &'static str,
    sessions: usize,
    threads: usize,
    signatures: usize,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.signatures as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&self, p: usize) -> f64 {
        let n = self.latencies_ns.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_ns[(n * p / 100).min(n - 1)] as f64 / 1000.0
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "sessions": self.sessions,
            "threads": self.threads,
            "signatures": self.signatures,
            "seconds": self.elapsed.as_secs_f64(),
            "signatures_per_second": self.rate(),
            "p50_us": self.percentile_us(50),
            "p99_us": self.percentile_us(99),
        })
    }
}

/// Signs on `threads` threads until `duration` has passed, recording every latency.
fn measure(
    name: &'static str,
    signer: &Signer,
    sessions: usize,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    // Warm up: sessions opened, key handle cached, caches hot.
    for _ in 0..200 {
        signer.sign(b"warm-up")?;
    }
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread: Vec<anyhow::Result<Vec<u64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let signer = signer.clone();
                scope.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let mut latencies = Vec::with_capacity(64 * 1024);
                    let mut i = 0u64;
                    loop {
                        let msg = format!("bench thread {t} message {i}");
                        let t0 = Instant::now();
                        signer.sign(msg.as_bytes())?;
                        let now = Instant::now();
                        latencies.push((now - t0).as_nanos() as u64);
                        i += 1;
                        if now >= deadline {
                            return Ok(latencies);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut latencies_ns = Vec::new();
    for result in per_thread {
        latencies_ns.extend(result?);
    }
    latencies_ns.sort_unstable();
    Ok(Run {
        name,
        sessions,
        threads,
        signatures: latencies_ns.len(),
        elapsed,
        latencies_ns,
    })
}

/// The token alone, for comparison: raw cryptoki, one session per thread, CKM_ECDSA over a
/// fixed digest, no pool and no verification. Uses the module our `Token` already initialised.
fn measure_raw(
    name: &'static str,
    hsm: &SoftHsm,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    use cryptoki::context::Pkcs11;
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;

    let ctx = Pkcs11::new(hsm.module())?;
    let slot = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label() == hsm.token_label())
        })
        .context("fixture token not found")?;
    let start = Instant::now();
    let deadline = start + duration + Duration::from_millis(50);
    let per_thread: Vec<anyhow::Result<Vec<u64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let ctx = ctx.clone();
                scope.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let session = ctx.open_ro_session(slot)?;
                    match session.login(UserType::User, Some(&baylink_hsm::testing::user_pin())) {
                        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let key = *session
                        .find_objects(&[
                            Attribute::Class(ObjectClass::PRIVATE_KEY),
                            Attribute::Label(KEY.as_bytes().to_vec()),
                        ])?
                        .first()
                        .context("bench key not found")?;
                    let digest = [0x5a; 32];
                    for _ in 0..50 {
                        session.sign(&Mechanism::Ecdsa, key, &digest)?;
                    }
                    let mut latencies = Vec::with_capacity(64 * 1024);
                    loop {
                        let t0 = Instant::now();
                        session.sign(&Mechanism::Ecdsa, key, &digest)?;
                        let now = Instant::now();
                        latencies.push((now - t0).as_nanos() as u64);
                        if now >= deadline {
                            return Ok(latencies);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut latencies_ns = Vec::new();
    for result in per_thread {
        latencies_ns.extend(result?);
    }
    latencies_ns.sort_unstable();
    Ok(Run {
        name,
        sessions: threads,
        threads,
        signatures: latencies_ns.len(),
        elapsed,
        latencies_ns,
    })
}

fn open(hsm: &SoftHsm, sessions: usize) -> anyhow::Result<Signer> {
    let mut config = hsm.config(KEY);
    config.sessions = sessions;
    Ok(Token::open(&config)?.signer()?)
}

fn main() -> anyhow::Result<()> {
    let secs: f64 = match std::env::var("BAYLINK_BENCH_SECS") {
        Ok(s) => s.parse().context("BAYLINK_BENCH_SECS")?,
        Err(_) => 3.0,
    };
    let duration = Duration::from_secs_f64(secs);
    let load_before = load_average();
    let hsm = SoftHsm::new()?;
    hsm.open(KEY)?.generate_key(KEY)?;

    let mut runs = Vec::new();
    {
        let signer = open(&hsm, 1)?;
        runs.push(measure("single_session", &signer, 1, 1, duration)?);
        // Verification alone (part of every `sign`).
        let sig = signer.sign(b"verify me")?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            signer.public_key().verify(b"verify me", sig.as_ref())?;
            n += 1;
        }
        let verify_rate = n as f64 / start.elapsed().as_secs_f64();
        println!("verify (aws-lc-rs, 1 thread): {verify_rate:.0} verifications/s");
        runs.push(measure("pool_2x2", &open(&hsm, 2)?, 2, 2, duration)?);
        runs.push(measure("pool_4x4", &open(&hsm, 4)?, 4, 4, duration)?);
        runs.push(measure("session_1_threads_4", &signer, 1, 4, duration)?);
        runs.push(measure_raw("raw_cryptoki_1x1", &hsm, 1, duration)?);
        runs.push(measure_raw("raw_cryptoki_2x2", &hsm, 2, duration)?);

        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "cpus {cpus}, 1-minute load average before {load_before}, after {}",
            load_average()
        );
        println!(
            "{:<22} {:>8} {:>7} {:>10} {:>12} {:>9} {:>9}",
            "run", "sessions", "threads", "signatures", "sigs/s", "p50 us", "p99 us"
        );
        for run in &runs {
            println!(
                "{:<22} {:>8} {:>7} {:>10} {:>12.0} {:>9.1} {:>9.1}",
                run.name,
                run.sessions,
                run.threads,
                run.signatures,
                run.rate(),
                run.percentile_us(50),
                run.percentile_us(99)
            );
        }
        if let Ok(path) = std::env::var("BAYLINK_BENCH_JSON") {
            let doc = json!({
                "bench": "hsm_sign_rate",
                "module": hsm.module().display().to_string(),
                "mechanism": "CKM_ECDSA P-256 over software SHA-256, verified after signing",
                "cpus": cpus,
                "load_average_before": load_before,
                "load_average_after": load_average(),
                "verify_per_second": verify_rate,
                "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
            });
            std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
                .with_context(|| format!("writing {path}"))?;
            println!("wrote {path}");
        }
    }
    Ok(())
}

/// The 1-minute load average (other work on the machine skews every figure here).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}
