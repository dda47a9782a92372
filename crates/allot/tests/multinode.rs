//! Scale-out (SPEC §6 with I1, I2, I5): three real `allot` processes on loopback share one fresh
//! PostgreSQL database. Many customers, each with workers bound to different nodes, fight over
//! the same cinema seats and hotel nights; one node is SIGKILLed mid-load; short holds expire
//! while every node runs its expiry timer and sweep. The database is then checked directly:
//! nothing sold twice, every acknowledged write present, every hold expired exactly once.
//!
//! Needs PostgreSQL (`ALLOT_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`);
//! without it the tests print SKIPPED and pass, unless `CI` is set. `ALLOT_MULTINODE_KEEP=1`
//! keeps the databases and the nodes' logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Acks, Answer, Demo, Item, Mix, Node, Rng, RoomType, Show, demo_catalogue, get, held_id, http_client, login,
    now_nanos, payment, post, register, scratch_dir, send, send_counted, send_random_hold, start_node, str_of,
    worker_seed,
};
use futures::StreamExt;
use jiff::{Timestamp, ToSpan};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const NODES: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many bytes of a node's stderr a failure shows.
const STDERR_TAIL: usize = 3000;
const DB_TIMEOUT: Duration = Duration::from_secs(30);
const CUSTOMERS: usize = 30;
const WORKERS_PER_CUSTOMER: usize = 3;
/// Length of the load of `three_nodes_never_oversell`.
const LOAD_TIME: Duration = Duration::from_secs(3);
/// `node_killed_mid_load_loses_nothing` kills once this many hold/confirm responses came back
/// (and at least `KILL_AFTER_MIN` passed), or at `KILL_AFTER_MAX` whatever the count; the load
/// then goes on for `LOAD_AFTER_KILL` on the two survivors.
const KILL_AT_RESPONSES: usize = 300;
const KILL_AFTER_MIN: Duration = Duration::from_millis(1500);
const KILL_AFTER_MAX: Duration = Duration::from_secs(10);
const LOAD_AFTER_KILL: Duration = Duration::from_millis(1500);
/// The node killed (index): a node started without `--demo`.
const VICTIM: usize = 1;
const SHOWS_USED: usize = 3;
/// Out of ten seats drawn, how many come from a show's hot seats (most holds fight over them);
/// out of ten stays, how many are of the Standard type.
const HOT_IN_10: usize = 7;
const STANDARD_IN_10: usize = 6;
const PASSWORD: &str = "password-123";
const DEMO_PASSWORD: &str = "demo-password";
/// Expiry test: the venue's hold TTL (the minimum allowed), its seats and rooms.
const EXPIRY_TTL_SECONDS: i64 = 30;
const EXPIRY_SEATS: usize = 20;
const EXPIRY_ROOMS: u64 = 10;
/// The expiry job's sweep period in every node (`allot_app::expiry::SWEEP_INTERVAL_SECONDS`).
const SWEEP_SECONDS: u64 = 5;

/// The two load tests would starve each other (and their nodes) on a small machine: one at a time.
static LOAD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The cluster.

/// Three nodes over one fresh database: node 1 loads the demo and listens before nodes 2 and
/// 3 start. On drop every node is killed, their stderr tails are printed if the test panicked,
/// and the database is dropped.
struct Cluster {
    nodes: Vec<Node>,
    db_url: String,
    dir: PathBuf,
    pool: Option<PgPool>,
}

impl Cluster {
    async fn start(test: &str) -> Option<Cluster> {
        let started = Instant::now();
        let db_url = allot_store::testing::fresh_postgres_database().await?;
        let dir = scratch_dir(&format!("multinode-{test}"), now_nanos());
        let mut cluster = Cluster { nodes: Vec::new(), db_url: db_url.clone(), dir: dir.clone(), pool: None };
        cluster.nodes.push(start_node("node-1", &db_url, true, dir.join("node-1.stderr.log"), STDERR_TAIL).await);
        let (second, third) = tokio::join!(
            start_node("node-2", &db_url, false, dir.join("node-2.stderr.log"), STDERR_TAIL),
            start_node("node-3", &db_url, false, dir.join("node-3.stderr.log"), STDERR_TAIL),
        );
        cluster.nodes.push(second);
        cluster.nodes.push(third);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&db_url)
            .await
            .expect("connect to the test database");
        cluster.pool = Some(pool);
        println!(
            "[{test}] {} nodes up after {:?}: {:?} over {db_url}",
            cluster.nodes.len(),
            started.elapsed(),
            cluster.nodes.iter().map(|n| n.base.as_str()).collect::<Vec<_>>()
        );
        Some(cluster)
    }

    fn pool(&self) -> &PgPool {
        self.pool.as_ref().unwrap()
    }

    fn tails(&self) -> String {
        self.nodes.iter().map(|n| format!("----- {} stderr (tail) -----\n{}\n", n.name, n.stderr_tail())).collect()
    }

    /// Panics (printing every node's stderr via `Drop`) when a node died by itself.
    fn assert_running(&mut self, except: Option<usize>) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if Some(i) != except {
                assert!(node.running(), "{} exited by itself", node.name);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if std::thread::panicking() {
            eprintln!("database {}; logs in {}\n{}", self.db_url, self.dir.display(), self.tails());
        }
        if let Some(pool) = self.pool.take() {
            drop(pool);
        }
        if std::env::var_os("ALLOT_MULTINODE_KEEP").is_some() {
            println!("kept database {} and logs in {}", self.db_url, self.dir.display());
            return;
        }
        let url = self.db_url.clone();
        // Drop may run inside the test's runtime: drop the database from a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(15), allot_store::testing::drop_postgres_database(&url))
                        .await;
            });
        })
        .join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database query that fails the test instead of hanging it.
async fn bounded<T, E: std::fmt::Display>(what: &str, fut: impl Future<Output = Result<T, E>>) -> T {
    match tokio::time::timeout(DB_TIMEOUT, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {DB_TIMEOUT:?}"),
    }
}

fn unix_now() -> i64 {
    Timestamp::now().as_second()
}

// ---------------------------------------------------------------------------------------------
// Customers.

/// `count` customers, each registered on one node and logged in on the next (the users table
/// and the token keys are shared).
async fn customers(client: &reqwest::Client, cluster: &Cluster, prefix: &str, count: usize) -> Customers {
    let made = futures::future::join_all((0..count).map(|i| async move {
        let email = format!("{prefix}-{i}@test.allot");
        let on = &cluster.nodes[i % NODES];
        let id = register(client, on, &email, PASSWORD, "Multi").await;
        let token = login(client, &cluster.nodes[(i + 1) % NODES], &email, PASSWORD).await;
        (token, id)
    }))
    .await;
    let (tokens, ids) = made.into_iter().unzip();
    Customers { tokens, ids }
}

/// Customers' access tokens and user ids, by index.
struct Customers {
    tokens: Vec<String>,
    ids: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The contended load of the first two tests.

#[derive(Debug, Clone, PartialEq)]
enum Confirm {
    NotTried,
    /// The HTTP status the confirm was answered with.
    Answered(u16),
    /// Sent, but no answer came back (connection error or timeout).
    Lost,
}

/// A hold answered 201, and what became of its confirm.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    customer: usize,
    node: usize,
    items: Vec<Item>,
    confirm: Confirm,
}

impl Acked {
    fn confirmed(&self) -> bool {
        self.confirm == Confirm::Answered(200)
    }
}

struct Load {
    mix: Mix,
    /// Half of the confirms go to the next node rather than the one that made the hold.
    cross_node_confirm: bool,
    stop: AtomicBool,
    killed: AtomicBool,
    /// Responses (any status) to holds and confirms.
    responses: AtomicUsize,
    in_flight: AtomicUsize,
    unavailable: AtomicUsize,
    writes_2xx: [AtomicUsize; NODES],
    writes_2xx_after_kill: [AtomicUsize; NODES],
    transport_errors: [AtomicUsize; NODES],
    /// Holds sent (the connection was made) without an answer: they may or may not exist.
    unknown_holds: AtomicUsize,
    statuses: Mutex<BTreeMap<String, usize>>,
    unexpected: Mutex<Vec<String>>,
}

impl Load {
    fn new(shows: Vec<Show>, rooms: Vec<RoomType>, cross_node_confirm: bool) -> Load {
        Load {
            mix: Mix::new(shows, rooms, HOT_IN_10, STANDARD_IN_10),
            cross_node_confirm,
            stop: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            responses: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            unavailable: AtomicUsize::new(0),
            writes_2xx: Default::default(),
            writes_2xx_after_kill: Default::default(),
            transport_errors: Default::default(),
            unknown_holds: AtomicUsize::new(0),
            statuses: Mutex::new(BTreeMap::new()),
            unexpected: Mutex::new(Vec::new()),
        }
    }

    /// Counts an answer; `expected` is the one success status of the request.
    fn record(&self, what: &str, node: usize, status: StatusCode, expected: StatusCode, body: &Value) {
        self.responses.fetch_add(1, Ordering::SeqCst);
        *self.statuses.lock().unwrap().entry(format!("{what} {}", status.as_u16())).or_default() += 1;
        if status.is_success() {
            self.writes_2xx[node].fetch_add(1, Ordering::SeqCst);
            if self.killed.load(Ordering::SeqCst) {
                self.writes_2xx_after_kill[node].fetch_add(1, Ordering::SeqCst);
            }
        }
        let unavailable = status == StatusCode::CONFLICT && body["error"]["code"] == "unavailable";
        if unavailable {
            self.unavailable.fetch_add(1, Ordering::SeqCst);
        }
        let fine = status == expected || (what == "hold" && unavailable);
        if !fine {
            let mut unexpected = self.unexpected.lock().unwrap();
            if unexpected.len() < 20 {
                unexpected.push(format!("{what} on node-{}: {status} {body}", node + 1));
            }
        }
    }

    fn transport_error(&self, node: usize) {
        self.transport_errors[node].fetch_add(1, Ordering::SeqCst);
    }

    fn counts(counters: &[AtomicUsize; NODES]) -> [usize; NODES] {
        std::array::from_fn(|i| counters[i].load(Ordering::SeqCst))
    }
}

struct WorkerSpec {
    customer: usize,
    node: usize,
    token: String,
    seed: u64,
}

async fn worker(load: Arc<Load>, client: reqwest::Client, bases: Arc<Vec<String>>, spec: WorkerSpec) -> Vec<Acked> {
    let WorkerSpec { customer, node, token, seed } = spec;
    let mut rng = Rng(seed | 1);
    let mut acked = Vec::new();
    let hold_url = format!("{}/api/v1/bookings", bases[node]);
    while !load.stop.load(Ordering::SeqCst) {
        let (items, answer) = send_random_hold(&load.mix, &mut rng, &client, &hold_url, &token, &load.in_flight).await;
        let (status, booking) = match answer {
            Ok(r) => r,
            Err(e) => {
                load.transport_error(node);
                if !e.is_connect() {
                    // It may have reached the node: the hold may exist.
                    load.unknown_holds.fetch_add(1, Ordering::SeqCst);
                }
                // A dead node refuses at once: do not spin.
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue;
            }
        };
        load.record("hold", node, status, StatusCode::CREATED, &booking);
        if status != StatusCode::CREATED {
            continue;
        }
        let id = held_id(&booking);
        acked.push(Acked { id: id.clone(), customer, node, items, confirm: Confirm::NotTried });
        if rng.below(2) == 0 {
            let confirm_node = if load.cross_node_confirm && rng.below(2) == 0 { (node + 1) % NODES } else { node };
            let url = format!("{}/api/v1/bookings/{id}/confirm", bases[confirm_node]);
            let confirm = client.post(url).bearer_auth(&token).json(&payment());
            let outcome = match send_counted(&load.in_flight, confirm).await {
                Ok((status, body)) => {
                    load.record("confirm", confirm_node, status, StatusCode::OK, &body);
                    if status.is_success() {
                        assert_eq!(body["status"], "confirmed", "{body}");
                    }
                    Confirm::Answered(status.as_u16())
                }
                Err(_) => {
                    load.transport_error(confirm_node);
                    Confirm::Lost
                }
            };
            acked.last_mut().unwrap().confirm = outcome;
        }
    }
    acked
}

struct LoadRun {
    acked: Vec<Acked>,
    load_time: Duration,
    /// Requests in flight when the victim was killed.
    in_flight_at_kill: Option<usize>,
}

/// Runs the workers (customer `w / WORKERS_PER_CUSTOMER`, bound to node `w % NODES`, so every
/// customer writes through all three nodes) for `LOAD_TIME`, or, with `kill`, until that node
/// has been SIGKILLed and `LOAD_AFTER_KILL` has passed.
async fn run_load(
    cluster: &mut Cluster,
    client: &reqwest::Client,
    load: &Arc<Load>,
    tokens: &[String],
    kill: Option<usize>,
) -> LoadRun {
    let nanos = now_nanos() as u64;
    let bases: Arc<Vec<String>> = Arc::new(cluster.nodes.iter().map(|n| n.base.clone()).collect());
    let mut workers = Vec::new();
    for w in 0..tokens.len() * WORKERS_PER_CUSTOMER {
        let customer = w / WORKERS_PER_CUSTOMER;
        let spec =
            WorkerSpec { customer, node: w % NODES, token: tokens[customer].clone(), seed: worker_seed(w, nanos) };
        workers.push(tokio::spawn(worker(load.clone(), client.clone(), bases.clone(), spec)));
    }
    let started = Instant::now();
    let mut killed_at: Option<Instant> = None;
    let mut in_flight_at_kill = None;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        cluster.assert_running(kill.filter(|_| killed_at.is_some()));
        let elapsed = started.elapsed();
        match (kill, killed_at) {
            (None, _) if elapsed >= LOAD_TIME => break,
            (Some(victim), None)
                if (load.responses.load(Ordering::SeqCst) >= KILL_AT_RESPONSES && elapsed >= KILL_AFTER_MIN)
                    || elapsed >= KILL_AFTER_MAX =>
            {
                in_flight_at_kill = Some(load.in_flight.load(Ordering::SeqCst));
                let exit = cluster.nodes[victim].kill().expect("victim was running");
                load.killed.store(true, Ordering::SeqCst);
                killed_at = Some(Instant::now());
                assert_eq!(exit.signal(), Some(9), "{} died of SIGKILL: {exit:?}", cluster.nodes[victim].name);
                println!(
                    "SIGKILLed {} after {elapsed:?} of load, {} responses so far, ~{} requests in flight",
                    cluster.nodes[victim].name,
                    load.responses.load(Ordering::SeqCst),
                    in_flight_at_kill.unwrap()
                );
            }
            (Some(_), Some(at)) if at.elapsed() >= LOAD_AFTER_KILL => break,
            _ => {}
        }
    }
    load.stop.store(true, Ordering::SeqCst);
    let load_time = started.elapsed();
    let mut acked = Vec::new();
    let joined = tokio::time::timeout(REQUEST_TIMEOUT * 3, futures::future::join_all(workers))
        .await
        .expect("workers did not stop in time");
    for w in joined {
        acked.extend(w.expect("worker panicked"));
    }
    LoadRun { acked, load_time, in_flight_at_kill }
}

/// What the clients saw, then what the database holds. Returns the failures.
/// `exact`: every request was answered, so the database must hold exactly the acknowledged
/// bookings of these customers and every unacknowledged confirm must have left its hold held.
async fn verify(
    cluster: &Cluster,
    client: &reqwest::Client,
    load: &Load,
    acked: &[Acked],
    people: &Customers,
    alive: &[usize],
    exact: bool,
) -> Vec<String> {
    let mut failures: Vec<String> = Vec::new();
    let pool = cluster.pool();
    let (tokens, customer_ids) = (&people.tokens, &people.ids);

    // Clients' view: no seat of a show acknowledged to two holds (none were cancelled), no night
    // acknowledged beyond the room type's effective capacity.
    let acks = Acks::of(acked.iter().map(|a| (a.id.as_str(), a.items.as_slice())));
    failures.extend(acks.oversold(&load.mix.rooms));
    let full_nights = acks
        .nights
        .iter()
        .filter(|((r, _), used)| load.mix.rooms.iter().any(|room| &room.id == r && room.effective == **used))
        .count();
    println!(
        "clients: {} seats held once each, {} room-nights used, {full_nights} of them full",
        acks.seats.len(),
        acks.nights.len()
    );

    // Database: every acknowledged hold there with its items' claims; confirms confirmed.
    let ids: Vec<String> = acked.iter().map(|a| a.id.clone()).collect();
    let rows: Vec<(String, String)> = bounded(
        "bookings of acknowledged holds",
        sqlx::query_as("SELECT id, status FROM bookings WHERE id = ANY($1)").bind(&ids).fetch_all(pool),
    )
    .await;
    let status_of: HashMap<String, String> = rows.into_iter().collect();
    let rows: Vec<(String, i64)> = bounded(
        "claims of acknowledged holds",
        sqlx::query_as(
            "SELECT booking_id, COUNT(*)::BIGINT FROM claims WHERE booking_id = ANY($1) GROUP BY booking_id",
        )
        .bind(&ids)
        .fetch_all(pool),
    )
    .await;
    let claims_of: HashMap<String, i64> = rows.into_iter().collect();
    let rows: Vec<(String, String, i64)> = bounded(
        "outbox of acknowledged holds",
        sqlx::query_as(
            "SELECT aggregate_id, topic, COUNT(*)::BIGINT FROM outbox WHERE aggregate_id = ANY($1) \
             GROUP BY aggregate_id, topic",
        )
        .bind(&ids)
        .fetch_all(pool),
    )
    .await;
    let events_of: HashMap<(String, String), i64> = rows.into_iter().map(|(id, t, n)| ((id, t), n)).collect();
    let mut confirmed_unacked = 0;
    for a in acked {
        let Some(status) = status_of.get(&a.id) else {
            failures.push(format!("acknowledged hold {} (node-{}) is not in the database", a.id, a.node + 1));
            continue;
        };
        let ok = match (&a.confirm, status.as_str()) {
            (Confirm::Answered(200), s) => s == "confirmed",
            (Confirm::Lost, s) => s == "held" || s == "confirmed",
            (_, "confirmed") if !exact => true,
            (_, s) => s == "held",
        };
        if !ok {
            failures.push(format!("booking {} (confirm {:?}) is {status} in the database", a.id, a.confirm));
        }
        if status == "confirmed" && !a.confirmed() {
            confirmed_unacked += 1;
        }
        let claims = claims_of.get(&a.id).copied().unwrap_or(0);
        if claims != a.items.len() as i64 {
            failures.push(format!("booking {} has {claims} claims, {} items were acknowledged", a.id, a.items.len()));
        }
        for topic in ["booking.held", "booking.confirmed"] {
            let n = events_of.get(&(a.id.clone(), topic.to_owned())).copied().unwrap_or(0);
            let expected = match topic {
                "booking.held" => 1,
                _ => i64::from(status == "confirmed"),
            };
            if n != expected {
                failures.push(format!("booking {} ({status}): {n} {topic} outbox rows, expected {expected}", a.id));
            }
        }
    }

    // Bookings of these customers nobody acknowledged (a 409 that committed, or a hold whose
    // answer was lost).
    let rows: Vec<(String, String)> = bounded(
        "bookings of the test customers",
        sqlx::query_as("SELECT id, status FROM bookings WHERE customer_id = ANY($1)")
            .bind(customer_ids)
            .fetch_all(pool),
    )
    .await;
    let acked_ids: HashSet<&str> = acked.iter().map(|a| a.id.as_str()).collect();
    let unacked: Vec<&(String, String)> = rows.iter().filter(|(id, _)| !acked_ids.contains(id.as_str())).collect();
    let unknown = load.unknown_holds.load(Ordering::SeqCst);
    if (exact && !unacked.is_empty()) || unacked.len() > unknown {
        failures.push(format!(
            "{} bookings in the database were never acknowledged ({unknown} holds went unanswered): {:?}",
            unacked.len(),
            unacked.iter().take(10).collect::<Vec<_>>()
        ));
    }

    // Database: no seat claimed twice over overlapping spans; no instant of any resource
    // (each night of a room type) beyond capacity × (1 + overbooking %).
    let now = unix_now();
    let double_seats: Vec<(String, String, String, i64, i64)> = bounded(
        "doubly claimed seats",
        sqlx::query_as(
            "SELECT a.resource_id, a.booking_id, b.booking_id, a.block_start::BIGINT, b.block_start::BIGINT
               FROM claims a
               JOIN claims b ON b.resource_id = a.resource_id AND a.item_id < b.item_id
                            AND a.block_start < b.block_end AND b.block_start < a.block_end
               JOIN resources r ON r.id = a.resource_id
              WHERE (r.doc::jsonb->>'capacity')::BIGINT = 1
                AND COALESCE((r.doc::jsonb->'rules'->>'overbooking_percent')::BIGINT, 0) < 100
                AND (a.hold_expires_at IS NULL OR a.hold_expires_at > $1)
                AND (b.hold_expires_at IS NULL OR b.hold_expires_at > $1)
              LIMIT 20",
        )
        .bind(now)
        .fetch_all(pool),
    )
    .await;
    for (seat, a, b, sa, sb) in &double_seats {
        failures.push(format!("seat {seat} claimed by bookings {a} (from {sa}) and {b} (from {sb}) at once"));
    }
    let over: Vec<(String, i64, Option<i64>, Option<i64>)> = bounded(
        "claims over capacity",
        sqlx::query_as(
            "SELECT resource_id, block_start, used, cap FROM (
               SELECT a.resource_id, a.block_start::BIGINT AS block_start,
                      (SELECT SUM(b.quantity)::BIGINT FROM claims b
                        WHERE b.resource_id = a.resource_id AND b.block_start <= a.block_start
                          AND b.block_end > a.block_start
                          AND (b.hold_expires_at IS NULL OR b.hold_expires_at > $1)) AS used,
                      ((r.doc::jsonb->>'capacity')::BIGINT
                        * (100 + COALESCE((r.doc::jsonb->'rules'->>'overbooking_percent')::BIGINT, 0)) / 100) AS cap
                 FROM claims a LEFT JOIN resources r ON r.id = a.resource_id
                WHERE a.hold_expires_at IS NULL OR a.hold_expires_at > $1) t
              WHERE cap IS NULL OR used > cap
              LIMIT 20",
        )
        .bind(now)
        .fetch_all(pool),
    )
    .await;
    for (resource, start, used, cap) in &over {
        let name = load.mix.rooms.iter().find(|r| &r.id == resource).map_or(resource.as_str(), |r| r.name.as_str());
        failures.push(format!("{name}: {used:?} units claimed at {start}, effective capacity {cap:?}"));
    }
    let overridden: i64 = bounded(
        "resources with capacity overrides",
        sqlx::query_scalar(
            "SELECT COUNT(*)::BIGINT FROM resources r
              WHERE EXISTS (SELECT 1 FROM claims c WHERE c.resource_id = r.id)
                AND CASE WHEN jsonb_typeof(r.doc::jsonb->'rules'->'capacity_overrides') = 'array'
                         THEN jsonb_array_length(r.doc::jsonb->'rules'->'capacity_overrides') ELSE 0 END > 0",
        )
        .fetch_one(pool),
    )
    .await;
    assert_eq!(overridden, 0, "the capacity check above ignores capacity overrides; the demo has none");
    let (claims, live): (i64, i64) = bounded(
        "claim and booking counts",
        sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM claims)::BIGINT,
                    (SELECT COUNT(*) FROM bookings WHERE status IN ('held', 'confirmed'))::BIGINT",
        )
        .fetch_one(pool),
    )
    .await;
    println!(
        "database: {claims} live claims, {live} held/confirmed bookings ({} acknowledged, {} not acknowledged, \
         {confirmed_unacked} confirmed without an acknowledged confirm), {} doubly claimed seats, {} over-capacity instants",
        acked.len(),
        unacked.len(),
        double_seats.len(),
        over.len()
    );

    failures.extend(verify_audit(cluster, acked).await);

    // Every acknowledged booking, read back by its owner through another live node.
    let fetched: Vec<(usize, usize, Answer)> = futures::stream::iter(acked.iter().enumerate())
        .map(|(i, a)| {
            let via = alive[(alive.iter().position(|n| *n == a.node).unwrap_or(0) + 1) % alive.len()];
            let req =
                client.get(cluster.nodes[via].url(&format!("/bookings/{}", a.id))).bearer_auth(&tokens[a.customer]);
            async move { (i, via, send(req).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (i, via, result) in fetched {
        let a = &acked[i];
        match result {
            Ok((StatusCode::OK, body)) => {
                let db = status_of.get(&a.id).map_or("missing", String::as_str);
                if body["status"] != db {
                    failures.push(format!(
                        "GET {} on node-{} says {}, the database {db}",
                        a.id,
                        via + 1,
                        body["status"]
                    ));
                }
            }
            Ok((status, body)) => failures.push(format!("GET {} on node-{}: {status} {body}", a.id, via + 1)),
            Err(e) => failures.push(format!("GET {} on node-{}: {e}", a.id, via + 1)),
        }
    }
    failures
}

fn load_summary(load: &Load, run: &LoadRun) -> String {
    format!(
        "{:?} of load: {} responses, {} holds acknowledged 201 ({} confirmed 200), {} × 409 unavailable, \
         2xx writes per node {:?} (after the kill {:?}), transport errors per node {:?}, statuses {:?}",
        run.load_time,
        load.responses.load(Ordering::SeqCst),
        run.acked.len(),
        run.acked.iter().filter(|a| a.confirmed()).count(),
        load.unavailable.load(Ordering::SeqCst),
        Load::counts(&load.writes_2xx),
        Load::counts(&load.writes_2xx_after_kill),
        Load::counts(&load.transport_errors),
        load.statuses.lock().unwrap()
    )
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_oversell() {
    let _serial = LOAD_LOCK.lock().await;
    let started = Instant::now();
    let Some(mut cluster) = Cluster::start("oversell").await else { return };
    let client = http_client(REQUEST_TIMEOUT, Some(CONNECT_TIMEOUT));
    let Demo { shows, rooms, .. } = demo_catalogue(&client, &cluster.nodes[0], SHOWS_USED).await;
    let people = customers(&client, &cluster, "oversell", CUSTOMERS).await;
    println!("catalogue and {} customers ready after {:?}", people.tokens.len(), started.elapsed());

    let load = Arc::new(Load::new(shows, rooms, true));
    let run = run_load(&mut cluster, &client, &load, &people.tokens, None).await;
    println!("{}", load_summary(&load, &run));

    let all: Vec<usize> = (0..NODES).collect();
    let mut failures = verify(&cluster, &client, &load, &run.acked, &people, &all, true).await;
    failures.extend(load.unexpected.lock().unwrap().iter().map(|u| format!("unexpected answer: {u}")));
    let errors = Load::counts(&load.transport_errors);
    if errors.iter().sum::<usize>() > 0 {
        failures.push(format!("requests without an answer although no node was killed: {errors:?}"));
    }
    cluster.assert_running(None);
    println!("three_nodes_never_oversell finished in {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let unavailable = load.unavailable.load(Ordering::SeqCst);
    assert!(unavailable >= 50, "too little contention to mean anything: {unavailable} × 409 unavailable");
    assert!(run.acked.len() >= 30, "too few holds succeeded: {}", run.acked.len());
    let per_node = Load::counts(&load.writes_2xx);
    assert!(per_node.iter().all(|n| *n > 0), "every node served 2xx writes: {per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_killed_mid_load_loses_nothing() {
    let _serial = LOAD_LOCK.lock().await;
    let started = Instant::now();
    let Some(mut cluster) = Cluster::start("kill").await else { return };
    let client = http_client(REQUEST_TIMEOUT, Some(CONNECT_TIMEOUT));
    let Demo { shows, rooms, .. } = demo_catalogue(&client, &cluster.nodes[0], SHOWS_USED).await;
    let people = customers(&client, &cluster, "kill", CUSTOMERS).await;
    println!("catalogue and {} customers ready after {:?}", people.tokens.len(), started.elapsed());

    let load = Arc::new(Load::new(shows, rooms, false));
    let run = run_load(&mut cluster, &client, &load, &people.tokens, Some(VICTIM)).await;
    println!("{}", load_summary(&load, &run));
    let victim_acks = run.acked.iter().filter(|a| a.node == VICTIM).count();
    println!(
        "{} acknowledged {victim_acks} holds before it died; {} of its clients' requests then failed to connect \
         (~{} in flight at the kill, {} holds left without an answer)",
        cluster.nodes[VICTIM].name,
        Load::counts(&load.transport_errors)[VICTIM],
        run.in_flight_at_kill.unwrap_or(0),
        load.unknown_holds.load(Ordering::SeqCst)
    );

    let alive: Vec<usize> = (0..NODES).filter(|n| *n != VICTIM).collect();
    let mut failures = verify(&cluster, &client, &load, &run.acked, &people, &alive, false).await;
    failures.extend(load.unexpected.lock().unwrap().iter().map(|u| format!("unexpected answer: {u}")));
    for n in &alive {
        let errors = Load::counts(&load.transport_errors)[*n];
        if errors > 0 {
            failures.push(format!("{errors} requests to the surviving node-{} got no answer", n + 1));
        }
    }
    cluster.assert_running(Some(VICTIM));
    println!("node_killed_mid_load_loses_nothing finished in {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(victim_acks > 0, "the killed node acknowledged holds before it died");
    let after = Load::counts(&load.writes_2xx_after_kill);
    for n in &alive {
        assert!(after[*n] > 0, "node-{} served 2xx writes after the kill: {after:?}", n + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_with_three_nodes_releases_each_hold_once() {
    let started = Instant::now();
    let Some(cluster) = Cluster::start("expiry").await else { return };
    let client = http_client(REQUEST_TIMEOUT, Some(CONNECT_TIMEOUT));
    let nodes = &cluster.nodes;
    let admin = login(&client, &nodes[0], "admin@demo.allot", DEMO_PASSWORD).await;

    // A venue with the shortest hold TTL: seats with one show, and one room type.
    let (status, venue) = post(
        &client,
        &nodes[0],
        Some(&admin),
        "/venues",
        json!({"name": "Short Holds", "category": "cinema", "location": {"lat": 52.52, "lon": 13.40},
               "timezone": "Europe/Berlin", "currency": "EUR",
               "policies": {"hold_ttl_seconds": EXPIRY_TTL_SECONDS}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{venue}");
    assert_eq!(venue["policies"]["hold_ttl_seconds"], EXPIRY_TTL_SECONDS, "{venue}");
    let venue_id = str_of(&venue, "id");
    let mut seats = Vec::new();
    for i in 0..EXPIRY_SEATS {
        let category = if i % 2 == 0 { "standard" } else { "premium" };
        let (status, seat) = post(
            &client,
            &nodes[i % NODES],
            Some(&admin),
            &format!("/venues/{venue_id}/resources"),
            json!({"name": format!("A{}", i + 1), "capacity": 1, "unit_price": 1000,
                   "attributes": {"row": "A", "number": i + 1, "category": category},
                   "time_model": {"kind": "events"}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{seat}");
        seats.push(str_of(&seat, "id"));
    }
    let start = Timestamp::from_second(unix_now() / 3600 * 3600 + 48 * 3600).unwrap();
    let end = start.checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
    let (status, event) = post(
        &client,
        &nodes[1],
        Some(&admin),
        &format!("/venues/{venue_id}/events"),
        json!({"name": "Late Show", "start": start.to_string(), "end": end.to_string(), "seat_ids": seats,
               "price_categories": {"standard": 1200, "premium": 1800}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let event_id = str_of(&event, "id");
    let (status, room) = post(
        &client,
        &nodes[2],
        Some(&admin),
        &format!("/venues/{venue_id}/resources"),
        json!({"name": "Double", "capacity": EXPIRY_ROOMS, "unit_price": 10000, "time_model": {"kind": "nights"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let room_id = str_of(&room, "id");
    let check_in = jiff::Zoned::now().date().checked_add(10.days()).unwrap();
    let check_out = check_in.checked_add(1.day()).unwrap();
    let room_item = |quantity: u64| {
        json!({"resource_id": room_id, "check_in": check_in.to_string(), "check_out": check_out.to_string(),
               "quantity": quantity})
    };
    let tokens = customers(&client, &cluster, "expiry", 6).await.tokens;
    println!("venue, {EXPIRY_SEATS} seats, a show and a room type ready after {:?}", started.elapsed());

    // One hold per seat and one per room, spread over the nodes: everything is taken.
    let mut requests: Vec<Value> =
        seats.iter().map(|s| json!({"items": [{"resource_id": s, "event_id": event_id}]})).collect();
    requests.extend((0..EXPIRY_ROOMS).map(|_| json!({"items": [room_item(1)]})));
    let holds: Vec<(usize, StatusCode, Value)> =
        futures::future::join_all(requests.iter().enumerate().map(|(i, body)| {
            let (client, node, token) = (&client, &nodes[i % NODES], &tokens[i % tokens.len()]);
            async move {
                let (status, booking) = post(client, node, Some(token), "/bookings", body.clone()).await;
                (i, status, booking)
            }
        }))
        .await;
    let mut held: Vec<(String, usize, i64)> = Vec::new();
    for (i, status, booking) in &holds {
        assert_eq!(*status, StatusCode::CREATED, "hold {i} on node-{}: {booking}", i % NODES + 1);
        assert_eq!(booking["status"], "held", "{booking}");
        let expires: Timestamp = booking["expires_at"].as_str().unwrap().parse().unwrap();
        let created: Timestamp = booking["created_at"].as_str().unwrap().parse().unwrap();
        let ttl = expires.as_second() - created.as_second();
        // `created_at` is the batch clock, which may have moved on while the request queued
        // behind other nodes' batches on a loaded machine: a few seconds less, never more.
        assert!((EXPIRY_TTL_SECONDS - 3..=EXPIRY_TTL_SECONDS + 1).contains(&ttl), "hold TTL {ttl} s: {booking}");
        held.push((str_of(booking, "id"), *i, expires.as_second()));
    }
    let ids: Vec<String> = held.iter().map(|(id, _, _)| id.clone()).collect();
    let last_expiry = held.iter().map(|(_, _, e)| *e).max().unwrap();
    println!(
        "{} holds made over {NODES} nodes after {:?}; last expires at {last_expiry}",
        held.len(),
        started.elapsed()
    );
    let (status, refused) = post(
        &client,
        &nodes[1],
        Some(&tokens[0]),
        "/bookings",
        json!({"items": [{"resource_id": seats[0], "event_id": event_id}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "seat already held: {refused}");
    let (status, refused) =
        post(&client, &nodes[2], Some(&tokens[1]), "/bookings", json!({"items": [room_item(1)]})).await;
    assert_eq!(status, StatusCode::CONFLICT, "room type full: {refused}");

    // Wait for every hold to be expired.
    let pool = cluster.pool();
    let deadline = Instant::now() + Duration::from_secs((last_expiry - unix_now()).max(0) as u64 + 30);
    let expired_at = loop {
        let expired: i64 = bounded(
            "expired holds",
            sqlx::query_scalar("SELECT COUNT(*)::BIGINT FROM bookings WHERE id = ANY($1) AND status = 'expired'")
                .bind(&ids)
                .fetch_one(pool),
        )
        .await;
        if expired == ids.len() as i64 {
            break Instant::now();
        }
        if Instant::now() >= deadline {
            let rows: Vec<(String, String, Option<i64>)> = bounded(
                "statuses",
                sqlx::query_as(
                    "SELECT id, status, expires_at FROM bookings WHERE id = ANY($1) AND status <> 'expired'",
                )
                .bind(&ids)
                .fetch_all(pool),
            )
            .await;
            panic!(
                "{expired} of {} holds expired by {} (last expires_at {last_expiry}); not expired: {rows:?}",
                ids.len(),
                unix_now()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("all {} holds expired {} s after the last expires_at", ids.len(), unix_now() - last_expiry);
    // Let every node's timer and sweep pass over them once more before counting.
    tokio::time::sleep(Duration::from_secs(SWEEP_SECONDS + 1).saturating_sub(expired_at.elapsed())).await;

    let mut failures = Vec::new();
    let rows: Vec<(String, i64, i64)> = bounded(
        "expiry events",
        sqlx::query_as(
            "SELECT aggregate_id, COUNT(*)::BIGINT, MIN(created_at)::BIGINT FROM outbox
              WHERE topic = 'booking.expired' GROUP BY aggregate_id",
        )
        .fetch_all(pool),
    )
    .await;
    let expiries: HashMap<String, (i64, i64)> = rows.into_iter().map(|(id, n, at)| (id, (n, at))).collect();
    let mut lateness: BTreeMap<i64, usize> = BTreeMap::new();
    for (id, i, expires) in &held {
        match expiries.get(id) {
            Some((1, at)) => *lateness.entry(at - expires).or_default() += 1,
            Some((n, _)) => {
                failures.push(format!("hold {id} (made on node-{}): {n} booking.expired rows", i % NODES + 1))
            }
            None => failures.push(format!("hold {id} (made on node-{}): no booking.expired row", i % NODES + 1)),
        }
    }
    if expiries.len() != held.len() {
        failures.push(format!("{} bookings have booking.expired rows, {} holds were made", expiries.len(), held.len()));
    }
    println!("booking.expired written this many seconds after expires_at: {lateness:?}");
    if let Some((late, _)) = lateness.iter().next_back().filter(|(l, _)| **l > 2) {
        failures.push(format!("a hold was released {late} s after its expires_at (I2: at most 1 s): {lateness:?}"));
    }
    let claims: i64 = bounded(
        "claims of expired holds",
        sqlx::query_scalar("SELECT COUNT(*)::BIGINT FROM claims WHERE booking_id = ANY($1)").bind(&ids).fetch_one(pool),
    )
    .await;
    if claims != 0 {
        failures.push(format!("{claims} claims of expired holds are left"));
    }

    // Every node sees them expired; confirming one is too late.
    for (k, node) in nodes.iter().enumerate() {
        let (id, i, _) = &held[k];
        let (status, booking) = get(&client, node, Some(&tokens[i % tokens.len()]), &format!("/bookings/{id}")).await;
        if status != StatusCode::OK || booking["status"] != "expired" {
            failures.push(format!("GET {id} on {}: {status} {booking}", node.name));
        }
    }
    let (id, i, _) = &held[0];
    let (status, body) = post(
        &client,
        &nodes[2],
        Some(&tokens[i % tokens.len()]),
        &format!("/bookings/{id}/confirm"),
        json!({"payment": {"method": "card", "token": "tok_visa"}}),
    )
    .await;
    if status != StatusCode::GONE || body["error"]["code"] != "hold_expired" {
        failures.push(format!("confirm of expired {id}: {status} {body}"));
    }

    // The capacity is free again: all the seats in one hold, all the rooms in another.
    let (status, map) = get(&client, &nodes[1], None, &format!("/events/{event_id}/seats")).await;
    assert_eq!(status, StatusCode::OK, "{map}");
    let taken: Vec<&Value> = map["seats"].as_array().unwrap().iter().filter(|s| s["status"] != "available").collect();
    if !taken.is_empty() {
        failures.push(format!("seats still shown taken after expiry: {taken:?}"));
    }
    let all_seats: Vec<Value> = seats.iter().map(|s| json!({"resource_id": s, "event_id": event_id})).collect();
    let (status, body) = post(&client, &nodes[2], Some(&tokens[2]), "/bookings", json!({"items": all_seats})).await;
    if status != StatusCode::CREATED {
        failures.push(format!("re-holding all {EXPIRY_SEATS} seats after expiry: {status} {body}"));
    }
    let (status, body) =
        post(&client, &nodes[0], Some(&tokens[3]), "/bookings", json!({"items": [room_item(EXPIRY_ROOMS)]})).await;
    if status != StatusCode::CREATED {
        failures.push(format!("re-holding all {EXPIRY_ROOMS} rooms after expiry: {status} {body}"));
    }
    println!("expiry_with_three_nodes_releases_each_hold_once finished in {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The audit trail the three nodes wrote together: one chain that verifies, and exactly one
/// successful `booking.hold` event per stored booking (written in its transaction).
async fn verify_audit(cluster: &Cluster, acked: &[Acked]) -> Vec<String> {
    let mut failures = Vec::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["audit", "verify", "--database-url", &cluster.db_url])
        .env("ALLOT_LOG", "warn")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() {
        failures.push(format!("allot audit verify: {said}"));
    }
    let (bookings, hold_events, distinct): (i64, i64, i64) = bounded(
        "audit events of holds",
        sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM bookings)::BIGINT,
                    (SELECT COUNT(*) FROM audit_events WHERE action = 'booking.hold' AND outcome = 'success')::BIGINT,
                    (SELECT COUNT(DISTINCT target_id) FROM audit_events
                      WHERE action = 'booking.hold' AND outcome = 'success')::BIGINT",
        )
        .fetch_one(cluster.pool()),
    )
    .await;
    if (hold_events, distinct) != (bookings, bookings) {
        failures.push(format!("{bookings} bookings but {hold_events} successful hold events ({distinct} distinct)"));
    }
    let recorded: Vec<String> = bounded(
        "targets of hold events",
        sqlx::query_scalar("SELECT target_id FROM audit_events WHERE action = 'booking.hold' AND outcome = 'success'")
            .fetch_all(cluster.pool()),
    )
    .await;
    let recorded: std::collections::HashSet<String> = recorded.into_iter().collect();
    let missing = acked.iter().filter(|a| !recorded.contains(&a.id)).count();
    if missing > 0 {
        failures.push(format!("{missing} acknowledged holds have no audit event"));
    }
    println!("audit: {said}; {hold_events} successful hold events for {bookings} bookings");
    failures
}
