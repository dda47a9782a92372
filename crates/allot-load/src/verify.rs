//! The end-of-run check, read from the database itself: no resource holds more than its
//! capacity at any instant, every acknowledged hold, confirm and cancel is stored as answered,
//! and no claim is left on a booking that no longer counts.

use std::collections::HashMap;

use serde::Serialize;

use crate::setup::World;

/// Failures listed by name in the report (the counts are always complete).
const FAILURES_LISTED_MAX: usize = 20;

/// The last state the server acknowledged for one booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Held,
    Confirmed,
    Cancelled,
}

impl Ack {
    fn status(self) -> &'static str {
        match self {
            Ack::Held => "held",
            Ack::Confirmed => "confirmed",
            Ack::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Verification {
    pub ok: bool,
    pub acknowledged_bookings: usize,
    pub stored_bookings: usize,
    /// Acknowledged but absent, or stored in another state than acknowledged.
    pub lost_or_wrong: usize,
    /// Stored without an acknowledgement (a request that timed out or lost its connection).
    pub stored_unacknowledged: usize,
    pub live_claims: usize,
    pub resources_checked: usize,
    /// Resources whose live claims exceed their capacity at some instant.
    pub oversold_resources: usize,
    /// Claims of bookings that are not held, pending or confirmed (they must be gone).
    pub stray_claims: usize,
    /// Seats sold (held or confirmed) on the hot show, if the run had one.
    pub hot_seats_taken: Option<usize>,
    pub failures: Vec<String>,
}

impl Verification {
    fn fail(&mut self, message: String) {
        if self.failures.len() < FAILURES_LISTED_MAX {
            self.failures.push(message);
        }
    }
}

/// Normalises an id to the store's form (32 hex digits).
pub fn simple_id(id: &str) -> String {
    uuid::Uuid::parse_str(id).map(|u| u.as_simple().to_string()).unwrap_or_else(|_| id.to_owned())
}

pub async fn verify(database_url: &str, world: &World, acks: &HashMap<String, Ack>) -> anyhow::Result<Verification> {
    let venue = uuid::Uuid::parse_str(&world.venue_id)?;
    let snapshot = allot_store::inspect::venue_snapshot(database_url, venue).await?;
    let now = jiff::Timestamp::now().as_second();
    let stored: HashMap<&str, &str> = snapshot.bookings.iter().map(|(id, s)| (id.as_str(), s.as_str())).collect();
    let mut v =
        Verification { acknowledged_bookings: acks.len(), stored_bookings: stored.len(), ..Verification::default() };
    for (id, ack) in acks {
        match stored.get(id.as_str()) {
            Some(status) if *status == ack.status() => {}
            found => {
                v.lost_or_wrong += 1;
                v.fail(format!("booking {id}: acknowledged {}, stored {found:?}", ack.status()));
            }
        }
    }
    v.stored_unacknowledged = stored.keys().filter(|id| !acks.contains_key(**id)).count();

    let capacity: HashMap<String, u32> = world.capacity.iter().map(|(id, c)| (simple_id(id), *c)).collect();
    let mut by_resource: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    for claim in &snapshot.claims {
        let status = stored.get(claim.booking_id.as_str()).copied();
        match claim_kind(status, claim.hold_expires_at, now) {
            ClaimKind::Lapsed => continue,
            ClaimKind::Stray => {
                v.stray_claims += 1;
                v.fail(format!("claim of booking {} which is {status:?}", claim.booking_id));
                continue;
            }
            ClaimKind::Live => {}
        }
        v.live_claims += 1;
        let entry = by_resource.entry(claim.resource_id.as_str()).or_default();
        entry.push((claim.block_start, claim.quantity));
        entry.push((claim.block_end, -claim.quantity));
    }
    v.resources_checked = by_resource.len();
    for (resource, mut changes) in by_resource {
        let Some(&cap) = capacity.get(resource) else {
            v.oversold_resources += 1;
            v.fail(format!("claim on resource {resource}, which this run did not make"));
            continue;
        };
        if let Some((at, used)) = peak_over(&mut changes, i64::from(cap)) {
            v.oversold_resources += 1;
            v.fail(format!("resource {resource} (capacity {cap}) has {used} claimed at {at}"));
        }
    }
    if let Some(span) = world.hot_span {
        v.hot_seats_taken = Some(hot_taken(&snapshot.claims, &stored, world, span));
    }
    v.ok = v.lost_or_wrong == 0 && v.oversold_resources == 0 && v.stray_claims == 0;
    Ok(v)
}

/// The first instant where the running sum of `(time, delta)` exceeds `cap`. Ends sort before
/// starts at the same instant: a claim ending at t frees its unit for one starting at t.
fn peak_over(changes: &mut [(i64, i64)], cap: i64) -> Option<(i64, i64)> {
    changes.sort_unstable_by_key(|&(t, delta)| (t, delta));
    let mut used = 0;
    for &(t, delta) in changes.iter() {
        used += delta;
        if used > cap {
            return Some((t, used));
        }
    }
    None
}

/// Seats of the hot show held or confirmed now: claims on its seats over its span.
fn hot_taken(
    claims: &[allot_store::inspect::ClaimRow],
    stored: &HashMap<&str, &str>,
    world: &World,
    span: (i64, i64),
) -> usize {
    let seats: std::collections::HashSet<String> =
        world.seats[..world.hot_seats].iter().map(|s| simple_id(s)).collect();
    claims
        .iter()
        .filter(|c| seats.contains(&c.resource_id) && c.block_start < span.1 && span.0 < c.block_end)
        .filter(|c| matches!(stored.get(c.booking_id.as_str()), Some(&("held" | "pending_payment" | "confirmed"))))
        .count()
}

#[derive(Debug, PartialEq, Eq)]
enum ClaimKind {
    /// Counts against capacity now.
    Live,
    /// A hold's claim past its expiry: it counts for nothing (I1), whether or not the hold was
    /// swept yet; a swept one's claims may stay until the store purges them.
    Lapsed,
    /// A claim no stored booking explains.
    Stray,
}

/// What a claim row of a booking stored with `status` is at `now` (seconds).
fn claim_kind(status: Option<&str>, hold_expires_at: Option<i64>, now: i64) -> ClaimKind {
    let counts = matches!(status, Some("held" | "pending_payment" | "confirmed"));
    let lapsed = hold_expires_at.is_some_and(|t| t <= now);
    match (counts, lapsed) {
        (true, false) => ClaimKind::Live,
        (true, true) => ClaimKind::Lapsed,
        (false, true) if status == Some("expired") => ClaimKind::Lapsed,
        (false, _) => ClaimKind::Stray,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_bookings_lapsed_claim_awaits_its_purge_and_any_other_leftover_is_stray() {
        assert_eq!(claim_kind(Some("held"), Some(100), 99), ClaimKind::Live);
        assert_eq!(claim_kind(Some("confirmed"), None, 99), ClaimKind::Live);
        assert_eq!(claim_kind(Some("held"), Some(100), 100), ClaimKind::Lapsed, "not swept yet");
        assert_eq!(claim_kind(Some("expired"), Some(100), 100), ClaimKind::Lapsed, "swept, not purged yet");
        assert_eq!(claim_kind(Some("expired"), Some(100), 99), ClaimKind::Stray, "expired before its expiry");
        assert_eq!(claim_kind(Some("expired"), None, 99), ClaimKind::Stray);
        assert_eq!(claim_kind(Some("cancelled"), Some(100), 200), ClaimKind::Stray);
        assert_eq!(claim_kind(None, Some(100), 200), ClaimKind::Stray, "no booking");
    }

    #[test]
    fn touching_claims_do_not_overlap_but_nested_ones_do() {
        assert_eq!(peak_over(&mut [(0, 1), (10, -1), (10, 1), (20, -1)], 1), None);
        assert_eq!(peak_over(&mut [(0, 1), (10, -1), (5, 1), (20, -1)], 1), Some((5, 2)));
        assert_eq!(peak_over(&mut [(0, 3), (10, -3), (2, 2), (4, -2)], 5), None);
        assert_eq!(peak_over(&mut [(0, 3), (10, -3), (2, 2), (4, -2)], 4), Some((2, 5)));
    }
}
