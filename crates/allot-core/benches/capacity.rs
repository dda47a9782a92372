//! Micro-benchmarks of the capacity rule (invariant I1): `capacity::check_claim` and
//! `capacity::remaining` for one new claim against a resource that already has 10 000 claims.
//!
//! Why: every hold runs `check_claim` inside the store's write transaction, so its cost adds
//! directly to the time the write lock is held; `remaining` is called once per window when
//! availability is listed. Two shapes bound the realistic range:
//!
//! * `general_admission` — a counter of capacity 1 000 000 for one event: all 10 000 claims have
//!   the event's span, and so has the new claim (every claim overlaps, none has an edge inside);
//! * `charger_year` — a charger with 3 plugs over a year: 10 000 one-hour claims spread evenly
//!   (with jitter) over the year, so neighbours overlap a little; the new claim is one hour in
//!   the middle of the year and overlaps only a couple of them.
//!
//! The stores pass only the claims that may overlap the new span, so `charger_year` with all
//! 10 000 claims is the engine's worst case for that shape, not what a hold usually sees; it
//! measures the scan over claims that do not overlap.
//!
//! Run: `cargo bench -p allot-core --bench capacity -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use allot_core::capacity::{CapacityRules, Claim, Span, check_claim, remaining};
use criterion::{Criterion, criterion_group, criterion_main};

const CLAIMS: usize = 10_000;
/// 2026-01-01T00:00:00Z.
const YEAR_START: i64 = 1_767_225_600;
const YEAR_SECONDS: i64 = 365 * 86_400;
const HOUR: i64 = 3_600;

struct Shape {
    name: &'static str,
    rules: CapacityRules,
    existing: Vec<Claim>,
    new: Claim,
}

/// 10 000 tickets of one event (1 to 4 per booking), capacity 1 000 000; two more asked.
fn general_admission() -> Shape {
    let event = Span::new(YEAR_START + 180 * 86_400 + 19 * HOUR, YEAR_START + 180 * 86_400 + 23 * HOUR);
    let existing = (0..CLAIMS).map(|i| Claim { span: event, quantity: 1 + (i % 4) as u32 }).collect();
    Shape {
        name: "general_admission",
        rules: CapacityRules::simple(1_000_000),
        existing,
        new: Claim { span: event, quantity: 2 },
    }
}

/// 10 000 one-hour sessions spread over a year (one every ~52.6 min, ±10 min of jitter, so
/// neighbours overlap by up to ~27 min: at most two plugs in use), capacity 3; one more hour
/// asked in the middle of the year.
fn charger_year() -> Shape {
    let step = YEAR_SECONDS / CLAIMS as i64;
    let existing = (0..CLAIMS as i64)
        .map(|i| {
            let jitter = (i * 7_919) % 1_200 - 600;
            let start = YEAR_START + i * step + jitter;
            Claim { span: Span::new(start, start + HOUR), quantity: 1 }
        })
        .collect();
    let middle = YEAR_START + YEAR_SECONDS / 2 + 1_234;
    Shape {
        name: "charger_year",
        rules: CapacityRules::simple(3),
        existing,
        new: Claim { span: Span::new(middle, middle + HOUR), quantity: 1 },
    }
}

fn bench(c: &mut Criterion) {
    for shape in [general_admission(), charger_year()] {
        // The benches measure the accepting path, the one every successful hold takes.
        assert!(
            check_claim(&shape.rules, &shape.existing, shape.new).is_ok(),
            "{}: the new claim must fit",
            shape.name
        );
        let mut group = c.benchmark_group(format!("capacity/{}", shape.name));
        group.bench_function("check_claim/10000", |b| {
            b.iter(|| check_claim(black_box(&shape.rules), black_box(&shape.existing), black_box(shape.new)))
        });
        group.bench_function("remaining/10000", |b| {
            b.iter(|| remaining(black_box(&shape.rules), black_box(&shape.existing), black_box(shape.new.span)))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
