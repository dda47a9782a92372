//! `allot-load`: a load generator for Allot over real HTTP.
//!
//! A run makes its own world through the API ([`setup`]), then `clients` tasks — each with its
//! own keep-alive connection ([`http`]) — send a weighted mix of operations ([`Op`]) for a
//! fixed time or count: closed loop (each client sends its next request when the last one is
//! answered) or open loop (requests start on a fixed schedule at `rate` per second, and
//! latency is measured from the scheduled start, so a stalled server cannot hide its queue).
//! At the end it reports throughput, latency percentiles and status codes per operation
//! ([`stats`]) and, given the database, checks what the server stored against what it
//! acknowledged ([`verify`]).

pub mod http;
pub mod setup;
pub mod stats;
pub mod verify;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::http::{Conn, Target};
use crate::setup::World;
use crate::stats::{OpReport, Recorder, Stats};
use crate::verify::{Ack, Verification, simple_id};

/// Limits of one run.
pub const CLIENTS_MAX: usize = 10_000;
pub const DURATION_SECONDS_MAX: u64 = 600;
/// Bookings a client keeps to confirm or cancel later; older ones are forgotten.
const OWN_BOOKINGS_MAX: usize = 1_000;
/// Days ahead over which date-based holds spread.
const DAYS_AHEAD_MAX: i64 = 365;

/// One kind of request the mix can contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `GET /healthz`: the HTTP ceiling of the same server.
    Ping,
    /// Hold the next unused (show, seat) pair: spread over many resources, rarely refused.
    HoldSeat,
    /// Hold a random seat of the one hot show (a flash sale).
    HoldHot,
    /// Hold one unit of the general-admission resource (one hot counter).
    HoldGa,
    HoldNight,
    HoldSlot,
    HoldCharger,
    /// Confirm (pay for) one of the client's own holds.
    Confirm,
    /// Cancel one of the client's own bookings.
    Cancel,
    SeatMap,
    Availability,
}

impl Op {
    pub const ALL: [Op; 11] = [
        Op::Ping,
        Op::HoldSeat,
        Op::HoldHot,
        Op::HoldGa,
        Op::HoldNight,
        Op::HoldSlot,
        Op::HoldCharger,
        Op::Confirm,
        Op::Cancel,
        Op::SeatMap,
        Op::Availability,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::HoldSeat => "hold-seat",
            Op::HoldHot => "hold-hot",
            Op::HoldGa => "hold-ga",
            Op::HoldNight => "hold-night",
            Op::HoldSlot => "hold-slot",
            Op::HoldCharger => "hold-charger",
            Op::Confirm => "confirm",
            Op::Cancel => "cancel",
            Op::SeatMap => "seat-map",
            Op::Availability => "availability",
        }
    }

    pub fn is_hold(self) -> bool {
        matches!(self, Op::HoldSeat | Op::HoldHot | Op::HoldGa | Op::HoldNight | Op::HoldSlot | Op::HoldCharger)
    }

    fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// Parses `hold-seat=60,seat-map=40` into weights.
pub fn parse_mix(text: &str) -> anyhow::Result<Vec<(Op, u32)>> {
    let mut mix = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let op = Op::parse(name.trim()).with_context(|| {
            let names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
            format!("unknown operation `{name}` in the mix; known: {}", names.join(", "))
        })?;
        let weight: u32 = weight.trim().parse().with_context(|| format!("weight of `{name}` is not a number"))?;
        mix.push((op, weight));
    }
    if mix.iter().all(|(_, w)| *w == 0) {
        bail!("the mix has no operation with a weight above 0");
    }
    Ok(mix)
}

/// A named mix and the world it needs.
pub fn scenario(name: &str) -> anyhow::Result<(&'static str, bool)> {
    Ok(match name {
        "ping" => ("ping", false),
        "holds" => ("hold-seat", false),
        "flash-sale" => ("hold-hot", true),
        "hot-counter" => ("hold-ga", false),
        "seat-map" => ("seat-map", false),
        "availability" => ("availability", false),
        "mixed" => (
            "hold-seat=30,hold-night=10,hold-slot=10,hold-charger=10,confirm=10,cancel=5,seat-map=15,availability=10",
            false,
        ),
        other => bail!(
            "unknown scenario `{other}`; known: ping, holds, flash-sale, hot-counter, seat-map, availability, mixed"
        ),
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub clients: usize,
    pub duration: Duration,
    /// Stop after this many requests in all (else at `duration`).
    pub requests: Option<u64>,
    /// Open loop at this many requests per second (else closed loop).
    pub rate: Option<f64>,
    pub mix: Vec<(Op, u32)>,
    /// Each client stops once it holds a hot seat or the hot show is sold out.
    pub flash_sale: bool,
    pub seats: usize,
    pub shows: usize,
    pub hot_seats: usize,
    pub rooms: usize,
    pub doctors: usize,
    pub chargers: usize,
    pub customers: usize,
    pub admin_email: String,
    pub admin_password: String,
    /// Send an `Idempotency-Key` with every POST, as a careful client does.
    pub idempotency_keys: bool,
    /// Open every client's connection before the clock starts (customers already on the page
    /// when a sale opens), so the figures are the requests' and not the connection burst's.
    pub connect_first: bool,
    /// Check the outcome in this database (`sqlite://…` or `postgres://…`).
    pub database_url: Option<String>,
    pub seed: u64,
}

impl Config {
    fn check(&self) -> anyhow::Result<()> {
        if self.clients == 0 || self.clients > CLIENTS_MAX {
            bail!("--clients must be between 1 and {CLIENTS_MAX}");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(DURATION_SECONDS_MAX) {
            bail!("--duration-seconds must be between 1 and {DURATION_SECONDS_MAX}");
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            bail!("--rate must be a positive number of requests per second");
        }
        if self.seats == 0 || self.shows == 0 || self.hot_seats == 0 {
            bail!("--seats, --shows and --hot-seats must be at least 1");
        }
        Ok(())
    }
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mix: String,
    pub mode: &'static str,
    pub clients: usize,
    pub rate: Option<f64>,
    pub idempotency_keys: bool,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    /// Holds answered 2xx per second.
    pub holds_per_second: f64,
    /// Every request together.
    pub all: OpReport,
    /// Every hold together (all hold operations).
    pub holds: OpReport,
    pub ops: BTreeMap<String, OpReport>,
    pub verification: Option<Verification>,
    pub nproc: usize,
}

struct Shared {
    world: World,
    config: Config,
    start: Instant,
    deadline: Instant,
    issued: AtomicU64,
    next_pair: AtomicUsize,
    clients_done: AtomicUsize,
    stop: AtomicBool,
}

struct ClientOutcome {
    stats: Recorder,
    acks: Vec<(String, Ack)>,
}

/// Builds the world, runs the load, and (given a database) verifies it.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    prepare(config).await?.run().await
}

/// A load whose world (venue, resources, shows, customers) is built and which has not started.
pub struct Prepared {
    config: Config,
    target: Target,
    world: World,
}

/// Builds the world of a load, so that a harness can start the load itself at a chosen moment
/// without the catalogue writes and password hashing of the set-up.
pub async fn prepare(config: Config) -> anyhow::Result<Prepared> {
    config.check()?;
    let target = Target::parse(&config.url).await?;
    let world = setup::build(&target, &config).await?;
    Ok(Prepared { config, target, world })
}

impl Prepared {
    /// New sessions for the world's customers (see [`setup::refresh_sessions`]).
    pub async fn refresh_sessions(&mut self) -> anyhow::Result<()> {
        setup::refresh_sessions(&self.target, &mut self.world).await
    }

    /// Runs the load and (given a database) verifies it.
    pub async fn run(self) -> anyhow::Result<Report> {
        let Prepared { config, target, world } = self;
        let mut conns: Vec<Conn> = (0..config.clients).map(|_| Conn::new(target.clone())).collect();
        if config.connect_first {
            for conn in &mut conns {
                conn.connect().await.context("opening a client's connection")?;
            }
        }
        let start = Instant::now();
        let shared = Arc::new(Shared {
            world,
            deadline: start + config.duration,
            config,
            start,
            issued: AtomicU64::new(0),
            next_pair: AtomicUsize::new(0),
            clients_done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let tasks: Vec<_> =
            conns.into_iter().enumerate().map(|(i, conn)| tokio::spawn(client(i, shared.clone(), conn))).collect();
        let mut stats = Stats::default();
        let mut acks = HashMap::new();
        // A customer who is done keeps the connection open, as a browser does; they are closed
        // together once the run is over. (Closing each as its client finished put a thousand
        // connections' teardown, on both sides, inside a flash sale's burst.)
        let mut open = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (outcome, conn) = task.await.context("a client task failed")?;
            stats.merge(&outcome.stats);
            // A client's acknowledgements are in order; a booking belongs to one client.
            acks.extend(outcome.acks);
            open.push(conn);
        }
        let seconds = start.elapsed().as_secs_f64();
        drop(open);
        let verification = match &shared.config.database_url {
            Some(url) => Some(verify::verify(url, &shared.world, &acks).await?),
            None => None,
        };
        Ok(report(&shared.config, &stats, seconds, verification))
    }
}

fn report(config: &Config, stats: &Stats, seconds: f64, verification: Option<Verification>) -> Report {
    let mut all = Stats::default().ops.swap_remove(0);
    let mut holds = all.clone();
    let mut ops = BTreeMap::new();
    for op in Op::ALL {
        let s = &stats.ops[op as usize];
        if s.latency.is_empty() {
            continue;
        }
        for into in [Some(&mut all), op.is_hold().then_some(&mut holds)].into_iter().flatten() {
            let _ = into.latency.add(&s.latency);
            for (status, n) in &s.statuses {
                *into.statuses.entry(*status).or_default() += n;
            }
        }
        ops.insert(op.name().to_owned(), OpReport::of(s, seconds));
    }
    let mix: Vec<String> = config.mix.iter().map(|(op, w)| format!("{}={w}", op.name())).collect();
    Report {
        mix: mix.join(","),
        mode: if config.rate.is_some() { "open" } else { "closed" },
        clients: config.clients,
        rate: config.rate,
        idempotency_keys: config.idempotency_keys,
        seconds,
        requests: all.latency.len(),
        requests_per_second: all.latency.len() as f64 / seconds,
        holds_per_second: holds.ok() as f64 / seconds,
        all: OpReport::of(&all, seconds),
        holds: OpReport::of(&holds, seconds),
        ops,
        verification,
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// One simulated client: its own connection, customer, random stream and bookings.
struct Client {
    id: usize,
    shared: Arc<Shared>,
    conn: Conn,
    rng: SmallRng,
    held: VecDeque<String>,
    booked: VecDeque<String>,
    /// Hot seats not yet seen taken (flash sale).
    hot_free: Vec<usize>,
    done: bool,
    out: ClientOutcome,
}

/// Runs one client until its work is done; returns what it measured and its connection, still
/// open.
async fn client(id: usize, shared: Arc<Shared>, conn: Conn) -> (ClientOutcome, Conn) {
    let seed = shared.config.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let hot_free = (0..shared.world.hot_seats).collect();
    let mut c = Client {
        id,
        shared,
        conn,
        rng: SmallRng::seed_from_u64(seed),
        held: VecDeque::new(),
        booked: VecDeque::new(),
        hot_free,
        done: false,
        out: ClientOutcome { stats: Recorder::default(), acks: Vec::new() },
    };
    let total: u32 = c.shared.config.mix.iter().map(|(_, w)| w).sum();
    while !c.done && !c.shared.stop.load(Ordering::Relaxed) {
        let ticket = c.shared.issued.fetch_add(1, Ordering::Relaxed);
        if c.shared.config.requests.is_some_and(|max| ticket >= max) {
            break;
        }
        let began = match c.shared.config.rate {
            Some(rate) => {
                let at = c.shared.start + Duration::from_secs_f64(ticket as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        if began >= c.shared.deadline {
            break;
        }
        let mut pick = c.rng.random_range(0..total);
        let op = c.shared.config.mix.iter().find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        });
        let Some(&(op, _)) = op else { break };
        c.step(op, began).await;
    }
    if c.shared.config.flash_sale {
        let done = c.shared.clients_done.fetch_add(1, Ordering::Relaxed) + 1;
        if done == c.shared.config.clients {
            c.shared.stop.store(true, Ordering::Relaxed);
        }
    }
    (c.out, c.conn)
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// The id of a created booking. The server writes it first, so it is read straight from the
/// body's start; parsing the whole document was ~6 % of the generator's CPU at holds, taken
/// from the two cores it shares with the server it measures. Any other shape is parsed.
fn created_id(body: &[u8]) -> Option<String> {
    let quick = body
        .strip_prefix(br#"{"id":""#)
        .and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]))
        .filter(|id| !id.is_empty() && id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-'))
        .and_then(|id| std::str::from_utf8(id).ok());
    match quick {
        Some(id) => Some(id.to_owned()),
        None => serde_json::from_slice::<Created>(body).ok().map(|c| c.id),
    }
}

/// A seat map as the flash sale's customers read it when [`seat_statuses`] cannot scan it.
#[derive(Deserialize)]
struct SeatMap<'a> {
    #[serde(borrow)]
    seats: Vec<SeatState<'a>>,
}

#[derive(Deserialize)]
struct SeatState<'a> {
    #[serde(borrow)]
    resource_id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
}

/// A seat's resource id and status, borrowed from the answer where they hold no escape.
type SeatStatus<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Each seat's `(resource_id, status)`, in the map's order, read from a seat map's bytes.
///
/// A thousand customers re-read a 120-seat map (~20 KB) after every refusal in a flash sale,
/// and parsing it whole was a third of the generator's CPU in the burst, about a tenth of the
/// machine's, taken from the server it measures. So the two keys are found with `memmem`: in
/// JSON an unescaped `"` never occurs inside a string, so `"resource_id":"` and `"status":"`
/// only match keys, and the generator's own seats carry no such keys in their attributes. A
/// map the scan cannot read whole (a seat without a status, an escape in a value, `expected`
/// seats not found) is parsed instead; in a debug build (the tests, which run flash sales
/// against the real server) a seat map of the server's that did not scan is a failure.
fn seat_statuses(body: &[u8], expected: usize) -> Option<Vec<SeatStatus<'_>>> {
    let scanned = scan_seat_statuses(body).filter(|seats| seats.len() == expected);
    if scanned.is_some() {
        return scanned;
    }
    let map: SeatMap<'_> = serde_json::from_slice(body).ok()?;
    debug_assert!(map.seats.len() != expected, "a seat map of {expected} seats did not scan");
    Some(map.seats.into_iter().map(|s| (s.resource_id, s.status)).collect())
}

fn scan_seat_statuses(body: &[u8]) -> Option<Vec<SeatStatus<'_>>> {
    const ID_KEY: &[u8] = br#""resource_id":""#;
    const STATUS_KEY: &[u8] = br#""status":""#;
    let ids = memchr::memmem::Finder::new(ID_KEY);
    let statuses = memchr::memmem::Finder::new(STATUS_KEY);
    let mut seats = Vec::new();
    let mut at = ids.find(body)?;
    loop {
        let (id, after_id) = string_at(body, at + ID_KEY.len())?;
        let next_seat = ids.find(&body[after_id..]).map(|i| after_id + i);
        let status_at = after_id + statuses.find(&body[after_id..next_seat.unwrap_or(body.len())])?;
        let (status, _) = string_at(body, status_at + STATUS_KEY.len())?;
        seats.push((Cow::Borrowed(id), Cow::Borrowed(status)));
        match next_seat {
            Some(next) => at = next,
            None => return Some(seats),
        }
    }
}

/// The string value starting at `start` (just after its opening quote) and the index after its
/// closing quote; `None` if it holds an escape or is not closed.
fn string_at(body: &[u8], start: usize) -> Option<(&str, usize)> {
    let len = memchr::memchr(b'"', body.get(start..)?)?;
    let value = &body[start..start + len];
    if value.contains(&b'\\') {
        return None;
    }
    Some((std::str::from_utf8(value).ok()?, start + len + 1))
}

/// Indexes (into `seats`) of the first `hot_seats` seats that `map` shows available. The
/// generator shares the machine with the server it measures: a set look-up per seat, not a
/// scan of the map per seat (120 × 300 string comparisons per customer re-reading the map).
fn free_hot_seats(map: &[SeatStatus<'_>], seats: &[String], hot_seats: usize) -> Vec<usize> {
    let available: std::collections::HashSet<&str> =
        map.iter().filter(|(_, status)| status == "available").map(|(id, _)| id.as_ref()).collect();
    (0..hot_seats.min(seats.len())).filter(|&i| available.contains(seats[i].as_str())).collect()
}

impl Client {
    async fn step(&mut self, op: Op, began: Instant) {
        let shared = self.shared.clone();
        let w = &shared.world;
        let token = w.customer(self.id).to_owned();
        let (op, method, path, body) = match op {
            Op::Ping => (op, Method::GET, "/healthz".to_owned(), None),
            Op::SeatMap => {
                let event =
                    if w.shows.is_empty() { w.hot_event.clone() } else { Some(pick(&mut self.rng, &w.shows).clone()) };
                let Some(event) = event else { return };
                (op, Method::GET, format!("/api/v1/events/{event}/seats"), None)
            }
            Op::Availability => {
                let resource = if self.rng.random_bool(0.5) && !w.rooms.is_empty() { &w.rooms } else { &w.chargers };
                let resource = pick(&mut self.rng, resource).clone();
                let from = w.first_day.checked_add(jiff::Span::new().days(self.rng.random_range(0..300))).ok();
                let to = from.and_then(|d| d.checked_add(jiff::Span::new().days(30)).ok());
                let (Some(from), Some(to)) = (from, to) else { return };
                (op, Method::GET, format!("/api/v1/resources/{resource}/availability?from={from}&to={to}"), None)
            }
            Op::Confirm | Op::Cancel => match self.own_booking(op) {
                Some((path, body)) => (op, Method::POST, path, Some(body)),
                None => (Op::HoldSeat, Method::POST, "/api/v1/bookings".to_owned(), Some(self.hold_body(Op::HoldSeat))),
            },
            hold => (hold, Method::POST, "/api/v1/bookings".to_owned(), Some(self.hold_body(hold))),
        };
        let token = (op != Op::Ping && op != Op::SeatMap && op != Op::Availability).then_some(token.as_str());
        let idempotency_key =
            (self.shared.config.idempotency_keys && method == Method::POST).then(|| uuid::Uuid::now_v7().to_string());
        let answer =
            self.conn.send(method, &path, token, idempotency_key.as_deref(), body.map(String::into_bytes)).await;
        let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.out.stats.record(op, answer.status, micros);
        self.acknowledge(op, &path, answer.status, &answer.body).await;
    }

    /// The client's oldest held booking (confirm) or any of its bookings (cancel).
    fn own_booking(&mut self, op: Op) -> Option<(String, String)> {
        if op == Op::Confirm {
            let id = self.held.pop_front()?;
            let body = r#"{"payment":{"method":"card","token":"tok_visa"}}"#.to_owned();
            return Some((format!("/api/v1/bookings/{id}/confirm"), body));
        }
        let id = if self.rng.random_bool(0.5) { self.booked.pop_front() } else { None };
        let id = id.or_else(|| self.held.pop_front()).or_else(|| self.booked.pop_front())?;
        Some((format!("/api/v1/bookings/{id}/cancel"), r#"{"reason":"load test"}"#.to_owned()))
    }

    fn hold_body(&mut self, op: Op) -> String {
        let shared = self.shared.clone();
        let w = &shared.world;
        let item = match op {
            Op::HoldSeat => {
                let n = self.shared.next_pair.fetch_add(1, Ordering::Relaxed);
                let show = &w.shows[n % w.shows.len()];
                let seat = &w.seats[seat_of_pair(n, w.shows.len(), w.seats.len())];
                format!(r#"{{"resource_id":"{seat}","event_id":"{show}"}}"#)
            }
            Op::HoldHot => {
                let seat = if self.hot_free.is_empty() {
                    0
                } else {
                    self.hot_free[self.rng.random_range(0..self.hot_free.len())]
                };
                let event = w.hot_event.as_deref().unwrap_or_default();
                format!(r#"{{"resource_id":"{}","event_id":"{event}"}}"#, w.seats[seat])
            }
            Op::HoldGa => {
                let (resource, event) = w.ga.clone().unwrap_or_default();
                format!(r#"{{"resource_id":"{resource}","event_id":"{event}","quantity":1}}"#)
            }
            Op::HoldNight => {
                let room = pick(&mut self.rng, &w.rooms).clone();
                let day = self.rng.random_range(0..DAYS_AHEAD_MAX);
                let nights = self.rng.random_range(1..=3);
                let check_in = w.first_day.checked_add(jiff::Span::new().days(day)).unwrap_or(w.first_day);
                let check_out = check_in.checked_add(jiff::Span::new().days(nights)).unwrap_or(check_in);
                format!(r#"{{"resource_id":"{room}","check_in":"{check_in}","check_out":"{check_out}"}}"#)
            }
            Op::HoldSlot => {
                let doctor = pick(&mut self.rng, &w.doctors).clone();
                let start = self.day_start() + 8 * 3600 + 1800 * self.rng.random_range(0..24);
                format!(r#"{{"resource_id":"{doctor}","start":"{}","end":"{}"}}"#, ts(start), ts(start + 1800))
            }
            _ => {
                let charger = pick(&mut self.rng, &w.chargers).clone();
                let start = self.day_start() + 900 * self.rng.random_range(0..88);
                let end = start + 900 * self.rng.random_range(2..=8);
                format!(r#"{{"resource_id":"{charger}","start":"{}","end":"{}"}}"#, ts(start), ts(end))
            }
        };
        format!(r#"{{"items":[{item}]}}"#)
    }

    /// Midnight (UTC, the venue's zone) of a random day ahead, in Unix seconds.
    fn day_start(&mut self) -> i64 {
        let first =
            self.shared.world.first_day.to_zoned(jiff::tz::TimeZone::UTC).map_or(0, |z| z.timestamp().as_second());
        first + 86_400 * self.rng.random_range(0..DAYS_AHEAD_MAX)
    }

    /// Remembers what the server acknowledged; in a flash sale, reacts to a refusal.
    async fn acknowledge(&mut self, op: Op, path: &str, status: u16, body: &[u8]) {
        let ok = (200..300).contains(&status);
        if ok && op.is_hold() {
            if let Some(created) = created_id(body) {
                self.out.acks.push((simple_id(&created), Ack::Held));
                remember(&mut self.held, created);
            }
            if op == Op::HoldHot && self.shared.config.flash_sale {
                self.done = true; // One seat per customer.
            }
        } else if ok && (op == Op::Confirm || op == Op::Cancel) {
            let id = path.trim_start_matches("/api/v1/bookings/");
            let id = id.split('/').next().unwrap_or_default().to_owned();
            let ack = if op == Op::Confirm { Ack::Confirmed } else { Ack::Cancelled };
            self.out.acks.push((simple_id(&id), ack));
            if op == Op::Confirm {
                remember(&mut self.booked, id);
            }
        } else if op == Op::HoldHot && status == 409 && self.shared.config.flash_sale {
            self.refresh_hot_seats().await;
        }
    }

    /// Reads the hot show's seat map (a customer looking again after "taken").
    async fn refresh_hot_seats(&mut self) {
        let Some(event) = self.shared.world.hot_event.clone() else { return };
        let began = Instant::now();
        let answer = self.conn.send(Method::GET, &format!("/api/v1/events/{event}/seats"), None, None, None).await;
        let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.out.stats.record(Op::SeatMap, answer.status, micros);
        let hot_seats = self.shared.world.hot_seats;
        let Some(map) = seat_statuses(&answer.body, hot_seats) else { return };
        self.hot_free = free_hot_seats(&map, &self.shared.world.seats, hot_seats);
        if self.hot_free.is_empty() {
            self.done = true; // Sold out.
        }
    }
}

/// The seat of the `n`th (show, seat) pair: pair `n` is show `n % shows`, and consecutive
/// pairs go to different seats as well as different shows, so the holds in flight at any
/// moment decide on many resources (seats), not on one seat's many shows. Over the first
/// `shows × seats` pairs each pair comes once (per show, the seats are a rotation).
fn seat_of_pair(n: usize, shows: usize, seats: usize) -> usize {
    (n / shows + n % shows) % seats
}

fn pick<'a, T>(rng: &mut SmallRng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

fn remember(list: &mut VecDeque<String>, id: String) {
    if list.len() == OWN_BOOKINGS_MAX {
        list.pop_front();
    }
    list.push_back(id);
}

fn ts(unix_seconds: i64) -> String {
    jiff::Timestamp::from_second(unix_seconds).map(|t| t.to_string()).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{SeatStatus, created_id, free_hot_seats, scan_seat_statuses, seat_of_pair, seat_statuses};

    #[test]
    fn the_pairs_cover_every_show_and_seat_once_and_consecutive_ones_differ_in_both() {
        let (shows, seats) = (7, 5);
        let mut seen = std::collections::HashSet::new();
        for n in 0..shows * seats {
            assert!(seen.insert((n % shows, seat_of_pair(n, shows, seats))), "pair {n} repeats");
        }
        for n in 0..shows * seats - 1 {
            if (n + 1) % shows != 0 {
                assert_ne!(seat_of_pair(n, shows, seats), seat_of_pair(n + 1, shows, seats), "pairs {n}, {}", n + 1);
            }
        }
        // Many seats at once: a window of 256 consecutive holds over 2 000 shows of 300 seats.
        let window: std::collections::HashSet<_> = (5_000..5_256).map(|n| seat_of_pair(n, 2_000, 300)).collect();
        assert!(window.len() >= 200, "{} seats", window.len());
    }

    #[test]
    fn the_free_hot_seats_are_those_the_map_shows_available() {
        let seats: Vec<String> = ["a", "b", "c", "d"].map(str::to_owned).to_vec();
        let body = br#"{"seats":[{"resource_id":"d","status":"available"},{"resource_id":"b","status":"held"},
            {"resource_id":"c","status":"available"},{"resource_id":"a","status":"booked"}]}"#;
        let map = seat_statuses(body, 4).unwrap();
        assert_eq!(free_hot_seats(&map, &seats, 3), vec![2], "d is not among the first three");
        assert_eq!(free_hot_seats(&map, &seats, 9), vec![2, 3]);
    }

    #[test]
    fn a_seat_map_is_scanned_as_it_parses_and_parsed_when_the_scan_cannot_read_it() {
        let seat = |id: &str, status: &str| {
            format!(
                r#"{{"resource_id":"{id}","name":"A \"1\"","attributes":{{"row":"A","number":1}},"price_category":"standard","price":1200,"status":"{status}"}}"#
            )
        };
        let seats = [seat("r1", "available"), seat("r2", "held"), seat("r3", "booked")].join(",");
        let body = format!(r#"{{"event_id":"e","start":"s","end":"e","seats":[{seats}]}}"#);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let expected: Vec<SeatStatus<'_>> = parsed["seats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["resource_id"].as_str().unwrap().into(), s["status"].as_str().unwrap().into()))
            .collect();
        assert_eq!(scan_seat_statuses(body.as_bytes()).unwrap(), expected);
        assert_eq!(seat_statuses(body.as_bytes(), 3).unwrap(), expected);

        // An escape in an id, a seat without a status, a count short of the expected: parsed.
        let escaped = body.replace(r#""resource_id":"r2""#, r#""resource_id":"r\u0032""#);
        assert_eq!(scan_seat_statuses(escaped.as_bytes()), None);
        assert_eq!(seat_statuses(escaped.as_bytes(), 4).unwrap(), expected, "parsed: r\\u0032 is r2");
        let no_status = r#"{"seats":[{"resource_id":"r1"},{"resource_id":"r2","status":"held"}]}"#;
        assert_eq!(scan_seat_statuses(no_status.as_bytes()), None);
        assert_eq!(seat_statuses(no_status.as_bytes(), 2), None, "not a seat map either");
        assert_eq!(seat_statuses(body.as_bytes(), 4).unwrap(), expected, "parsed: the same seats");
        assert_eq!(scan_seat_statuses(b"{}"), None);
    }

    #[test]
    fn a_created_id_is_read_from_the_start_or_parsed() {
        let id = "0192f0c4-0000-7000-8000-000000000001";
        let first = format!(r#"{{"id":"{id}","status":"held"}}"#);
        assert_eq!(created_id(first.as_bytes()).as_deref(), Some(id));
        let later = format!(r#"{{"status":"held", "id":"{id}"}}"#);
        assert_eq!(created_id(later.as_bytes()).as_deref(), Some(id));
        assert_eq!(created_id(br#"{"id":"a\"b","x":1}"#).as_deref(), Some("a\"b"));
        assert_eq!(created_id(br#"{"id":"abc"#), None, "cut short: not acknowledged");
        assert_eq!(created_id(b"not json"), None);
    }
}
