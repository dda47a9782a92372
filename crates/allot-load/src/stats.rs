//! What a run measured: per operation a latency histogram (microseconds) and a count per
//! status; each client keeps its own and they are merged at the end (no locks on the path).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Op;

/// Latencies above this are recorded as this (one minute, in microseconds).
const LATENCY_MICROS_MAX: u64 = 60_000_000;

#[derive(Debug, Clone)]
pub struct OpStats {
    pub latency: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
}

impl OpStats {
    fn new() -> OpStats {
        #[allow(clippy::unwrap_used)] // Constant, valid bounds.
        let latency = Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, 3).unwrap();
        OpStats { latency, statuses: BTreeMap::new() }
    }

    pub fn ok(&self) -> u64 {
        self.statuses.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum()
    }
}

/// Stats of every operation, indexed by `Op as usize`.
#[derive(Debug, Clone)]
pub struct Stats {
    pub ops: Vec<OpStats>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats { ops: Op::ALL.iter().map(|_| OpStats::new()).collect() }
    }
}

impl Stats {
    pub fn record(&mut self, op: Op, status: u16, micros: u64) {
        let s = &mut self.ops[op as usize];
        s.latency.saturating_record(micros.clamp(1, LATENCY_MICROS_MAX));
        *s.statuses.entry(status).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            // Same bounds on both sides: adding cannot fail.
            let _ = mine.latency.add(&theirs.latency);
            for (status, n) in &theirs.statuses {
                *mine.statuses.entry(*status).or_default() += n;
            }
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One operation's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub requests: u64,
    pub ok: u64,
    pub requests_per_second: f64,
    pub ok_per_second: f64,
    /// Count per HTTP status; `0` is a transport error or a timeout.
    pub statuses: BTreeMap<String, u64>,
    pub latency_ms: Percentiles,
}

impl OpReport {
    pub fn of(s: &OpStats, seconds: f64) -> OpReport {
        let requests = s.latency.len();
        OpReport {
            requests,
            ok: s.ok(),
            requests_per_second: requests as f64 / seconds,
            ok_per_second: s.ok() as f64 / seconds,
            statuses: s.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            latency_ms: Percentiles::of(&s.latency),
        }
    }
}
