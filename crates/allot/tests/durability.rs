//! Durability under `kill -9` (SPEC I1, I5): the real `allot` binary serves the demo over a
//! fresh SQLite file while many clients hold (with contention) cinema seats and hotel nights and
//! confirm some of them; the process is SIGKILLed mid-load and started again on the same file.
//! Every hold and confirm that was acknowledged with a 2xx must still be there, nothing may be
//! sold twice, and starting again with `--demo` must not duplicate the demo.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use allot_store::SqliteStore;
use common::{
    Acks, Item, Mix, Node, Rng, demo_catalogue, get, held_id, http_client, list_all, login, now_nanos, payment,
    register, scratch_dir, send_counted, send_random_hold, str_of, worker_seed,
};
use futures::StreamExt;
use jiff::ToSpan;
use jiff::civil::Date;
use reqwest::StatusCode;
use serde_json::Value;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many bytes of the server's stderr a failure shows.
const STDERR_TAIL: usize = 4000;
const CUSTOMERS: usize = 20;
const WORKERS_PER_CUSTOMER: usize = 4;
/// Kill once this many hold/confirm responses have been received (and at least `KILL_AFTER_MIN`
/// has passed), or at `KILL_AFTER_MAX` whatever the count.
const KILL_AT_ACKS: usize = 400;
const KILL_AFTER_MIN: Duration = Duration::from_millis(1500);
const KILL_AFTER_MAX: Duration = Duration::from_secs(15);
const EVENTS_USED: usize = 6;
/// Out of ten seats drawn, how many come from a show's hot seats (most holds fight over them);
/// out of ten stays, how many are of the Standard type.
const HOT_IN_10: usize = 6;
const STANDARD_IN_10: usize = 7;
const PASSWORD: &str = "password-123";
const DEMO_PASSWORD: &str = "demo-password";

// ---------------------------------------------------------------------------------------------
// The load.

/// A hold answered 201 before the kill (and whether its confirm was answered 200).
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    customer: usize,
    items: Vec<Item>,
    confirmed: bool,
}

struct Load {
    mix: Mix,
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
        let (items, answer) = send_random_hold(&load.mix, &mut rng, &client, &hold_url, &token, &load.in_flight).await;
        let (status, booking) = match answer {
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
        let id = held_id(&booking);
        acked.push(Acked { id: id.clone(), customer, items, confirmed: false });
        if rng.below(2) == 0 {
            let confirm =
                client.post(format!("{base}/api/v1/bookings/{id}/confirm")).bearer_auth(&token).json(&payment());
            match send_counted(&load.in_flight, confirm).await {
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

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_without_oversell() {
    let started = Instant::now();
    let nanos = now_nanos();
    let dir = scratch_dir("durability", nanos);
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let client = http_client(REQUEST_TIMEOUT, None);

    // 1. First start.
    let mut first = Node::start("allot", &db_url, true, dir.join("stderr-1.log"), STDERR_TAIL);
    println!("first start: {} after {:?}", first.base, started.elapsed());

    // 2. Catalogue and customers.
    let demo = demo_catalogue(&client, &first, EVENTS_USED).await;
    let venue_ids: HashSet<String> = demo.venues.iter().map(|v| str_of(v, "id")).collect();
    let (cinema_id, hotel_id, events) = (demo.cinema_id, demo.hotel_id, demo.events);
    let (shows, rooms) = (demo.shows, demo.rooms);
    let cinema_resources = list_all(&client, &first, &format!("/venues/{cinema_id}/resources")).await.len();
    // The seat map agrees with the event's seat list.
    let (status, map) = get(&client, &first, None, &format!("/events/{}/seats", shows[0].id)).await;
    assert_eq!(status, StatusCode::OK, "{map}");
    assert_eq!(map["seats"].as_array().unwrap().len(), shows[0].seats.len());
    println!(
        "catalogue: {} shows used, room types {:?}",
        shows.len(),
        rooms.iter().map(|r| (&r.name, r.effective)).collect::<Vec<_>>()
    );

    let emails: Vec<String> = (0..CUSTOMERS).map(|i| format!("durable-{i}@test.allot")).collect();
    let registered = futures::future::join_all(emails.iter().map(|email| {
        let (client, first) = (&client, &first);
        async move {
            register(client, first, email, PASSWORD, "Durable").await;
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
    let load = Arc::new(Load {
        mix: Mix::new(shows.clone(), rooms.clone(), HOT_IN_10, STANDARD_IN_10),
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
            worker_seed(w, nanos as u64),
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
    let acks = Acks::of(acked.iter().map(|a| (a.id.as_str(), a.items.as_slice())));
    let mut failures = acks.oversold(&rooms);

    // 5. Restart on the same file, again with --demo.
    let restart_at = Instant::now();
    let second = Node::start("restarted allot", &db_url, true, dir.join("stderr-2.log"), STDERR_TAIL);
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
        for ((event, seat), ids) in &acks.seats {
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
    let last_night = load.mix.first_night.checked_add(8.days()).unwrap();
    for room in &rooms {
        let (status, avail) = get(
            &client,
            &second,
            None,
            &format!("/resources/{}/availability?from={}&to={last_night}", room.id, load.mix.first_night),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{avail}");
        for w in avail["windows"].as_array().unwrap() {
            let Some(night) = w["date"].as_str().and_then(|d| d.parse::<Date>().ok()) else { continue };
            let remaining = w["remaining"].as_u64().unwrap();
            let used = acks.nights.get(&(room.id.clone(), night)).copied().unwrap_or(0);
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
