//! Micro-benchmarks of the pure (no-I/O) part of `GET /api/v1/events/{id}/seats` for an event of
//! 300 seats, about a third of them taken.
//!
//! Why: the seat map is the largest catalogue answer a busy event page polls. The statuses
//! themselves come from the store (`Store::seat_states`, one SQL query), so they are not
//! measured here; what runs on the request thread afterwards is:
//!
//! * `seat_views` — `allot_app::catalog::seat_views`: each of the event's seats looked up among
//!   the resources the store returned (in no particular order), with its price and state;
//! * `seat_map_json` — `allot_http::dto::seat_map_json`: the wire view (ids and times as strings,
//!   each seat's attribute document parsed into JSON);
//! * `to_vec` — `serde_json::to_vec` of that view: the response body bytes;
//! * `all` — the three in a row, what the handler adds on top of the store's two reads.
//!
//! Run: `cargo bench -p allot-http --bench seat_map -- --warm-up-time 1 --measurement-time 3`

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use allot_app::catalog::seat_views;
use allot_app::store::SeatState;
use allot_core::ids::{EventId, ResourceId, VenueId};
use allot_core::inventory::{Event, Resource, ResourceRules};
use allot_core::time_model::TimeModel;
use allot_http::dto::seat_map_json;
use criterion::{Criterion, criterion_group, criterion_main};
use jiff::Timestamp;

const ROWS: u32 = 15;
const PER_ROW: u32 = 20;
const SEATS: usize = (ROWS * PER_ROW) as usize;

struct Input {
    event: Event,
    /// The event's seats in the order the store returns them (not the event's order).
    seats: Vec<Resource>,
    states: HashMap<ResourceId, SeatState>,
}

/// 15 rows of 20 seats (the last three rows premium), like the demo cinema's seats; every
/// third seat booked and every tenth one held.
fn input() -> Input {
    let venue_id = VenueId::new();
    let mut seats = Vec::with_capacity(SEATS);
    for row in 0..ROWS {
        let row_name = char::from(b'A' + u8::try_from(row).expect("row letter"));
        for n in 1..=PER_ROW {
            let category = if row >= ROWS - 3 { "premium" } else { "standard" };
            seats.push(Resource {
                id: ResourceId::new(),
                venue_id,
                name: format!("Hall 1 {row_name}{n}"),
                capacity: 1,
                unit_price: 1_200,
                attributes: format!(
                    r#"{{"hall":1,"row":"{row_name}","number":{n},"x":{n},"y":{},"category":"{category}"}}"#,
                    row + 1
                ),
                price_category: Some(category.to_owned()),
                time_model: TimeModel::Events,
                rules: ResourceRules::default(),
            });
        }
    }
    let start = Timestamp::from_second(1_782_925_200).expect("start");
    let end = Timestamp::from_second(1_782_934_200).expect("end");
    let event = Event {
        id: EventId::new(),
        venue_id,
        name: "Last Seat Standing".to_owned(),
        start,
        end,
        seat_ids: seats.iter().map(|s| s.id).collect(),
        price_categories: BTreeMap::from([("standard".to_owned(), 1_200), ("premium".to_owned(), 1_800)]),
    };
    let mut states = HashMap::new();
    for (i, seat) in seats.iter().enumerate() {
        if i % 3 == 0 {
            states.insert(seat.id, SeatState::Booked);
        } else if i % 10 == 1 {
            states.insert(seat.id, SeatState::Held);
        }
    }
    // The store answers in no particular order: a fixed permutation (7 is prime to 300).
    let seats = (0..SEATS).map(|k| seats[k * 7 % SEATS].clone()).collect();
    Input { event, seats, states }
}

fn bench(c: &mut Criterion) {
    let input = input();
    let views = seat_views(&input.event, &input.seats, &input.states);
    assert_eq!(views.len(), SEATS);
    let wire = seat_map_json(&input.event, &views);
    let body = serde_json::to_vec(&wire).expect("serialisable");
    eprintln!("seat map body: {} bytes for {} seats", body.len(), SEATS);

    let mut group = c.benchmark_group("seat_map/300");
    group.bench_function("seat_views", |b| {
        b.iter(|| seat_views(black_box(&input.event), black_box(&input.seats), black_box(&input.states)))
    });
    group.bench_function("seat_map_json", |b| b.iter(|| seat_map_json(black_box(&input.event), black_box(&views))));
    group.bench_function("to_vec", |b| b.iter(|| serde_json::to_vec(black_box(&wire)).expect("serialisable")));
    group.bench_function("all", |b| {
        b.iter(|| {
            let views = seat_views(black_box(&input.event), black_box(&input.seats), black_box(&input.states));
            serde_json::to_vec(&seat_map_json(&input.event, &views)).expect("serialisable")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
