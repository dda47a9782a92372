//! Test helper shared by the end-to-end tests of the `allot` binary (`durability`, `multinode`,
//! the operator commands'): real `allot serve` processes killed on drop, one-shot commands
//! ([`run_command`]), HTTP helpers, the demo catalogue, and the random contended holds of cinema
//! seats and hotel nights with what the clients were acknowledged.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jiff::civil::Date;
use jiff::{Timestamp, ToSpan};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How long a node may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Seats of each show that most seat holds fight over.
pub const HOT_SEATS: usize = 12;

// ---------------------------------------------------------------------------------------------
// One `allot serve` process, killed on drop whatever happens.

pub struct Node {
    pub name: String,
    child: Option<Child>,
    /// `http://ADDR`, as the process printed it.
    pub base: String,
    stderr_path: PathBuf,
    /// How many bytes of the end of its stderr `stderr_tail` shows.
    tail_bytes: usize,
}

impl Node {
    /// Starts `allot serve` on a loopback port over `db_url` (with `--demo` when `demo`), its
    /// stderr written to `stderr_path`, and waits up to `STARTUP_TIMEOUT` for it to print
    /// "allot listening on http://ADDR". Blocks the calling thread while it waits.
    pub fn start(name: &str, db_url: &str, demo: bool, stderr_path: PathBuf, tail_bytes: usize) -> Node {
        let demo: &[&str] = if demo { &["--demo"] } else { &[] };
        Node::start_with(name, db_url, demo, stderr_path, tail_bytes)
    }

    /// [`Node::start`] with `flags` added to `allot serve`'s.
    pub fn start_with(name: &str, db_url: &str, flags: &[&str], stderr_path: PathBuf, tail_bytes: usize) -> Node {
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_allot"));
        // Load from one address: the documented switch for load tests.
        command.args(["serve", "--listen", "127.0.0.1:0", "--database-url", db_url, "--rate-limits", "off"]);
        command.args(flags);
        command.env("ALLOT_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        for var in [
            "ALLOT_LISTEN",
            "ALLOT_DATABASE_URL",
            "ALLOT_DEMO",
            "ALLOT_REDIS_URL",
            "ALLOT_NATS_URL",
            "ALLOT_CONFIG",
            "ALLOT_RATE_LIMITS",
            "ALLOT_RATE_LIMIT_SCALE",
            "ALLOT_PAYMENT_WEBHOOK_SECRET",
        ] {
            command.env_remove(var);
        }
        let mut child = command.spawn().expect("spawn allot");
        let stdout = child.stdout.take().unwrap();
        // The guard exists before we wait, so a timeout or panic below still kills the child.
        let mut node = Node { name: name.to_owned(), child: Some(child), base: String::new(), stderr_path, tail_bytes };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Drains stdout until the process dies so it never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("allot listening on ") {
                        node.base = rest.trim().to_owned();
                        return node;
                    }
                    seen.push(line);
                }
                Err(e) => panic!(
                    "{name} did not print its listening line ({e:?}); stdout so far: {seen:?}; stderr: {}",
                    node.stderr_tail()
                ),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let mut start = text.len().saturating_sub(self.tail_bytes);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }

    /// True while the process has not exited by itself.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (std's `Child::kill`) and reap; returns the exit status.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `Node::start` off the async workers (start-up blocks on the child's stdout).
pub async fn start_node(name: &str, db_url: &str, demo: bool, stderr_path: PathBuf, tail_bytes: usize) -> Node {
    let (name, db_url) = (name.to_owned(), db_url.to_owned());
    tokio::task::spawn_blocking(move || Node::start(&name, &db_url, demo, stderr_path, tail_bytes))
        .await
        .expect("node start-up")
}

/// Nanoseconds since the Unix epoch: a unique name, and a seed.
/// Runs `allot ARGS --database-url DB_URL` to its end: its exit status and standard output.
pub fn run_command(args: &[&str], db_url: &str) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(args)
        .args(["--database-url", db_url])
        .env("ALLOT_LOG", "warn")
        .env_remove("ALLOT_DATABASE_URL")
        .output()
        .unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// A new directory `allot-{label}-{pid}-{nanos}` under the temporary directory.
pub fn scratch_dir(label: &str, nanos: u128) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("allot-{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers.

/// A status and JSON body, or no answer at all.
pub type Answer = Result<(StatusCode, Value), reqwest::Error>;

/// A client for many concurrent connections; every request gives up after `timeout`, and
/// connecting after `connect_timeout` when one is given.
pub fn http_client(timeout: Duration, connect_timeout: Option<Duration>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(256).timeout(timeout);
    if let Some(connect_timeout) = connect_timeout {
        builder = builder.connect_timeout(connect_timeout);
    }
    builder.build().unwrap()
}

pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let response = req.send().await?;
    let status = response.status();
    let bytes = response.bytes().await?;
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Ok((status, body))
}

/// `send`, counted in `in_flight` until it is answered (or fails).
pub async fn send_counted(in_flight: &AtomicUsize, req: reqwest::RequestBuilder) -> Answer {
    in_flight.fetch_add(1, Ordering::SeqCst);
    let result = send(req).await;
    in_flight.fetch_sub(1, Ordering::SeqCst);
    result
}

pub async fn get(client: &reqwest::Client, n: &Node, token: Option<&str>, path: &str) -> (StatusCode, Value) {
    let mut req = client.get(n.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    send(req).await.unwrap_or_else(|e| panic!("GET {path} on {}: {e}", n.name))
}

pub async fn post(
    client: &reqwest::Client,
    n: &Node,
    token: Option<&str>,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = client.post(n.url(path)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    send(req).await.unwrap_or_else(|e| panic!("POST {path} on {}: {e}", n.name))
}

/// Every item of a paginated list.
pub async fn list_all(client: &reqwest::Client, n: &Node, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let page_path = match &cursor {
            Some(c) => format!("{path}{sep}limit=100&cursor={c}"),
            None => format!("{path}{sep}limit=100"),
        };
        let (status, body) = get(client, n, None, &page_path).await;
        assert_eq!(status, StatusCode::OK, "GET {page_path}: {body}");
        out.extend(body["data"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

/// Registers `email` on `n`; returns the new user's id.
pub async fn register(client: &reqwest::Client, n: &Node, email: &str, password: &str, name: &str) -> String {
    let (status, body) =
        post(client, n, None, "/auth/register", json!({"email": email, "password": password, "name": name})).await;
    assert_eq!(status, StatusCode::CREATED, "register {email} on {}: {body}", n.name);
    str_of(&body, "id")
}

/// Logs in on `n`; returns the access token.
pub async fn login(client: &reqwest::Client, n: &Node, email: &str, password: &str) -> String {
    let (status, body) = post(client, n, None, "/auth/login", json!({"email": email, "password": password})).await;
    assert_eq!(status, StatusCode::OK, "login {email} on {}: {body}", n.name);
    body["access_token"].as_str().unwrap().to_owned()
}

pub fn str_of(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_else(|| panic!("{field} missing in {v}")).to_owned()
}

// ---------------------------------------------------------------------------------------------
// The demo catalogue.

#[derive(Debug, Clone)]
pub struct Show {
    pub id: String,
    pub seats: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RoomType {
    pub id: String,
    pub name: String,
    /// Capacity × (100 + overbooking %) / 100.
    pub effective: u64,
}

/// The demo as a node serves it.
pub struct Demo {
    pub venues: Vec<Value>,
    pub cinema_id: String,
    pub hotel_id: String,
    /// Every show of the demo cinema.
    pub events: Vec<Value>,
    /// The cinema's first shows that start more than two hours from now.
    pub shows: Vec<Show>,
    /// The demo hotel's room types.
    pub rooms: Vec<RoomType>,
}

/// Reads the demo from `node`: its six venues, the cinema's next `shows_used` shows (each with
/// at least `HOT_SEATS` seats) and the hotel's room types (Standard: 20 rooms + 5 % overbooking).
pub async fn demo_catalogue(client: &reqwest::Client, node: &Node, shows_used: usize) -> Demo {
    let venues = list_all(client, node, "/venues").await;
    assert_eq!(venues.len(), 6, "demo venues: {venues:?}");
    let cinema = venues.iter().find(|v| v["category"] == "cinema").expect("demo cinema");
    let hotel = venues.iter().find(|v| v["category"] == "hotel").expect("demo hotel");
    let (cinema_id, hotel_id) = (str_of(cinema, "id"), str_of(hotel, "id"));
    let events = list_all(client, node, &format!("/venues/{cinema_id}/events")).await;
    let soon = Timestamp::now().checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
    let mut upcoming: Vec<(Timestamp, Show)> = events
        .iter()
        .filter_map(|e| {
            let start: Timestamp = e["start"].as_str()?.parse().ok()?;
            let seats = e["seat_ids"].as_array()?.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect();
            (start > soon).then(|| (start, Show { id: str_of(e, "id"), seats }))
        })
        .collect();
    upcoming.sort_by_key(|(t, _)| *t);
    let shows: Vec<Show> = upcoming.into_iter().take(shows_used).map(|(_, s)| s).collect();
    assert_eq!(shows.len(), shows_used, "upcoming demo shows");
    assert!(shows.iter().all(|s| s.seats.len() >= HOT_SEATS), "shows have seats");
    let rooms: Vec<RoomType> = list_all(client, node, &format!("/venues/{hotel_id}/resources"))
        .await
        .iter()
        .filter(|r| r["time_model"]["kind"] == "nights")
        .map(|r| {
            let capacity = r["capacity"].as_u64().unwrap();
            let over = r["rules"]["overbooking_percent"].as_u64().unwrap_or(0);
            RoomType { id: str_of(r, "id"), name: str_of(r, "name"), effective: capacity * (100 + over) / 100 }
        })
        .collect();
    let standard = rooms.iter().find(|r| r.name.starts_with("Standard")).expect("Standard room type");
    assert_eq!(standard.effective, 21, "Standard: 20 rooms + 5 % overbooking");
    Demo { venues, cinema_id, hotel_id, events, shows, rooms }
}

// ---------------------------------------------------------------------------------------------
// The contended load: random holds of seats and nights.

/// A small deterministic PRNG (xorshift64*), one per worker.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Worker `w`'s seed, varied by `nanos` from run to run.
pub fn worker_seed(w: usize, nanos: u64) -> u64 {
    0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(w as u64 + 1) ^ nanos
}

#[derive(Debug, Clone)]
pub enum Item {
    Seat { event: String, seat: String },
    Stay { resource: String, check_in: Date, nights: i64, quantity: u64 },
}

/// What the random holds are made of, and how they lean.
pub struct Mix {
    pub shows: Vec<Show>,
    pub rooms: Vec<RoomType>,
    /// Stays check in on this night or one of the three after it.
    pub first_night: Date,
    /// Out of ten seats drawn, how many are drawn from each show's `HOT_SEATS`.
    pub hot_in_10: usize,
    /// Out of ten stays, how many are of the Standard type (the overbooked one).
    pub standard_in_10: usize,
}

impl Mix {
    /// Stays from 30 days from today.
    pub fn new(shows: Vec<Show>, rooms: Vec<RoomType>, hot_in_10: usize, standard_in_10: usize) -> Mix {
        let first_night = jiff::Zoned::now().date().checked_add(30.days()).unwrap();
        Mix { shows, rooms, first_night, hot_in_10, standard_in_10 }
    }

    /// Seven times in ten one to three seats of one show, else one stay of one to three nights
    /// of one or two rooms.
    pub fn random_items(&self, rng: &mut Rng) -> Vec<Item> {
        if rng.below(10) < 7 {
            let show = &self.shows[rng.below(self.shows.len())];
            let n = 1 + rng.below(3);
            let mut seats: Vec<String> = Vec::new();
            while seats.len() < n {
                let pool =
                    if rng.below(10) < self.hot_in_10 { HOT_SEATS.min(show.seats.len()) } else { show.seats.len() };
                let seat = show.seats[rng.below(pool)].clone();
                if !seats.contains(&seat) {
                    seats.push(seat);
                }
            }
            seats.into_iter().map(|seat| Item::Seat { event: show.id.clone(), seat }).collect()
        } else {
            let pick = rng.below(10);
            let room = if pick < self.standard_in_10 {
                self.rooms.iter().find(|r| r.name.starts_with("Standard")).unwrap_or(&self.rooms[0])
            } else {
                &self.rooms[pick % self.rooms.len()]
            };
            let offset = rng.below(4) as i64;
            let nights = 1 + rng.below(3) as i64;
            let quantity = 1 + rng.below(2) as u64;
            vec![Item::Stay {
                resource: room.id.clone(),
                check_in: self.first_night.checked_add(offset.days()).unwrap(),
                nights,
                quantity,
            }]
        }
    }
}

pub fn item_json(item: &Item) -> Value {
    match item {
        Item::Seat { event, seat } => json!({"resource_id": seat, "event_id": event}),
        Item::Stay { resource, check_in, nights, quantity } => json!({
            "resource_id": resource, "check_in": check_in.to_string(),
            "check_out": check_in.checked_add(nights.days()).unwrap().to_string(), "quantity": quantity,
        }),
    }
}

/// The body of a hold of `items`.
pub fn hold_body(items: &[Item]) -> Value {
    json!({"items": items.iter().map(item_json).collect::<Vec<_>>()})
}

/// Draws a hold from `mix` and sends it to `hold_url` as `token`, counted in `in_flight`: its
/// items and the answer.
pub async fn send_random_hold(
    mix: &Mix,
    rng: &mut Rng,
    client: &reqwest::Client,
    hold_url: &str,
    token: &str,
    in_flight: &AtomicUsize,
) -> (Vec<Item>, Answer) {
    let items = mix.random_items(rng);
    let hold = client.post(hold_url).bearer_auth(token).json(&hold_body(&items));
    let answer = send_counted(in_flight, hold).await;
    (items, answer)
}

/// The id of a booking answered 201 to a hold, which must be held.
pub fn held_id(booking: &Value) -> String {
    let Some(id) = booking["id"].as_str().map(str::to_owned) else {
        panic!("201 without an id: {booking}");
    };
    assert_eq!(booking["status"], "held", "{booking}");
    id
}

/// The body of a confirm paid with the test card.
pub fn payment() -> Value {
    json!({"payment": {"method": "card", "token": "tok_visa"}})
}

pub fn nights_of(item: &Item) -> Vec<(String, Date, u64)> {
    match item {
        Item::Seat { .. } => vec![],
        Item::Stay { resource, check_in, nights, quantity } => {
            (0..*nights).map(|k| (resource.clone(), check_in.checked_add(k.days()).unwrap(), *quantity)).collect()
        }
    }
}

/// What the clients were acknowledged (a 201 to a hold).
pub struct Acks {
    /// `(event, seat)` → the holds it was acknowledged to.
    pub seats: HashMap<(String, String), Vec<String>>,
    /// `(room type, night)` → rooms acknowledged.
    pub nights: BTreeMap<(String, Date), u64>,
}

impl Acks {
    /// From the acknowledged holds, as `(id, items)`.
    pub fn of<'a>(holds: impl IntoIterator<Item = (&'a str, &'a [Item])>) -> Acks {
        let mut seats: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut nights: BTreeMap<(String, Date), u64> = BTreeMap::new();
        for (id, items) in holds {
            for item in items {
                if let Item::Seat { event, seat } = item {
                    seats.entry((event.clone(), seat.clone())).or_default().push(id.to_owned());
                }
                for (resource, night, q) in nights_of(item) {
                    *nights.entry((resource, night)).or_default() += q;
                }
            }
        }
        Acks { seats, nights }
    }

    /// No seat of a show acknowledged to two holds (none were cancelled), no night acknowledged
    /// beyond the room type's effective capacity: the failures.
    pub fn oversold(&self, rooms: &[RoomType]) -> Vec<String> {
        let mut failures = Vec::new();
        for ((event, seat), ids) in &self.seats {
            if ids.len() > 1 {
                failures
                    .push(format!("seat {seat} of event {event} acknowledged (201) to {} holds: {ids:?}", ids.len()));
            }
        }
        for ((resource, night), used) in &self.nights {
            let room = rooms.iter().find(|r| &r.id == resource).unwrap();
            if *used > room.effective {
                failures.push(format!(
                    "{} night {night}: {used} rooms acknowledged, effective capacity {}",
                    room.name, room.effective
                ));
            }
        }
        failures
    }
}
