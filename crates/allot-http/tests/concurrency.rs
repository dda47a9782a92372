//! Concurrency over real HTTP on loopback: many customers racing for the same inventory.
//! I1 (no oversell) and I3 (all or nothing) are checked from the responses *and* from the
//! database (`claims` rows), not only from what the API says.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Barrier;

/// Registers `n` customers concurrently over HTTP (register + login, both Argon2) and returns
/// their access tokens, in order.
async fn customers(t: &Arc<TestApp>, prefix: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let t = t.clone();
            let email = format!("{prefix}-{i}@test.allot");
            tokio::spawn(async move { t.customer(&email).await })
        })
        .collect();
    let mut tokens = Vec::with_capacity(n);
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    tokens
}

async fn claims_on(t: &TestApp, resource: &str) -> i64 {
    t.store.count("claims", &format!("resource_id = '{resource}'")).await.unwrap()
}

/// Seat id → status from `GET /events/{id}/seats`.
async fn seat_statuses(t: &TestApp, event: &str) -> HashMap<String, String> {
    let (status, map) = t.get(None, &format!("/events/{event}/seats")).await;
    assert_eq!(status, StatusCode::OK, "{map}");
    map["seats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["resource_id"].as_str().unwrap().to_owned(), s["status"].as_str().unwrap().to_owned()))
        .collect()
}

/// Asserts the SPEC §4 shape of a 409 `unavailable` and returns `details.item_index`.
fn unavailable_index(status: StatusCode, body: &Value) -> u64 {
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body["error"]["details"]["item_index"].as_u64().unwrap_or_else(|| panic!("no details.item_index: {body}"))
}

/// A tiny deterministic PRNG (SplitMix64), so a failing mix can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. One seat, a hundred customers.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_customers_race_for_one_seat_exactly_one_wins() {
    const RACERS: usize = 100;
    let started = Instant::now();
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let seat = seats[0].clone();
    let tokens = customers(&t, "race", RACERS).await;
    let setup = started.elapsed();

    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let (t, barrier, seat, event) = (t.clone(), barrier.clone(), seat.clone(), event.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                t.post(Some(&token), "/bookings", json!({"items": [{"resource_id": seat, "event_id": event}]})).await
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut lost = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        if status == StatusCode::CREATED {
            assert_eq!(body["status"], "held", "{body}");
            won.push(body);
        } else {
            assert_eq!(unavailable_index(status, &body), 0, "{body}");
            lost += 1;
        }
    }
    assert_eq!(won.len(), 1, "exactly one hold of the seat succeeds: {won:?}");
    assert_eq!(lost, RACERS - 1);

    let statuses = seat_statuses(&t, &event).await;
    assert_eq!(statuses[&seat], "held");
    assert_eq!(statuses[&seats[1]], "available", "the neighbouring seat is untouched");
    assert_eq!(claims_on(&t, &seat).await, 1, "one claim row for the seat in the database");
    assert_eq!(claims_on(&t, &seats[1]).await, 0);
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 1, "refused holds leave no booking row");
    let winner = won[0]["id"].as_str().unwrap();
    assert_eq!(t.store.count("claims", &format!("booking_id = '{winner}'")).await.unwrap(), 1);
    eprintln!("one seat x {RACERS}: setup {setup:?}, total {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. One night of a room type, fifty customers.
// ---------------------------------------------------------------------------------------------

const CHECK_IN: &str = "2026-11-26";
const CHECK_OUT: &str = "2026-11-27";

/// Remaining capacity of the night of `CHECK_IN` by the availability endpoint (0 if the night
/// is not listed because it is full).
async fn night_remaining(t: &TestApp, room: &str) -> u64 {
    let (status, body) = t.get(None, &format!("/resources/{room}/availability?from={CHECK_IN}&to={CHECK_OUT}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["date"] == CHECK_IN)
        .map_or(0, |w| w["remaining"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_customers_race_for_one_night_capacity_and_overbooking_hold() {
    const RACERS: usize = 50;
    let started = Instant::now();
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let plain = t.room_type(&admin, &venue, 5, 0).await;
    let overbooked = t.room_type(&admin, &venue, 5, 20).await;
    let mixed = t.room_type(&admin, &venue, 5, 0).await;
    assert_eq!(night_remaining(&t, &plain).await, 5);
    assert_eq!(night_remaining(&t, &overbooked).await, 6, "5 rooms + 20 % overbooking");
    let tokens = customers(&t, "night", RACERS).await;
    let setup = started.elapsed();

    // Every customer goes for all three room types at once: 150 holds in flight.
    // On `mixed`, even customers want 2 rooms, odd ones 1.
    let quantity_on_mixed = |i: usize| if i.is_multiple_of(2) { 2 } else { 1 };
    let barrier = Arc::new(Barrier::new(RACERS * 3));
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        for (room, quantity) in [(&plain, 1), (&overbooked, 1), (&mixed, quantity_on_mixed(i))] {
            let (t, barrier, token, room) = (t.clone(), barrier.clone(), token.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let body = json!({"items": [{"resource_id": room, "check_in": CHECK_IN, "check_out": CHECK_OUT, "quantity": quantity}]});
                let (status, answer) = t.post(Some(&token), "/bookings", body).await;
                (room, quantity, status, answer)
            }));
        }
    }
    // room → (quantities held, quantities refused)
    let mut outcomes: HashMap<String, (Vec<u64>, Vec<u64>)> = HashMap::new();
    for task in tasks {
        let (room, quantity, status, body) = task.await.unwrap();
        let entry = outcomes.entry(room).or_default();
        if status == StatusCode::CREATED {
            assert_eq!(body["status"], "held", "{body}");
            assert_eq!(body["items"][0]["quantity"], quantity, "{body}");
            entry.0.push(quantity);
        } else {
            assert_eq!(unavailable_index(status, &body), 0, "{body}");
            entry.1.push(quantity);
        }
    }

    let (held, refused) = &outcomes[&plain];
    assert_eq!((held.len(), refused.len()), (5, 45), "capacity 5: exactly five holds of one night");
    let (held, refused) = &outcomes[&overbooked];
    assert_eq!((held.len(), refused.len()), (6, 44), "capacity 5 with 20 % overbooking: exactly six");

    // Mixed quantities: never more than 5 rooms; and since nothing is released during the race,
    // a refused 1-room request proves the night was full, a refused 2-room one that at most 1 was left.
    let (held, refused) = &outcomes[&mixed];
    let rooms: u64 = held.iter().sum();
    assert!(rooms <= 5, "mixed quantities oversold: {rooms} rooms held of 5 ({held:?})");
    if refused.contains(&1) {
        assert_eq!(rooms, 5, "a 1-room hold was refused while rooms were left: held {held:?}");
    }
    if refused.contains(&2) {
        assert!(rooms >= 4, "a 2-room hold was refused while 2 were left: held {held:?}");
    }
    assert_eq!(held.len() + refused.len(), RACERS);

    // The database agrees: one claim row per successful hold, quantities summing as answered.
    for (room, expected_rows, expected_rooms) in [
        (&plain, 5_i64, 5_i64),
        (&overbooked, 6, 6),
        (&mixed, i64::try_from(held.len()).unwrap(), i64::try_from(rooms).unwrap()),
    ] {
        assert_eq!(claims_on(&t, room).await, expected_rows, "claim rows of {room}");
        let mut units = 0;
        for q in 1..=2_i64 {
            units += q * t.store.count("claims", &format!("resource_id = '{room}' AND quantity = {q}")).await.unwrap();
        }
        assert_eq!(t.store.count("claims", &format!("resource_id = '{room}' AND quantity > 2")).await.unwrap(), 0);
        assert_eq!(units, expected_rooms, "claimed units of {room}");
    }
    assert_eq!(night_remaining(&t, &plain).await, 0);
    assert_eq!(night_remaining(&t, &overbooked).await, 0);
    assert_eq!(night_remaining(&t, &mixed).await, 5 - rooms);

    // The night after is untouched (check-out day is free).
    let (status, body) = t
        .post(
            Some(&tokens[0]),
            "/bookings",
            json!({"items": [{"resource_id": plain, "check_in": CHECK_OUT, "check_out": "2026-11-28"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "the next night is free: {body}");
    eprintln!("one night x {RACERS} x 3 room types: setup {setup:?}, total {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. All or nothing.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_seat_hold_with_one_seat_taken_claims_neither() {
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 3, 48).await;
    let tokens = customers(&t, "aon", 3).await;
    let (a, b, c) = (&tokens[0], &tokens[1], &tokens[2]);

    let (status, held) =
        t.post(Some(a), "/bookings", json!({"items": [{"resource_id": seats[1], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");

    let (status, refused) = t
        .post(
            Some(b),
            "/bookings",
            json!({"items": [{"resource_id": seats[0], "event_id": event}, {"resource_id": seats[1], "event_id": event}]}),
        )
        .await;
    assert_eq!(unavailable_index(status, &refused), 1, "the second item is the taken one: {refused}");

    assert_eq!(claims_on(&t, &seats[0]).await, 0, "the free seat of a refused hold is not claimed");
    assert_eq!(claims_on(&t, &seats[1]).await, 1);
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 1, "no booking row for the refused hold");
    let (status, mine) = t.get(Some(b), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    assert_eq!(mine["data"].as_array().unwrap().len(), 0, "B has no booking: {mine}");
    let statuses = seat_statuses(&t, &event).await;
    assert_eq!(statuses[&seats[0]], "available");
    assert_eq!(statuses[&seats[1]], "held");

    // The other order: the taken seat first.
    let (status, refused) = t
        .post(
            Some(b),
            "/bookings",
            json!({"items": [{"resource_id": seats[1], "event_id": event}, {"resource_id": seats[2], "event_id": event}]}),
        )
        .await;
    assert_eq!(unavailable_index(status, &refused), 0, "{refused}");
    assert_eq!(claims_on(&t, &seats[2]).await, 0);

    // The same free seat twice in one booking cannot be claimed twice (nor once).
    let (status, twice) = t
        .post(
            Some(b),
            "/bookings",
            json!({"items": [{"resource_id": seats[2], "event_id": event}, {"resource_id": seats[2], "event_id": event}]}),
        )
        .await;
    assert!(
        status == StatusCode::CONFLICT
            || status == StatusCode::UNPROCESSABLE_ENTITY
            || status == StatusCode::BAD_REQUEST,
        "{status} {twice}"
    );
    if status == StatusCode::CONFLICT {
        assert_eq!(unavailable_index(status, &twice), 1, "{twice}");
    }
    assert_eq!(claims_on(&t, &seats[2]).await, 0, "a refused hold of a seat twice claims nothing");
    assert_eq!(seat_statuses(&t, &event).await[&seats[2]], "available");

    let (status, third) =
        t.post(Some(c), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "seat 1 is still holdable: {third}");
    assert_eq!(claims_on(&t, &seats[0]).await, 1);
    assert_eq!(seat_statuses(&t, &event).await[&seats[0]], "held");
}

// ---------------------------------------------------------------------------------------------
// 4. A random concurrent mix of holds, confirms and cancels over ten seats.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Held,
    Confirmed,
    Cancelled,
}

#[derive(Debug)]
struct Won {
    booking_id: String,
    token: String,
    seats: Vec<usize>,
    fate: Fate,
}

#[derive(Default)]
struct Tally {
    won: Vec<Won>,
    refused: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mix_of_holds_confirms_and_cancels_never_double_claims_a_seat() {
    const SEATS: usize = 10;
    const TASKS: usize = 60;
    const ROUNDS: usize = 6;
    let seed: u64 = std::env::var("ALLOT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("random mix seed: ALLOT_TEST_SEED={seed}");
    let started = Instant::now();
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, SEATS, 48).await;
    let seats = Arc::new(seats);
    let tokens = customers(&t, "mix", TASKS + 1).await;
    let setup = started.elapsed();

    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = tokens[..TASKS]
        .iter()
        .enumerate()
        .map(|(n, token)| {
            let (t, barrier, seats, event, token) =
                (t.clone(), barrier.clone(), seats.clone(), event.clone(), token.clone());
            let mut rng = Rng(seed ^ (n as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                barrier.wait().await;
                for _ in 0..ROUNDS {
                    tokio::time::sleep(std::time::Duration::from_millis(rng.below(50) as u64)).await;
                    // 1 to 3 distinct seats, in random order.
                    let k = 1 + rng.below(3);
                    let mut pool: Vec<usize> = (0..SEATS).collect();
                    let picked: Vec<usize> = (0..k).map(|_| pool.swap_remove(rng.below(pool.len()))).collect();
                    let items: Vec<Value> =
                        picked.iter().map(|&s| json!({"resource_id": seats[s], "event_id": event})).collect();
                    let (status, body) = t.post(Some(&token), "/bookings", json!({ "items": items })).await;
                    if status != StatusCode::CREATED {
                        let i = unavailable_index(status, &body);
                        assert!((i as usize) < k, "item_index {i} out of range for {k} items: {body}");
                        tally.refused += 1;
                        continue;
                    }
                    assert_eq!(body["status"], "held", "{body}");
                    let booking_id = body["id"].as_str().unwrap().to_owned();
                    // Mostly churn (cancel, or confirm then cancel) so seats free up while
                    // others are still racing for them; some holds and confirms stay.
                    let fate = match rng.below(16) {
                        0 => Fate::Held,
                        2..=8 => {
                            let (status, b) =
                                t.post(Some(&token), &format!("/bookings/{booking_id}/cancel"), json!({})).await;
                            assert_eq!(status, StatusCode::OK, "cancel of a hold: {b}");
                            assert_eq!(b["status"], "cancelled", "{b}");
                            Fate::Cancelled
                        }
                        roll => {
                            let pay = json!({"payment": {"method": "card", "token": "tok_visa"}});
                            let (status, b) =
                                t.post(Some(&token), &format!("/bookings/{booking_id}/confirm"), pay).await;
                            assert_eq!(status, StatusCode::OK, "confirm: {b}");
                            assert_eq!(b["status"], "confirmed", "{b}");
                            if roll == 1 {
                                Fate::Confirmed
                            } else {
                                let (status, b) =
                                    t.post(Some(&token), &format!("/bookings/{booking_id}/cancel"), json!({})).await;
                                assert_eq!(status, StatusCode::OK, "cancel of a confirmed booking: {b}");
                                assert_eq!(b["status"], "cancelled", "{b}");
                                Fate::Cancelled
                            }
                        }
                    };
                    tally.won.push(Won { booking_id, token: token.clone(), seats: picked, fate });
                }
                tally
            })
        })
        .collect();
    // While the mix runs, an observer keeps checking the database: never two live claims on
    // one seat, not even for a moment.
    let done = Arc::new(AtomicBool::new(false));
    let observer = {
        let (t, done) = (t.clone(), done.clone());
        tokio::spawn(async move {
            let mut looks = 0_u32;
            while !done.load(Ordering::Relaxed) {
                let doubled = t
                    .store
                    .count(
                        "(SELECT resource_id FROM claims GROUP BY resource_id HAVING COUNT(*) > 1) AS doubled",
                        "1 = 1",
                    )
                    .await
                    .unwrap();
                assert_eq!(doubled, 0, "a seat had two claims during the mix (after {looks} looks)");
                looks += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            looks
        })
    };
    let mut won = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let tally = task.await.unwrap();
        won.extend(tally.won);
        refused += tally.refused;
    }
    done.store(true, Ordering::Relaxed);
    let looks = observer.await.unwrap();
    let mixed_at = started.elapsed();
    assert_eq!(won.len() + refused, TASKS * ROUNDS);
    assert!(!won.is_empty(), "with ten free seats at the start some hold must succeed");

    // From the answers: every seat is in at most one live (held or confirmed) booking.
    let live: Vec<&Won> = won.iter().filter(|w| w.fate != Fate::Cancelled).collect();
    let mut owner: BTreeMap<usize, &Won> = BTreeMap::new();
    for w in &live {
        for &s in &w.seats {
            if let Some(other) = owner.insert(s, w) {
                panic!("seat {s} answered as held by two live bookings: {} and {}", other.booking_id, w.booking_id);
            }
        }
    }
    let cancelled = won.len() - live.len();
    let claimed_seats: usize = live.iter().map(|w| w.seats.len()).sum();
    assert_eq!(won.len() - cancelled, live.len());

    // From the database: at most one claim per seat, exactly the live bookings' seats, and
    // the claims belong to the booking that won the seat.
    let mut total_claims = 0;
    for (s, id) in seats.iter().enumerate() {
        let n = claims_on(&t, id).await;
        assert!(n <= 1, "seat {s} has {n} live claims");
        assert_eq!(n == 1, owner.contains_key(&s), "seat {s}: claim row vs answers ({n} claims)");
        if let Some(w) = owner.get(&s) {
            let mine = t
                .store
                .count("claims", &format!("resource_id = '{id}' AND booking_id = '{}'", w.booking_id))
                .await
                .unwrap();
            assert_eq!(mine, 1, "seat {s}'s claim belongs to {}", w.booking_id);
        }
        total_claims += n;
    }
    assert_eq!(total_claims, i64::try_from(claimed_seats).unwrap(), "claim rows = seats of live bookings");
    assert_eq!(t.store.count("claims", "1 = 1").await.unwrap(), total_claims, "no claim rows elsewhere");
    for (fate, status) in [(Fate::Held, "held"), (Fate::Confirmed, "confirmed"), (Fate::Cancelled, "cancelled")] {
        let expected = won.iter().filter(|w| w.fate == fate).count();
        let rows = t.store.count("bookings", &format!("status = '{status}'")).await.unwrap();
        assert_eq!(rows, i64::try_from(expected).unwrap(), "bookings {status}");
    }
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), i64::try_from(won.len()).unwrap());

    // Each booking reads back as its owner last saw it.
    for w in &won {
        let (status, b) = t.get(Some(&w.token), &format!("/bookings/{}", w.booking_id)).await;
        assert_eq!(status, StatusCode::OK, "{b}");
        let expected = match w.fate {
            Fate::Held => "held",
            Fate::Confirmed => "confirmed",
            Fate::Cancelled => "cancelled",
        };
        assert_eq!(b["status"], expected, "{b}");
    }

    // The seat map agrees with the answers.
    let statuses = seat_statuses(&t, &event).await;
    for (s, id) in seats.iter().enumerate() {
        let expected = match owner.get(&s).map(|w| w.fate) {
            None => "available",
            Some(Fate::Held) => "held",
            Some(Fate::Confirmed) => "booked",
            Some(Fate::Cancelled) => unreachable!(),
        };
        assert_eq!(statuses[id], expected, "seat {s}");
    }

    // No leaked capacity: every seat not live is holdable now, all in one booking.
    let free: BTreeSet<usize> = (0..SEATS).filter(|s| !owner.contains_key(s)).collect();
    if !free.is_empty() {
        let items: Vec<Value> = free.iter().map(|&s| json!({"resource_id": seats[s], "event_id": event})).collect();
        let (status, body) = t.post(Some(&tokens[TASKS]), "/bookings", json!({ "items": items })).await;
        assert_eq!(status, StatusCode::CREATED, "free seats {free:?} must be holdable: {body}");
        for &s in &free {
            assert_eq!(claims_on(&t, &seats[s]).await, 1);
        }
    }
    let statuses = seat_statuses(&t, &event).await;
    assert!(statuses.values().all(|s| s != "available"), "every seat now taken: {statuses:?}");
    eprintln!(
        "random mix: {} holds ok ({} cancelled, {} live with {claimed_seats} seats), {refused} refused, {looks} observer looks; \
         setup {setup:?}, mix {:?}, total {:?}",
        won.len(),
        cancelled,
        live.len(),
        mixed_at - setup,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Seat maps read while a sale goes on.
// ---------------------------------------------------------------------------------------------

/// Readers that miss the seat-map cache together take turns rendering and may be served a map
/// another reader rendered; it must still show every hold acknowledged before the read began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_map_read_during_a_sale_shows_every_hold_acknowledged_before_it() {
    const BUYERS: usize = 8;
    const READERS: usize = 8;
    const SEATS: usize = 48;
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, SEATS, 48).await;
    assert_eq!(seats.len(), SEATS);
    let tokens = customers(&t, "map", BUYERS).await;
    let held: Arc<std::sync::Mutex<BTreeSet<String>>> = Arc::default();
    let selling = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (t, event, held, selling) = (t.clone(), event.clone(), held.clone(), selling.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                while selling.load(Ordering::Relaxed) {
                    let before = held.lock().unwrap().clone();
                    let statuses = seat_statuses(&t, &event).await;
                    for seat in &before {
                        assert_eq!(statuses[seat], "held", "seat {seat} was held before this read");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let buyers: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(b, token)| {
            let (t, event, held, seats) = (t.clone(), event.clone(), held.clone(), seats.clone());
            tokio::spawn(async move {
                for seat in seats.iter().skip(b).step_by(BUYERS) {
                    let body = json!({"items": [{"resource_id": seat, "event_id": event}]});
                    let (status, answer) = t.post(Some(&token), "/bookings", body).await;
                    assert_eq!(status, StatusCode::CREATED, "{answer}");
                    held.lock().unwrap().insert(seat.clone());
                    // The buyer's own read right after the answer.
                    assert_eq!(seat_statuses(&t, &event).await[seat], "held");
                }
            })
        })
        .collect();
    for buyer in buyers {
        buyer.await.unwrap();
    }
    selling.store(false, Ordering::Relaxed);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap();
    }
    assert!(reads >= READERS, "every reader read at least once");
    let statuses = seat_statuses(&t, &event).await;
    assert!(seats.iter().all(|s| statuses[s] == "held"), "{statuses:?}");
}

// ---------------------------------------------------------------------------------------------
// Concurrent edits of one resource.
// ---------------------------------------------------------------------------------------------

/// Three managers' PATCHes of different fields of one resource, sent at once, are all kept:
/// each edit is written only over the version it was applied to, and reapplied to the newer
/// one when another came first (before, the last write replaced the whole document as its
/// request had read it, so a capacity set to close a room could silently come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_one_resource_are_all_kept() {
    const ROUNDS: i64 = 12;
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = t.room_type(&admin, &venue, 5, 0).await;
    let path = format!("/resources/{room}");
    for round in 1..=ROUNDS {
        let edits = [
            json!({"name": format!("Double {round}")}),
            json!({"capacity": round}),
            json!({"unit_price": 10_000 + round}),
        ];
        let barrier = Arc::new(Barrier::new(edits.len()));
        let tasks: Vec<_> = edits
            .into_iter()
            .map(|edit| {
                let (t, admin, path, barrier) = (t.clone(), admin.clone(), path.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    t.patch(Some(&admin), &path, edit).await
                })
            })
            .collect();
        for task in tasks {
            let (status, body) = task.await.unwrap();
            assert_eq!(status, StatusCode::OK, "round {round}: {body}");
        }
        let (status, stored) = t.get(None, &path).await;
        assert_eq!(status, StatusCode::OK, "{stored}");
        assert_eq!(stored["name"], format!("Double {round}"), "round {round}: {stored}");
        assert_eq!(stored["capacity"], round, "round {round}: {stored}");
        assert_eq!(stored["unit_price"], 10_000 + round, "round {round}: {stored}");
    }
}

/// Another session holding the write lock a hold's batch needs (SQLite: the database's, with
/// `BEGIN IMMEDIATE`; PostgreSQL: `resource`'s clock row), as a stalled writer would.
enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    async fn take(t: &TestApp, resource: &str) -> WriteLock {
        use sqlx::Connection;
        if t.db_url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(&t.db_url).await.unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query("SELECT 1 FROM resource_clocks WHERE resource_id = $1 FOR UPDATE")
                .bind(resource)
                .execute(&mut conn)
                .await
                .unwrap();
            WriteLock::Postgres(conn)
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&t.db_url).await.unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
            WriteLock::Sqlite(conn)
        }
    }

    async fn release(self) {
        use sqlx::Connection;
        match self {
            WriteLock::Sqlite(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            WriteLock::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
        }
    }
}

/// A hold whose client hangs up while it waits for the writer is not made: nobody would learn
/// of it, and it would keep the seat from every other customer until it lapsed. Its attempt is
/// in the audit trail as a failure, and nothing else is.
#[tokio::test]
async fn a_hold_whose_client_hangs_up_before_it_is_decided_is_not_made() {
    let t = TestApp::spawn().await;
    let manager = t.user_with_role("manager@test.allot", allot_app::store::Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
    let (gone, waiting) = (t.customer("gone@test.allot").await, t.customer("waiting@test.allot").await);
    let body = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
    let lock = WriteLock::take(&t, &seats[0]).await;
    // Long enough for the hold to reach the writer (which waits on the lock) on a loaded
    // machine, short of the PostgreSQL writer's 3 s lock timeout.
    t.post_and_hang_up(&gone, "/bookings", &body, &[], std::time::Duration::from_millis(1000)).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    lock.release().await;
    let (status, held) = t.post(Some(&waiting), "/bookings", body).await;
    assert_eq!(status, StatusCode::CREATED, "the seat is free for the customer still there: {held}");
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 1, "one booking: the second customer's");
    let events = t.store.count("audit_events", "action = 'booking.hold'").await.unwrap();
    let failed = t.store.count("audit_events", "action = 'booking.hold' AND outcome = 'failure'").await.unwrap();
    assert_eq!((events, failed), (2, 1), "the abandoned attempt, then the kept hold");
}

/// Posts a hold of `seat` at `event` with `Idempotency-Key: key`: status, whether replayed, body.
async fn keyed_hold(t: &TestApp, token: &str, seat: &str, event: &str, key: &str) -> (StatusCode, bool, Vec<u8>) {
    let body = json!({"items": [{"resource_id": seat, "event_id": event}]});
    let request = t.client.post(t.url("/bookings")).bearer_auth(token).header("Idempotency-Key", key).json(&body);
    let response = request.send().await.unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (response.status(), replayed, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn keyed_holds_sent_at_once_are_each_made_at_most_once_and_answered_as_stored() {
    const RETRIES: usize = 40;
    const RACERS: usize = 30;
    let t = Arc::new(TestApp::spawn().await);
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let tokens = customers(&t, "keyed", RACERS).await;

    // One customer's hold sent by many tasks at once under one key: one booking, and every
    // answer is that booking's (first or replayed) or "in use".
    let barrier = Arc::new(Barrier::new(RETRIES));
    let tasks: Vec<_> = (0..RETRIES)
        .map(|_| {
            let (t, barrier, token, seat, event) =
                (t.clone(), barrier.clone(), tokens[0].clone(), seats[0].clone(), event.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                keyed_hold(&t, &token, &seat, &event, "same-key").await
            })
        })
        .collect();
    let mut answers = BTreeSet::new();
    let mut first = 0;
    for task in tasks {
        let (status, replayed, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED => {
                first += usize::from(!replayed);
                answers.insert(body);
            }
            StatusCode::CONFLICT => {
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["error"]["code"], "idempotency_key_in_use", "{body}");
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!((first, answers.len()), (1, 1), "one hold made, one answer: {answers:?}");
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 1);
    assert_eq!(claims_on(&t, &seats[0]).await, 1);

    // Customers racing for one seat, each under a key of their own: one wins, and each key's
    // stored answer is the one its request got.
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let (t, barrier, token, seat, event) =
                (t.clone(), barrier.clone(), token.clone(), seats[1].clone(), event.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let key = format!("race-{i}");
                let (status, _, body) = keyed_hold(&t, &token, &seat, &event, &key).await;
                let (again, replayed, replay) = keyed_hold(&t, &token, &seat, &event, &key).await;
                assert_eq!((again, replayed, &replay), (status, true, &body), "{}", String::from_utf8_lossy(&body));
                (status, body)
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        if status == StatusCode::CREATED {
            won += 1;
        } else {
            assert_eq!(unavailable_index(status, &body), 0, "{body}");
        }
    }
    assert_eq!(won, 1);
    assert_eq!(claims_on(&t, &seats[1]).await, 1);
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 2);
}

#[tokio::test]
async fn a_keyed_hold_whose_client_hangs_up_is_made_answered_and_recorded_as_kept() {
    let t = TestApp::spawn().await;
    let manager = t.user_with_role("manager@test.allot", allot_app::store::Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
    let gone = t.customer("keyed-gone@test.allot").await;
    let body = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
    let lock = WriteLock::take(&t, &seats[0]).await;
    let key = [("Idempotency-Key", "gone-1")];
    t.post_and_hang_up(&gone, "/bookings", &body, &key, std::time::Duration::from_millis(1000)).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    lock.release().await;
    // The request goes on without its client: its answer is stored with the hold.
    let mut stored = 0;
    for _ in 0..100 {
        stored = t.store.count("idempotency_keys", "key = 'gone-1' AND status = 201").await.unwrap();
        if stored == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored, 1, "the hold's answer is stored");
    assert_eq!(t.store.count("bookings", "1 = 1").await.unwrap(), 1);
    let (retry, replayed, answer) = keyed_hold(&t, &gone, &seats[0], &event, "gone-1").await;
    assert_eq!((retry, replayed), (StatusCode::CREATED, true), "{}", String::from_utf8_lossy(&answer));
    let events = t.store.count("audit_events", "action = 'booking.hold'").await.unwrap();
    let failed = t.store.count("audit_events", "action = 'booking.hold' AND outcome = 'failure'").await.unwrap();
    assert_eq!((events, failed), (1, 0), "recorded as the hold it made, once");
}
