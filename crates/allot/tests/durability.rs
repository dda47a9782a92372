//! Durability under `kill -9` (SPEC I1, I5): the real `allot` binary serves the demo over a
//! fresh SQLite file while many clients hold (with contention) cinema seats and hotel nights and
//! confirm some of them; the process is SIGKILLed mid-load and started again on the same file.
//! Every hold and confirm that was acknowledged with a 2xx must still be there, nothing may be
//! sold twice, and starting again with `--demo` must not duplicate the demo.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use allot_store::SqliteStore;
use futures::StreamExt;
use jiff::ToSpan;
use jiff::civil::Date;
use reqwest::StatusCode;
use serde_json::{Value, json};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const CUSTOMERS: usize = 20;
const WORKERS_PER_CUSTOMER: usize = 4;
/// Kill once this many hold/confirm responses have been received (and at least `KILL_AFTER_MIN`
/// has passed), or at `KILL_AFTER_MAX` whatever the count.
const KILL_AT_ACKS: usize = 400;
const KILL_AFTER_MIN: Duration = Duration::from_millis(1500);
const KILL_AFTER_MAX: Duration = Duration::from_secs(15);
const EVENTS_USED: usize = 6;
/// Seats every event's "hot" set is drawn from: most holds fight over these.
const HOT_SEATS: usize = 12;
const PASSWORD: &str = "password-123";
const DEMO_PASSWORD: &str = "demo-password";

// ---------------------------------------------------------------------------------------------
// The server process, killed on drop whatever happens.

struct Server {
    child: Option<Child>,
    base: String,
    stderr_path: PathBuf,
}

impl Server {
    fn start(db_url: &str, stderr_path: PathBuf) -> Server {
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_allot"));
        command
            .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--database-url", db_url])
            .env("ALLOT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for var in
            ["ALLOT_LISTEN", "ALLOT_DATABASE_URL", "ALLOT_DEMO", "ALLOT_REDIS_URL", "ALLOT_NATS_URL", "ALLOT_CONFIG"]
        {
            command.env_remove(var);
        }
        let mut child = command.spawn().expect("spawn allot");
        let stdout = child.stdout.take().unwrap();
        // The guard exists before we wait, so a timeout or panic below still kills the child.
        let mut server = Server { child: Some(child), base: String::new(), stderr_path };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout until the process dies so it never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Receiver gone: keep draining silently.
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("allot listening on ") {
                        server.base = rest.trim().to_owned();
                        break;
                    }
                    seen.push(line);
                }
                Err(e) => panic!(
                    "allot did not print its listening line ({e:?}); stdout so far: {seen:?}; stderr: {}",
                    server.stderr_tail()
                ),
            }
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    /// True while the process has not exited by itself.
    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (std's `Child::kill`) and reap; returns the exit status.
    fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers.

async fn send(req: reqwest::RequestBuilder) -> Result<(StatusCode, Value), reqwest::Error> {
    let response = req.send().await?;
    let status = response.status();
    let bytes = response.bytes().await?;
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Ok((status, body))
}

async fn get(client: &reqwest::Client, s: &Server, token: Option<&str>, path: &str) -> (StatusCode, Value) {
    let mut req = client.get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    send(req).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn post(
    client: &reqwest::Client,
    s: &Server,
    token: Option<&str>,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = client.post(s.url(path)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    send(req).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Every item of a paginated list.
async fn list_all(client: &reqwest::Client, s: &Server, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let page_path = match &cursor {
            Some(c) => format!("{path}{sep}limit=100&cursor={c}"),
            None => format!("{path}{sep}limit=100"),
        };
        let (status, body) = get(client, s, None, &page_path).await;
        assert_eq!(status, StatusCode::OK, "GET {page_path}: {body}");
        out.extend(body["data"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

async fn login(client: &reqwest::Client, s: &Server, email: &str, password: &str) -> String {
    let (status, body) = post(client, s, None, "/auth/login", json!({"email": email, "password": password})).await;
    assert_eq!(status, StatusCode::OK, "login {email}: {body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn str_of(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_else(|| panic!("{field} missing in {v}")).to_owned()
}

// ---------------------------------------------------------------------------------------------
// The load.

/// A small deterministic PRNG (xorshift64*), one per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone)]
struct Show {
    id: String,
    seats: Vec<String>,
}

#[derive(Debug, Clone)]
struct RoomType {
    id: String,
    name: String,
    effective: u64,
}

#[derive(Debug, Clone)]
enum Item {
    Seat { event: String, seat: String },
    Stay { resource: String, check_in: Date, nights: i64, quantity: u64 },
}

/// A hold answered 201 before the kill (and whether its confirm was answered 200).
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    customer: usize,
    items: Vec<Item>,
    confirmed: bool,
}

struct Load {
    shows: Vec<Show>,
    rooms: Vec<RoomType>,
    first_night: Date,
    stop: AtomicBool,
    /// Responses received (any status) to holds and confirms.
    acked: AtomicUsize,
    in_flight: AtomicUsize,
    transport_errors: AtomicUsize,
    statuses: std::sync::Mutex<BTreeMap<String, usize>>,
}

impl Load {
    fn count_status(&self, what: &str, status: StatusCode) {
        *self.statuses.lock().unwrap().entry(format!("{what} {}", status.as_u16())).or_default() += 1;
    }
}

fn random_items(load: &Load, rng: &mut Rng) -> Vec<Item> {
    if rng.below(10) < 7 {
        let show = &load.shows[rng.below(load.shows.len())];
        let n = 1 + rng.below(3);
        let mut seats: Vec<String> = Vec::new();
        while seats.len() < n {
            let pool = if rng.below(10) < 6 { HOT_SEATS.min(show.seats.len()) } else { show.seats.len() };
            let seat = show.seats[rng.below(pool)].clone();
            if !seats.contains(&seat) {
                seats.push(seat);
            }
        }
        seats.into_iter().map(|seat| Item::Seat { event: show.id.clone(), seat }).collect()
    } else {
        // Mostly the Standard type (the overbooked one), some Deluxe and Suite.
        let pick = rng.below(10);
        let room = if pick < 7 {
            load.rooms.iter().find(|r| r.name.starts_with("Standard")).unwrap_or(&load.rooms[0])
        } else {
            &load.rooms[pick % load.rooms.len()]
        };
        let offset = rng.below(4) as i64;
        let nights = 1 + rng.below(3) as i64;
        let quantity = 1 + rng.below(2) as u64;
        vec![Item::Stay {
            resource: room.id.clone(),
            check_in: load.first_night.checked_add(offset.days()).unwrap(),
            nights,
            quantity,
        }]
    }
}

fn item_json(item: &Item) -> Value {
    match item {
        Item::Seat { event, seat } => json!({"resource_id": seat, "event_id": event}),
        Item::Stay { resource, check_in, nights, quantity } => json!({
            "resource_id": resource, "check_in": check_in.to_string(),
            "check_out": check_in.checked_add(nights.days()).unwrap().to_string(), "quantity": quantity,
        }),
    }
}

async fn worker(
    load: Arc<Load>,
    client: reqwest::Client,
    hold_url: String,
    base: String,
    token: String,
    customer: usize,
    seed: u64,
) -> Vec<Acked> {
    let mut rng = Rng(seed | 1);
    let mut acked = Vec::new();
    while !load.stop.load(Ordering::SeqCst) {
        let items = random_items(&load, &mut rng);
        let body = json!({"items": items.iter().map(item_json).collect::<Vec<_>>()});
        load.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = send(client.post(&hold_url).bearer_auth(&token).json(&body)).await;
        load.in_flight.fetch_sub(1, Ordering::SeqCst);
        let (status, booking) = match result {
            Ok(r) => r,
            Err(_) => {
                load.transport_errors.fetch_add(1, Ordering::SeqCst);
                continue;
            }
        };
        load.acked.fetch_add(1, Ordering::SeqCst);
        load.count_status("hold", status);
        if status != StatusCode::CREATED {
            continue;
        }
        let Some(id) = booking["id"].as_str().map(str::to_owned) else {
            panic!("201 without an id: {booking}");
        };
        assert_eq!(booking["status"], "held", "{booking}");
        acked.push(Acked { id: id.clone(), customer, items, confirmed: false });
        if rng.below(2) == 0 {
            let confirm = json!({"payment": {"method": "card", "token": "tok_visa"}});
            load.in_flight.fetch_add(1, Ordering::SeqCst);
            let result =
                send(client.post(format!("{base}/api/v1/bookings/{id}/confirm")).bearer_auth(&token).json(&confirm))
                    .await;
            load.in_flight.fetch_sub(1, Ordering::SeqCst);
            match result {
                Ok((status, body)) => {
                    load.acked.fetch_add(1, Ordering::SeqCst);
                    load.count_status("confirm", status);
                    if status.is_success() {
                        assert_eq!(body["status"], "confirmed", "{body}");
                        acked.last_mut().unwrap().confirmed = true;
                    }
                }
                Err(_) => {
                    load.transport_errors.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    acked
}

fn nights_of(item: &Item) -> Vec<(String, Date, u64)> {
    match item {
        Item::Seat { .. } => vec![],
        Item::Stay { resource, check_in, nights, quantity } => {
            (0..*nights).map(|k| (resource.clone(), check_in.checked_add(k.days()).unwrap(), *quantity)).collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_without_oversell() {
    let started = Instant::now();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("allot-durability-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(256).timeout(Duration::from_secs(30)).build().unwrap();

    // 1. First start.
    let mut first = Server::start(&db_url, dir.join("stderr-1.log"));
    println!("first start: {} after {:?}", first.base, started.elapsed());

    // 2. Catalogue and customers.
    let venues = list_all(&client, &first, "/venues").await;
    assert_eq!(venues.len(), 6, "demo venues: {venues:?}");
    let venue_ids: HashSet<String> = venues.iter().map(|v| str_of(v, "id")).collect();
    let cinema = venues.iter().find(|v| v["category"] == "cinema").expect("demo cinema");
    let hotel = venues.iter().find(|v| v["category"] == "hotel").expect("demo hotel");
    let cinema_id = str_of(cinema, "id");
    let hotel_id = str_of(hotel, "id");

    let events = list_all(&client, &first, &format!("/venues/{cinema_id}/events")).await;
    let cinema_resources = list_all(&client, &first, &format!("/venues/{cinema_id}/resources")).await.len();
    let soon = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
    let mut upcoming: Vec<(jiff::Timestamp, Show)> = events
        .iter()
        .filter_map(|e| {
            let start: jiff::Timestamp = e["start"].as_str()?.parse().ok()?;
            let seats = e["seat_ids"].as_array()?.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect();
            (start > soon).then(|| (start, Show { id: str_of(e, "id"), seats }))
        })
        .collect();
    upcoming.sort_by_key(|(t, _)| *t);
    let shows: Vec<Show> = upcoming.into_iter().take(EVENTS_USED).map(|(_, s)| s).collect();
    assert_eq!(shows.len(), EVENTS_USED, "upcoming demo shows");
    // The seat map agrees with the event's seat list.
    let (status, map) = get(&client, &first, None, &format!("/events/{}/seats", shows[0].id)).await;
    assert_eq!(status, StatusCode::OK, "{map}");
    assert_eq!(map["seats"].as_array().unwrap().len(), shows[0].seats.len());

    let rooms: Vec<RoomType> = list_all(&client, &first, &format!("/venues/{hotel_id}/resources"))
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
    println!(
        "catalogue: {} shows used, room types {:?}",
        shows.len(),
        rooms.iter().map(|r| (&r.name, r.effective)).collect::<Vec<_>>()
    );

    let emails: Vec<String> = (0..CUSTOMERS).map(|i| format!("durable-{i}@test.allot")).collect();
    let registered = futures::future::join_all(emails.iter().map(|email| {
        let (client, first) = (&client, &first);
        async move {
            let (status, body) = post(
                client,
                first,
                None,
                "/auth/register",
                json!({"email": email, "password": PASSWORD, "name": "Durable"}),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "register {email}: {body}");
            login(client, first, email, PASSWORD).await
        }
    }))
    .await;
    let mut accounts: Vec<(String, &str)> = emails.iter().map(|e| (e.clone(), PASSWORD)).collect();
    accounts.push(("customer@demo.allot".to_owned(), DEMO_PASSWORD));
    let mut tokens = registered;
    tokens.push(login(&client, &first, "customer@demo.allot", DEMO_PASSWORD).await);
    println!("{} customers ready after {:?}", tokens.len(), started.elapsed());

    // 3. Load, then 4. kill -9 in the middle of it.
    let today = jiff::Zoned::now().date();
    let load = Arc::new(Load {
        shows: shows.clone(),
        rooms: rooms.clone(),
        first_night: today.checked_add(30.days()).unwrap(),
        stop: AtomicBool::new(false),
        acked: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        transport_errors: AtomicUsize::new(0),
        statuses: std::sync::Mutex::new(BTreeMap::new()),
    });
    let mut workers = Vec::new();
    for w in 0..tokens.len() * WORKERS_PER_CUSTOMER {
        let customer = w % tokens.len();
        workers.push(tokio::spawn(worker(
            load.clone(),
            client.clone(),
            first.url("/bookings"),
            first.base.clone(),
            tokens[customer].clone(),
            customer,
            0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(w as u64 + 1) ^ nanos as u64,
        )));
    }
    let load_started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let elapsed = load_started.elapsed();
        assert!(first.running(), "allot exited by itself under load; stderr: {}", first.stderr_tail());
        if (load.acked.load(Ordering::SeqCst) >= KILL_AT_ACKS && elapsed >= KILL_AFTER_MIN) || elapsed >= KILL_AFTER_MAX
        {
            break;
        }
    }
    let in_flight_at_kill = load.in_flight.load(Ordering::SeqCst);
    let acked_at_kill = load.acked.load(Ordering::SeqCst);
    let load_time = load_started.elapsed();
    let exit = first.kill().expect("first server was running");
    load.stop.store(true, Ordering::SeqCst);
    assert_eq!(exit.signal(), Some(9), "the first server died of SIGKILL: {exit:?}");
    let mut acked: Vec<Acked> = Vec::new();
    for w in workers {
        acked.extend(w.await.expect("worker panicked"));
    }
    let acked_total = load.acked.load(Ordering::SeqCst);
    let confirmed_acks = acked.iter().filter(|a| a.confirmed).count();
    println!(
        "SIGKILL after {load_time:?} of load: {acked_at_kill} hold/confirm responses received before the kill \
         ({acked_total} counted in all), ~{in_flight_at_kill} requests in flight, {} requests failed (in flight at the kill or sent just after it); \
         {} holds acknowledged 201, {confirmed_acks} confirms acknowledged 200; statuses {:?}",
        load.transport_errors.load(Ordering::SeqCst),
        acked.len(),
        load.statuses.lock().unwrap()
    );
    assert!(acked_total >= 100, "too little load before the kill to mean anything: {acked_total}");
    assert!(!acked.is_empty(), "no hold was acknowledged");
    assert!(in_flight_at_kill > 0, "nothing was in flight when the server was killed");

    // Client-side view: no seat and no night acknowledged beyond capacity.
    let mut failures: Vec<String> = Vec::new();
    let mut seat_acks: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut night_acks: BTreeMap<(String, Date), u64> = BTreeMap::new();
    for a in &acked {
        for item in &a.items {
            if let Item::Seat { event, seat } = item {
                seat_acks.entry((event.clone(), seat.clone())).or_default().push(a.id.clone());
            }
            for (resource, night, q) in nights_of(item) {
                *night_acks.entry((resource, night)).or_default() += q;
            }
        }
    }
    for ((event, seat), ids) in &seat_acks {
        if ids.len() > 1 {
            failures.push(format!("seat {seat} of event {event} acknowledged to {} holds: {ids:?}", ids.len()));
        }
    }
    for ((resource, night), used) in &night_acks {
        let room = rooms.iter().find(|r| &r.id == resource).unwrap();
        if *used > room.effective {
            failures.push(format!(
                "{} night {night}: {used} rooms acknowledged, effective capacity {}",
                room.name, room.effective
            ));
        }
    }

    // 5. Restart on the same file, again with --demo.
    let restart_at = Instant::now();
    let second = Server::start(&db_url, dir.join("stderr-2.log"));
    println!("restarted in {:?}: {}", restart_at.elapsed(), second.base);

    let venues_after = list_all(&client, &second, "/venues").await;
    assert_eq!(venues_after.len(), 6, "demo duplicated or lost on restart: {venues_after:?}");
    let ids_after: HashSet<String> = venues_after.iter().map(|v| str_of(v, "id")).collect();
    assert_eq!(ids_after, venue_ids, "the same demo venues after restart");
    assert_eq!(
        list_all(&client, &second, &format!("/venues/{cinema_id}/events")).await.len(),
        events.len(),
        "cinema shows"
    );
    assert_eq!(
        list_all(&client, &second, &format!("/venues/{cinema_id}/resources")).await.len(),
        cinema_resources,
        "cinema seats"
    );
    assert_eq!(
        list_all(&client, &second, &format!("/venues/{hotel_id}/resources")).await.len(),
        rooms.len(),
        "hotel room types"
    );

    let (old_token_status, _) = get(&client, &second, Some(&tokens[0]), "/me").await;
    println!("an access token issued before the kill answers GET /me after restart with {old_token_status}");
    let tokens_after: Vec<String> =
        futures::future::join_all(accounts.iter().map(|(email, password)| login(&client, &second, email, password)))
            .await;

    // Every acknowledged hold is there, as its owner sees it; acknowledged confirms are confirmed.
    let fetched: Vec<(usize, StatusCode, Value)> = futures::stream::iter(acked.iter().enumerate())
        .map(|(i, a)| {
            let (client, second, token) = (&client, &second, &tokens_after[a.customer]);
            async move {
                let (status, body) = get(client, second, Some(token), &format!("/bookings/{}", a.id)).await;
                (i, status, body)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut status_after: HashMap<String, String> = HashMap::new();
    let mut confirmed_unacked = 0;
    for (i, status, body) in &fetched {
        let a = &acked[*i];
        if *status != StatusCode::OK {
            failures.push(format!("acknowledged hold {} lost: GET answered {status} {body}", a.id));
            continue;
        }
        let s = body["status"].as_str().unwrap_or("").to_owned();
        if a.confirmed && s != "confirmed" {
            failures.push(format!("acknowledged confirm of {} lost: status {s}", a.id));
        } else if !a.confirmed && s != "held" && s != "confirmed" {
            failures.push(format!("acknowledged hold {} is {s}, expected held or confirmed", a.id));
        }
        if !a.confirmed && s == "confirmed" {
            confirmed_unacked += 1;
        }
        let items = body["items"].as_array().map_or(0, Vec::len);
        if items != a.items.len() {
            failures.push(format!("booking {} has {items} items, {} were acknowledged", a.id, a.items.len()));
        }
        status_after.insert(a.id.clone(), s);
    }
    println!(
        "after restart: {} acknowledged holds fetched, {confirmed_unacked} confirmed by a confirm whose answer was lost in the kill",
        fetched.len()
    );

    // Seat maps show every acknowledged seat taken, in the state of its booking.
    for show in &shows {
        let (status, map) = get(&client, &second, None, &format!("/events/{}/seats", show.id)).await;
        assert_eq!(status, StatusCode::OK, "{map}");
        let seat_status: HashMap<String, String> =
            map["seats"].as_array().unwrap().iter().map(|s| (str_of(s, "resource_id"), str_of(s, "status"))).collect();
        for ((event, seat), ids) in &seat_acks {
            if event != &show.id {
                continue;
            }
            let expected = match status_after.get(&ids[0]).map(String::as_str) {
                Some("confirmed") => "booked",
                _ => "held",
            };
            let got = seat_status.get(seat).map_or("missing", String::as_str);
            if got != expected {
                failures.push(format!(
                    "seat {seat} of event {event} (booking {}) shows {got}, expected {expected}",
                    ids[0]
                ));
            }
        }
    }

    // Hotel availability: never more left than capacity minus what was acknowledged.
    let last_night = load.first_night.checked_add(8.days()).unwrap();
    for room in &rooms {
        let (status, avail) = get(
            &client,
            &second,
            None,
            &format!("/resources/{}/availability?from={}&to={last_night}", room.id, load.first_night),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{avail}");
        for w in avail["windows"].as_array().unwrap() {
            let Some(night) = w["date"].as_str().and_then(|d| d.parse::<Date>().ok()) else { continue };
            let remaining = w["remaining"].as_u64().unwrap();
            let used = night_acks.get(&(room.id.clone(), night)).copied().unwrap_or(0);
            if remaining + used > room.effective {
                failures.push(format!(
                    "{} night {night}: {remaining} left although {used} of {} were acknowledged",
                    room.name, room.effective
                ));
            }
        }
    }

    let mut second = second;
    assert!(second.running(), "second server exited; stderr: {}", second.stderr_tail());
    second.kill();

    // The database itself, once nothing serves it: live claims never exceed capacity, and
    // every acknowledged booking still has its claims.
    let store = SqliteStore::open(&db_url).await.expect("open the database after the run");
    let claims = store.count("claims", "1").await.unwrap();
    let resources_without_capacity = store.count("resources", "json_extract(doc, '$.capacity') IS NULL").await.unwrap();
    assert_eq!(resources_without_capacity, 0, "resources.doc carries capacity");
    let oversold = store
        .count(
            "(SELECT a.item_id,
                 (SELECT SUM(b.quantity) FROM claims b
                   WHERE b.resource_id = a.resource_id AND b.block_start <= a.block_start AND b.block_end > a.block_start
                     AND (b.hold_expires_at IS NULL OR b.hold_expires_at > unixepoch())) AS used,
                 (SELECT CAST(json_extract(r.doc, '$.capacity') AS INTEGER)
                         * (100 + COALESCE(json_extract(r.doc, '$.rules.overbooking_percent'), 0)) / 100
                    FROM resources r WHERE r.id = a.resource_id) AS cap
               FROM claims a
              WHERE a.hold_expires_at IS NULL OR a.hold_expires_at > unixepoch()) AS t",
            "cap IS NULL OR used > cap",
        )
        .await
        .unwrap();
    if oversold > 0 {
        failures.push(format!("{oversold} live claims sit where capacity is exceeded"));
    }
    let double_seats = store
        .count(
            "(SELECT c.resource_id, c.block_start, COUNT(*) AS n FROM claims c
               JOIN resources r ON r.id = c.resource_id
              WHERE json_extract(r.doc, '$.capacity') = 1 GROUP BY c.resource_id, c.block_start) AS t",
            "n > 1",
        )
        .await
        .unwrap();
    if double_seats > 0 {
        failures.push(format!("{double_seats} single-capacity resources (seats) claimed twice for the same start"));
    }
    let mut missing_claims = 0;
    for a in &acked {
        let n = store.count("claims", &format!("booking_id = '{}'", a.id)).await.unwrap();
        if n != a.items.len() as i64 {
            missing_claims += 1;
            if missing_claims <= 10 {
                failures.push(format!("booking {} has {n} claims, {} items were acknowledged", a.id, a.items.len()));
            }
        }
    }
    let live_bookings = store.count("bookings", "status IN ('held', 'confirmed')").await.unwrap();
    println!(
        "database: {claims} live claims, {live_bookings} held/confirmed bookings (>= {} acknowledged), \
         {oversold} over-capacity claims, {double_seats} doubly claimed seats, {missing_claims} bookings with missing claims",
        acked.len()
    );
    if (live_bookings as usize) < acked.len() {
        failures.push(format!("{live_bookings} held/confirmed bookings in the database, {} acknowledged", acked.len()));
    }

    println!("durability test finished in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} failures (database and logs in {}):\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
    if std::env::var_os("ALLOT_DURABILITY_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("kept {}", dir.display());
    }
}
