//! What a run measured: per operation a latency histogram (microseconds) and a count per
//! status. Each client keeps its own [`Recorder`] and they are merged at the end (no locks on
//! the path).
//!
//! A client keeps its latencies as raw samples and folds them into a histogram only when it
//! has many: a histogram of this range is ~220 KB, and a client allocating one per operation
//! as it started made a 1 000-client burst fault in 2 GB of zeroed pages while it was being
//! timed (the generator measured itself: a ping burst's p50 was 200 ms).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Op;

/// Latencies above this are recorded as this (one minute, in microseconds).
const LATENCY_MICROS_MAX: u64 = 60_000_000;
/// Raw samples a client keeps per operation before folding them into a histogram.
const SAMPLES_PER_OP_MAX: usize = 16_384;

#[derive(Debug, Clone)]
pub struct OpStats {
    pub latency: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
}

fn histogram() -> Histogram<u64> {
    #[allow(clippy::unwrap_used)] // Constant, valid bounds.
    Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, 3).unwrap()
}

impl OpStats {
    fn new() -> OpStats {
        OpStats { latency: histogram(), statuses: BTreeMap::new() }
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
    /// Adds one client's record.
    pub fn merge(&mut self, record: &Recorder) {
        for (mine, theirs) in self.ops.iter_mut().zip(&record.ops) {
            if let Some(folded) = &theirs.folded {
                // Same bounds on both sides: adding cannot fail.
                let _ = mine.latency.add(folded);
            }
            for &micros in &theirs.samples {
                mine.latency.saturating_record(micros.into());
            }
            for (status, n) in &theirs.statuses {
                *mine.statuses.entry(*status).or_default() += n;
            }
        }
    }
}

/// One client's measurements of one operation.
#[derive(Debug, Default)]
struct OpRecord {
    /// Microseconds, at most [`SAMPLES_PER_OP_MAX`].
    samples: Vec<u32>,
    /// The samples folded so far (allocated when the first fold happens).
    folded: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
}

/// One client's measurements, indexed by `Op as usize`; cheap until it records.
#[derive(Debug)]
pub struct Recorder {
    ops: Vec<OpRecord>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { ops: Op::ALL.iter().map(|_| OpRecord::default()).collect() }
    }
}

impl Recorder {
    pub fn record(&mut self, op: Op, status: u16, micros: u64) {
        let r = &mut self.ops[op as usize];
        if r.samples.len() == SAMPLES_PER_OP_MAX {
            let folded = r.folded.get_or_insert_with(histogram);
            for micros in r.samples.drain(..) {
                folded.saturating_record(micros.into());
            }
        }
        // LATENCY_MICROS_MAX fits in a u32.
        r.samples.push(u32::try_from(micros.clamp(1, LATENCY_MICROS_MAX)).unwrap_or(u32::MAX));
        *r.statuses.entry(status).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merged_record_counts_folded_and_raw_samples_alike() {
        let mut record = Recorder::default();
        let n = SAMPLES_PER_OP_MAX as u64 * 2 + 7;
        for i in 0..n {
            record.record(Op::Ping, 200, 1 + i % 1000);
        }
        record.record(Op::Ping, 503, LATENCY_MICROS_MAX * 2);
        assert!(record.ops[Op::Ping as usize].folded.is_some());
        let mut stats = Stats::default();
        stats.merge(&record);
        let ping = &stats.ops[Op::Ping as usize];
        assert_eq!(ping.latency.len(), n + 1);
        assert_eq!(ping.ok(), n);
        assert_eq!(ping.statuses.get(&503), Some(&1));
        assert_eq!(ping.latency.max(), ping.latency.highest_equivalent(LATENCY_MICROS_MAX));
        assert!(stats.ops[Op::HoldSeat as usize].latency.is_empty());
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
