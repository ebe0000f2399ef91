//! `baylink-bench sweep`: every contestant of `e2e` over the emulated link at one rate, for a
//! series of loss rates at one RTT and a series of RTTs at one loss rate; one `e2e` child per
//! point (its own forwarder and dev-env, one run per contestant, time-boxed), the points'
//! reports gathered into one JSON, and two SVG line charts beside it (Mbit/s against loss and
//! against RTT, one line per contestant, the line rate drawn).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use anyhow::{Context, ensure};
use clap::Args;
use plotters::prelude::*;
use serde::Serialize;

use crate::e2e::write_json;
use crate::proc::Machine;
use crate::size::parse_size;

/// The contestants of a point, in the order of `e2e`'s JSON.
pub const CONTESTANTS: [&str; 5] = ["quinn", "quinn_sha256", "baylink", "scp_cubic", "scp_bbr"];

/// `baylink-bench sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Payload per run and contestant: bytes, or with a unit (MiB, GiB, ...).
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    pub size: u64,
    /// Emulated link rate, Mbit/s.
    #[arg(long, default_value_t = 400.0)]
    pub rate_mbit: f64,
    /// Loss rates of the loss series, percent.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0, 2.0, 5.0])]
    pub losses: Vec<f64>,
    /// RTT of the loss series, ms.
    #[arg(long, default_value_t = 50.0)]
    pub loss_rtt_ms: f64,
    /// RTTs of the RTT series, ms.
    #[arg(long, value_delimiter = ',', default_values_t = [10.0, 50.0, 100.0, 200.0])]
    pub rtts: Vec<f64>,
    /// Loss of the RTT series, percent.
    #[arg(long, default_value_t = 1.0)]
    pub rtt_loss: f64,
    /// `[link] congestion` for quinn and baylink.
    #[arg(long, default_value = "link", value_parser = ["cubic", "bbr", "link"])]
    pub congestion: String,
    /// Time box of each run, seconds (a point has one run per contestant).
    #[arg(long, default_value_t = 45, value_parser = clap::value_parser!(u64).range(1..))]
    pub time_limit: u64,
    /// Where to write the JSON; the charts go beside it as `<stem>-loss.svg` and
    /// `<stem>-rtt.svg`, each point's own `e2e` JSON into `<stem>-points/`.
    #[arg(long)]
    pub json: PathBuf,
    /// The baylink binary (default: `baylink` next to this executable).
    #[arg(long)]
    pub baylink: Option<PathBuf>,
    /// Directory for each point's temporary deployment and payload.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// One point of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// RTT, ms.
    pub rtt_ms: f64,
    /// Loss per direction, percent.
    pub loss_pct: f64,
    /// `e2e`'s exit status (0 every run gave figures or timed out, 1 a run failed, 2 the link
    /// cannot be emulated).
    pub exit_code: Option<i32>,
    /// Mbit/s per contestant (null: no rate; see the report).
    pub mbit_per_s: std::collections::BTreeMap<String, Option<f64>>,
    /// `e2e`'s whole report of the point.
    pub report: Option<serde_json::Value>,
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Link rate, Mbit/s.
    pub rate_mbit: f64,
    /// Payload per run, bytes.
    pub size_bytes: u64,
    /// Time box per run, seconds.
    pub time_limit_s: u64,
    /// quinn's and baylink's congestion controller.
    pub congestion: String,
    /// The loss series' RTT and the RTT series' loss.
    pub loss_rtt_ms: f64,
    /// The RTT series' loss, percent.
    pub rtt_loss_pct: f64,
    /// Every point run (a point in both series runs once).
    pub points: Vec<Point>,
    /// The charts written.
    pub charts: Vec<PathBuf>,
    /// The machine.
    pub machine: Machine,
}

/// The points to run: the loss series, then the RTT series' points not already in it.
pub fn plan(args: &SweepArgs) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = args.losses.iter().map(|&l| (args.loss_rtt_ms, l)).collect();
    for &rtt in &args.rtts {
        if !points.contains(&(rtt, args.rtt_loss)) {
            points.push((rtt, args.rtt_loss));
        }
    }
    points
}

fn sibling(json: &Path, suffix: &str) -> PathBuf {
    let stem = json
        .file_stem()
        .map_or_else(|| "sweep".into(), |s| s.to_string_lossy().into_owned());
    json.with_file_name(format!("{stem}{suffix}"))
}

/// Runs the sweep.
pub async fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    ensure!(
        !args.losses.is_empty() || !args.rtts.is_empty(),
        "nothing to sweep"
    );
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let points_dir = sibling(&args.json, "-points");
    std::fs::create_dir_all(&points_dir)
        .with_context(|| format!("cannot create {}", points_dir.display()))?;
    let plan = plan(&args);
    let mut points = Vec::new();
    for (i, &(rtt, loss)) in plan.iter().enumerate() {
        let out = points_dir.join(format!("rtt{rtt}-loss{loss}.json"));
        eprintln!(
            "sweep point {}/{}: {rtt} ms RTT, {loss} % loss, {} Mbit/s",
            i + 1,
            plan.len(),
            args.rate_mbit
        );
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("e2e")
            .args(["--size", &args.size.to_string(), "--runs", "1"])
            .args(["--rtt-ms", &rtt.to_string(), "--loss", &loss.to_string()])
            .args(["--rate-mbit", &args.rate_mbit.to_string()])
            .args(["--congestion", &args.congestion])
            .args(["--time-limit", &args.time_limit.to_string()])
            .arg("--json")
            .arg(&out)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(b) = &args.baylink {
            cmd.arg("--baylink").arg(b);
        }
        if let Some(w) = &args.work_dir {
            cmd.arg("--work-dir").arg(w);
        }
        let status = cmd.status().await.context("running e2e")?;
        let report: Option<serde_json::Value> = std::fs::read(&out)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if status.code() == Some(2) {
            eprintln!("baylink-bench: the link cannot be emulated here; sweep stopped");
            return Ok(ExitCode::from(2));
        }
        points.push(Point {
            rtt_ms: rtt,
            loss_pct: loss,
            exit_code: status.code(),
            mbit_per_s: rates(report.as_ref()),
            report,
        });
    }
    let loss_chart = sibling(&args.json, "-loss.svg");
    let rtt_chart = sibling(&args.json, "-rtt.svg");
    let mut charts = Vec::new();
    let title = |what: &str| {
        format!(
            "{what}, {} Mbit/s emulated link, {} per run, {} s box",
            args.rate_mbit,
            human(args.size),
            args.time_limit
        )
    };
    if !args.losses.is_empty() {
        let series = series(&points, |p| {
            (p.rtt_ms == args.loss_rtt_ms).then_some(p.loss_pct)
        });
        chart(
            &loss_chart,
            &title(&format!(
                "Throughput vs loss at {} ms RTT",
                args.loss_rtt_ms
            )),
            "loss per direction, %",
            args.rate_mbit,
            &series,
        )?;
        charts.push(loss_chart);
    }
    if !args.rtts.is_empty() {
        let series = series(&points, |p| {
            (p.loss_pct == args.rtt_loss).then_some(p.rtt_ms)
        });
        chart(
            &rtt_chart,
            &title(&format!("Throughput vs RTT at {} % loss", args.rtt_loss)),
            "RTT, ms",
            args.rate_mbit,
            &series,
        )?;
        charts.push(rtt_chart);
    }
    let failed = points.iter().any(|p| p.exit_code != Some(0));
    let report = SweepReport {
        rate_mbit: args.rate_mbit,
        size_bytes: args.size,
        time_limit_s: args.time_limit,
        congestion: args.congestion.clone(),
        loss_rtt_ms: args.loss_rtt_ms,
        rtt_loss_pct: args.rtt_loss,
        points,
        charts,
        machine: Machine::current(),
    };
    write_json(&args.json, &report)?;
    print!("{}", table(&report));
    println!("JSON: {}", args.json.display());
    for c in &report.charts {
        println!("chart: {}", c.display());
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Mbit/s per contestant of one `e2e` report.
fn rates(report: Option<&serde_json::Value>) -> std::collections::BTreeMap<String, Option<f64>> {
    CONTESTANTS
        .iter()
        .map(|&name| {
            let rate = report
                .and_then(|r| r["contestants"][name]["gbit_per_s"].as_f64())
                .map(|g| g * 1000.0);
            (name.to_owned(), rate)
        })
        .collect()
}

/// One line per contestant: (x, Mbit/s) of the points `x_of` picks, sorted by x.
type Series = Vec<(&'static str, Vec<(f64, f64)>)>;

fn series(points: &[Point], x_of: impl Fn(&Point) -> Option<f64>) -> Series {
    CONTESTANTS
        .iter()
        .map(|&name| {
            let mut line: Vec<(f64, f64)> = points
                .iter()
                .filter_map(|p| Some((x_of(p)?, p.mbit_per_s.get(name).copied().flatten()?)))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            (name, line)
        })
        .collect()
}

const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// Writes one SVG line chart.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    rate_mbit: f64,
    series: &Series,
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|(_, l)| l.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min.min(0.0), x_max)
    } else {
        (0.0, 1.0)
    };
    let y_max = series
        .iter()
        .flat_map(|(_, l)| l.iter().map(|p| p.1))
        .fold(rate_mbit, f64::max)
        * 1.1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("payload throughput, Mbit/s")
            .draw()?;
        let line_style = ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                [(x_min, rate_mbit), (x_max, rate_mbit)],
                8,
                6,
                line_style,
            ))?
            .label(format!("line rate {rate_mbit} Mbit/s"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line_style));
        for ((name, line), colour) in series.iter().zip(COLOURS) {
            if line.is_empty() {
                continue;
            }
            let style = ShapeStyle::from(&colour).stroke_width(2);
            chart
                .draw_series(LineSeries::new(line.iter().copied(), style).point_size(3))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

/// The human table: Mbit/s per contestant and point.
pub fn table(r: &SweepReport) -> String {
    let mut out = format!("{:>7} {:>6}", "RTT ms", "loss %");
    for c in CONTESTANTS {
        out += &format!(" {c:>12}");
    }
    out += "  (Mbit/s)\n";
    for p in &r.points {
        out += &format!("{:>7} {:>6}", p.rtt_ms, p.loss_pct);
        for c in CONTESTANTS {
            let v = p.mbit_per_s.get(c).copied().flatten();
            out += &format!(
                " {:>12}",
                v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
            );
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    #[test]
    fn the_plan_runs_a_shared_point_once() {
        let a = Cli::parse_from(["x", "--json", "/tmp/s.json"]).sweep;
        assert_eq!(
            plan(&a),
            vec![
                (50.0, 0.0),
                (50.0, 1.0),
                (50.0, 2.0),
                (50.0, 5.0),
                (10.0, 1.0),
                (100.0, 1.0),
                (200.0, 1.0)
            ]
        );
        assert_eq!(
            sibling(Path::new("/d/sweep.json"), "-loss.svg"),
            Path::new("/d/sweep-loss.svg")
        );
        let a = Cli::parse_from([
            "x",
            "--json",
            "o",
            "--losses",
            "0,5",
            "--rtts",
            "50",
            "--rtt-loss",
            "5",
        ])
        .sweep;
        assert_eq!(plan(&a), vec![(50.0, 0.0), (50.0, 5.0)]);
    }

    #[test]
    fn rates_and_a_chart() {
        let report = serde_json::json!({"contestants": {
            "quinn": {"gbit_per_s": 0.35},
            "quinn_sha256": {"skipped": "not run"},
            "baylink": {"gbit_per_s": 0.3},
            "scp_cubic": {"gbit_per_s": null},
            "scp_bbr": {"gbit_per_s": 0.2},
        }});
        let r = rates(Some(&report));
        assert_eq!(r["quinn"], Some(350.0));
        assert_eq!(r["quinn_sha256"], None);
        assert_eq!(r["scp_cubic"], None);
        let points: Vec<Point> = [0.0, 1.0]
            .iter()
            .map(|&loss| Point {
                rtt_ms: 50.0,
                loss_pct: loss,
                exit_code: Some(0),
                mbit_per_s: r.clone(),
                report: None,
            })
            .collect();
        let s = series(&points, |p| Some(p.loss_pct));
        assert_eq!(s[0], ("quinn", vec![(0.0, 350.0), (1.0, 350.0)]));
        assert!(s[1].1.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        chart(&path, "t", "loss, %", 400.0, &s).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("baylink") && svg.contains("line rate 400 Mbit/s"));
        assert!(
            !svg.contains("quinn_sha256"),
            "an empty line has no legend entry"
        );
    }
}
