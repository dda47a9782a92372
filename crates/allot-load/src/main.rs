//! `allot-load`: drives an Allot server over HTTP and reports what it measured.
//!
//! ```sh
//! allot-load --url http://127.0.0.1:8080 --scenario holds --clients 256 --duration-seconds 10 \
//!     --database-url sqlite://data/allot.db --json report.json
//! ```
//! Exit status: 0, or 1 if the database check failed, or 2 if the run could not be made.

use std::time::Duration;

use allot_load::{Config, Report, parse_mix, scenario};
use clap::Parser;

/// mimalloc, as the server: the generator shares the two cores with the server it measures,
/// and glibc's malloc and free were ~8 % of its CPU per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "allot-load", about = "Load generator for Allot: real HTTP, latency percentiles, database check")]
struct Args {
    /// The server's root URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Named mix: ping (HTTP ceiling), holds, flash-sale, hot-counter, seat-map, availability, mixed.
    #[arg(long, default_value = "mixed")]
    scenario: String,
    /// Explicit mix instead of the scenario's, e.g. `hold-seat=60,seat-map=40`.
    #[arg(long)]
    mix: Option<String>,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Stop after this many requests in all.
    #[arg(long)]
    requests: Option<u64>,
    /// Open loop: start requests at this rate per second (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Seats of the cinema the run makes.
    #[arg(long, default_value_t = 300)]
    seats: usize,
    /// Shows over those seats (`hold-seat` takes each (show, seat) pair once).
    #[arg(long, default_value_t = 100)]
    shows: usize,
    /// Seats of the hot show (`hold-hot`, the flash sale).
    #[arg(long, default_value_t = 120)]
    hot_seats: usize,
    #[arg(long, default_value_t = 50)]
    rooms: usize,
    #[arg(long, default_value_t = 50)]
    doctors: usize,
    #[arg(long, default_value_t = 50)]
    chargers: usize,
    /// Customer accounts the clients share.
    #[arg(long, default_value_t = 8)]
    customers: usize,
    #[arg(long, default_value = "admin@demo.allot")]
    admin_email: String,
    #[arg(long, default_value = "demo-password")]
    admin_password: String,
    /// Send an Idempotency-Key with every POST.
    #[arg(long)]
    idempotency_keys: bool,
    /// Open every client's connection before the clock starts (customers already on the page
    /// when a sale opens): latencies are then the requests', not the connection burst's.
    #[arg(long)]
    connect_first: bool,
    /// The server's database, to check the outcome (`sqlite://…` or `postgres://…`).
    #[arg(long)]
    database_url: Option<String>,
    /// Write the report as JSON to this file (`-`: stdout, and no text report).
    #[arg(long)]
    json: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(e.into()),
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("allot-load: {e:#}");
    std::process::ExitCode::from(2)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let (named_mix, flash_sale) = scenario(&args.scenario)?;
    let config = Config {
        url: args.url,
        clients: args.clients,
        duration: Duration::from_secs(args.duration_seconds),
        requests: args.requests,
        rate: args.rate,
        mix: parse_mix(args.mix.as_deref().unwrap_or(named_mix))?,
        flash_sale,
        seats: args.seats,
        shows: args.shows,
        hot_seats: args.hot_seats,
        rooms: args.rooms,
        doctors: args.doctors,
        chargers: args.chargers,
        customers: args.customers,
        admin_email: args.admin_email,
        admin_password: args.admin_password,
        idempotency_keys: args.idempotency_keys,
        connect_first: args.connect_first,
        database_url: args.database_url,
        seed: args.seed,
    };
    let report = allot_load::run(config).await?;
    let json = serde_json::to_string_pretty(&report)?;
    match args.json.as_deref() {
        Some("-") => println!("{json}"),
        Some(path) => {
            std::fs::write(path, json)?;
            print_text(&report);
        }
        None => print_text(&report),
    }
    Ok(report.verification.as_ref().is_none_or(|v| v.ok))
}

fn print_text(r: &Report) {
    println!(
        "mix {} · {} loop · {} clients · {:.1} s · {} requests · {:.0} req/s",
        r.mix, r.mode, r.clients, r.seconds, r.requests, r.requests_per_second
    );
    println!(
        "{:<14} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}  statuses",
        "operation", "requests", "req/s", "2xx/s", "p50 ms", "p90", "p99", "p99.9", "max"
    );
    let rows = r.ops.iter().map(|(k, v)| (k.as_str(), v)).chain([("all holds", &r.holds), ("all", &r.all)]);
    for (name, op) in rows {
        if op.requests == 0 {
            continue;
        }
        let l = &op.latency_ms;
        let statuses: Vec<String> = op.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
        println!(
            "{name:<14} {:>9} {:>10.0} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            op.requests,
            op.requests_per_second,
            op.ok_per_second,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            statuses.join(" ")
        );
    }
    if let Some(v) = &r.verification {
        println!(
            "database check: {} · {} acknowledged bookings, {} stored ({} without acknowledgement) · {} live claims on {} resources · oversold {} · lost or wrong {} · stray claims {}{}",
            if v.ok { "OK" } else { "FAILED" },
            v.acknowledged_bookings,
            v.stored_bookings,
            v.stored_unacknowledged,
            v.live_claims,
            v.resources_checked,
            v.oversold_resources,
            v.lost_or_wrong,
            v.stray_claims,
            v.hot_seats_taken.map(|n| format!(" · hot show: {n} seats taken")).unwrap_or_default()
        );
        for f in &v.failures {
            println!("  {f}");
        }
    }
}
