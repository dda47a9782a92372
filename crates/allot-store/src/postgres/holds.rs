//! Holds on PostgreSQL, decided a batch at a time.
//!
//! Every statement is a network round trip, and one hold at a time cost four of them (its
//! resource, its live claims, its rows, its savepoint), so the writer's session spent most of
//! its time waiting on the wire. A batch of holds costs a few statements whatever its size:
//! the documents of every resource named, the claims of every (resource, span) asked for, a
//! savepoint, and one statement writing every kept hold's claims, booking and outbox row (one
//! more takes lapsed holds out of the exclusion constraint, when there are any). The core
//! decides each hold in memory, in queue order, against what the database holds plus the
//! claims of the holds kept before it — exactly what each would have seen running alone after
//! them. The batch's resources are locked (`resource_clocks`) before this runs, so nothing else
//! changes them meanwhile.

use std::collections::{HashMap, HashSet};

use allot_app::store::{HoldCommand, HoldRefused};
use allot_core::booking::Booking;
use allot_core::capacity::{self, CapacityRules, Claim, Span};
use allot_core::ids::{ResourceId, VenueId};
use allot_core::inventory::{Resource, Venue};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use sqlx::PgConnection;

use super::{Ctx, execute_raw};
use crate::common::{claim_of_row, from_json_db, to_json};
use crate::writer::HoldResults;

/// True when at most one unit can ever be claimed at once: the exclusion constraint then
/// states exactly I1 and can guard it.
pub(super) fn is_exclusive(rules: &CapacityRules) -> bool {
    let scaled = |c: u32| u64::from(c) * (100 + u64::from(rules.overbooking_percent)) / 100;
    scaled(rules.capacity) <= 1 && rules.overrides.iter().all(|o| scaled(o.capacity) <= 1)
}

/// Decides and writes `commands` in order (see the module header). `Err` leaves the
/// transaction unusable; the writer then rolls back the whole batch.
pub(super) async fn holds_in_tx(ctx: &mut Ctx, commands: Vec<HoldCommand>) -> Result<HoldResults, sqlx::Error> {
    let nows: Vec<Timestamp> = commands.iter().map(|c| ctx.now(c.now)).collect();
    let Some(&now_last) = nows.last() else { return Ok(Vec::new()) };
    let targets = targets(&mut ctx.conn, &commands).await?;
    let wanted = Wanted::of(&commands, &targets);
    let live = wanted.read(&mut ctx.conn).await?;
    wanted.release_lapsed(&mut ctx.conn, &live, now_last).await?;
    let mut taken = Taken::default();
    let mut rows = HoldRows::default();
    let mut results = Vec::with_capacity(commands.len());
    for (index, (command, now)) in commands.into_iter().zip(nows).enumerate() {
        let claims = match decide(&command, now, &targets, &wanted, &live, &taken) {
            Ok(claims) => claims,
            Err(refused) => {
                results.push(Err(refused));
                continue;
            }
        };
        let mut booking = command.booking;
        booking.decided_at(command.now, now);
        rows.add(index, &booking, &claims, now)?;
        taken.add(&claims);
        results.push(Ok(booking));
    }
    if rows.is_empty() {
        return Ok(results);
    }
    // The savepoint lets a refusal by the exclusion constraint (which aborts the statement)
    // undo only this insert; it stays open until COMMIT, which releases it.
    execute_raw(&mut ctx.conn, "SAVEPOINT holds").await?;
    match rows.write(&mut ctx.conn, false).await {
        Ok(_) => {}
        Err(e) if e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == EXCLUSION_VIOLATION) => {
            execute_raw(&mut ctx.conn, "ROLLBACK TO holds").await?;
            if rows.write(&mut ctx.conn, true).await? < rows.claims() {
                refuse_unwritten(&mut ctx.conn, &rows, &mut results).await?;
            }
        }
        Err(e) => return Err(e),
    }
    Ok(results)
}

/// PostgreSQL's code for a violated exclusion constraint.
const EXCLUSION_VIOLATION: &str = "23P01";

/// What a hold needs to know of a live resource.
struct Target {
    venue_id: VenueId,
    rules: CapacityRules,
    exclusive: bool,
}

/// The live resources the holds name, with their venues' zones, in one statement.
async fn targets(
    conn: &mut PgConnection,
    commands: &[HoldCommand],
) -> Result<HashMap<ResourceId, Target>, sqlx::Error> {
    let mut ids: Vec<String> =
        commands.iter().flat_map(|c| c.booking.items.iter().map(|i| i.resource_id.to_string())).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT r.venue_id, r.doc::text, v.doc::text FROM resources r
         JOIN venues v ON v.id = r.venue_id AND v.deleted_at IS NULL
         WHERE r.id = ANY($1) AND r.deleted_at IS NULL",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut zones: HashMap<String, TimeZone> = HashMap::new();
    let mut targets = HashMap::with_capacity(rows.len());
    for (venue_id, resource_doc, venue_doc) in rows {
        let resource: Resource = from_json_db(&resource_doc)?;
        let tz = match zones.get(&venue_id) {
            Some(tz) => tz.clone(),
            None => zones.entry(venue_id).or_insert(from_json_db::<Venue>(&venue_doc)?.tz()).clone(),
        };
        let rules = resource.capacity_rules(&tz);
        let exclusive = is_exclusive(&rules);
        targets.insert(resource.id, Target { venue_id: resource.venue_id, rules, exclusive });
    }
    Ok(targets)
}

/// The distinct (resource, span) pairs whose live claims the holds need.
struct Wanted {
    pairs: Vec<(ResourceId, Span, bool)>,
    index: HashMap<(ResourceId, Span), usize>,
}

/// Live claims per wanted pair, with the second their holds lapse (`i64::MAX`: never).
type Live = Vec<Vec<(Claim, i64)>>;

impl Wanted {
    fn of(commands: &[HoldCommand], targets: &HashMap<ResourceId, Target>) -> Wanted {
        let mut wanted = Wanted { pairs: Vec::new(), index: HashMap::new() };
        for command in commands {
            for (item, claim) in command.booking.items.iter().zip(&command.claims) {
                let Some(target) = targets.get(&item.resource_id) else { continue };
                let next = wanted.pairs.len();
                wanted.index.entry((item.resource_id, claim.span)).or_insert_with(|| {
                    wanted.pairs.push((item.resource_id, claim.span, target.exclusive));
                    next
                });
            }
        }
        wanted
    }

    /// Reads the claims of every pair, lapsed ones included (until the sweep releases them),
    /// in one statement, each range starting at `span start - the longest claim the resource
    /// ever had` (`claim_longest`). Each pair is looked up on its own (`LATERAL … OFFSET 0`
    /// keeps the planner from flattening it): with a few hundred pairs it otherwise prefers a
    /// hash join over a whole-table scan of `claim_totals`, milliseconds per batch and growing.
    async fn read(&self, conn: &mut PgConnection) -> Result<Live, sqlx::Error> {
        let mut live: Live = vec![Vec::new(); self.pairs.len()];
        if self.pairs.is_empty() {
            return Ok(live);
        }
        let (resources, starts, ends) = self.columns(|_| true);
        let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT w.n, t.block_start, t.block_end, t.quantity, t.expires_at
             FROM unnest($1::text[], $2::int8[], $3::int8[]) WITH ORDINALITY AS w(resource_id, span_start, span_end, n)
             LEFT JOIN claim_longest l ON l.resource_id = w.resource_id
             CROSS JOIN LATERAL (
               SELECT block_start, block_end, quantity, expires_at FROM claim_totals t
               WHERE t.resource_id = w.resource_id AND t.block_start < w.span_end
                 AND t.block_start > w.span_start - COALESCE(l.seconds, 0) AND t.block_end > w.span_start
               OFFSET 0) t",
        )
        .bind(&resources)
        .bind(&starts)
        .bind(&ends)
        .fetch_all(conn)
        .await?;
        for (n, start, end, quantity, expires_at) in rows {
            let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| live.get_mut(i)) else { continue };
            slot.extend(claim_of_row(start, end, quantity).map(|claim| (claim, expires_at)));
        }
        Ok(live)
    }

    /// Takes holds lapsed by `now` on exclusive pairs out of the exclusion constraint: it knows
    /// no time, so their rows would refuse a claim on the place they no longer hold. A statement
    /// only when `live` shows such a hold (after a burst of expiries, before the sweep). Only
    /// rows of the batch's locked resources are touched; their bookings are released by the
    /// sweep. A lapsed hold never comes back: later decisions run at `now` or later.
    async fn release_lapsed(&self, conn: &mut PgConnection, live: &Live, now: Timestamp) -> Result<(), sqlx::Error> {
        let lapsed = |i: usize| self.pairs[i].2 && live[i].iter().any(|(_, lapses)| *lapses <= now.as_second());
        let (resources, starts, ends) = self.columns(lapsed);
        if resources.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE claims SET exclusive = false
             WHERE item_id = ANY(ARRAY(
               SELECT c.item_id
               FROM unnest($1::text[], $2::int8[], $3::int8[]) AS w(resource_id, span_start, span_end)
               LEFT JOIN claim_longest l ON l.resource_id = w.resource_id
               CROSS JOIN LATERAL (
                 SELECT item_id FROM claims c
                 WHERE c.resource_id = w.resource_id AND c.block_start < w.span_end
                   AND c.block_start > w.span_start - COALESCE(l.seconds, 0) AND c.block_end > w.span_start
                   AND c.exclusive AND c.hold_expires_at <= $4
                 OFFSET 0) c))",
        )
        .bind(&resources)
        .bind(&starts)
        .bind(&ends)
        .bind(now.as_second())
        .execute(conn)
        .await
        .map(|_| ())
    }

    /// The pairs `keep` selects (by index) as column arrays for `unnest`.
    fn columns(&self, keep: impl Fn(usize) -> bool) -> (Vec<String>, Vec<i64>, Vec<i64>) {
        let chosen = self.pairs.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, pair)| pair);
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for (resource, span, _) in chosen {
            columns.0.push(resource.to_string());
            columns.1.push(span.start);
            columns.2.push(span.end);
        }
        columns
    }
}

/// Claims of the holds kept so far in this batch, per resource; claims on the same span are
/// summed (the rule only counts quantity per instant), so a hot resource stays a short list.
#[derive(Default)]
struct Taken(HashMap<ResourceId, Vec<Claim>>);

impl Taken {
    fn add(&mut self, claims: &[(ResourceId, Claim, bool)]) {
        for (resource, claim, _) in claims {
            let list = self.0.entry(*resource).or_default();
            match list.iter_mut().find(|c| c.span == claim.span) {
                Some(same) => same.quantity = same.quantity.saturating_add(claim.quantity),
                None => list.push(*claim),
            }
        }
    }

    fn of(&self, resource: ResourceId) -> &[Claim] {
        self.0.get(&resource).map_or(&[], Vec::as_slice)
    }
}

/// One hold's decision (I1 per item, I3 for the booking): the claims it takes, each with
/// whether the exclusion constraint guards it.
fn decide(
    command: &HoldCommand,
    now: Timestamp,
    targets: &HashMap<ResourceId, Target>,
    wanted: &Wanted,
    live: &Live,
    taken: &Taken,
) -> Result<Vec<(ResourceId, Claim, bool)>, HoldRefused> {
    let booking = &command.booking;
    let mut mine: Vec<(ResourceId, Claim, bool)> = Vec::with_capacity(booking.items.len());
    for (item_index, (item, claim)) in booking.items.iter().zip(&command.claims).enumerate() {
        let stale = HoldRefused::Stale { item_index };
        let Some(target) = targets.get(&item.resource_id) else { return Err(stale) };
        if target.venue_id != booking.venue_id {
            return Err(stale);
        }
        let Some(&pair) = wanted.index.get(&(item.resource_id, claim.span)) else { return Err(stale) };
        let mut existing: Vec<Claim> =
            live[pair].iter().filter(|(_, lapses)| *lapses > now.as_second()).map(|(c, _)| *c).collect();
        existing.extend_from_slice(taken.of(item.resource_id));
        existing.extend(mine.iter().filter(|(r, _, _)| *r == item.resource_id).map(|(_, c, _)| *c));
        if let Err(shortfall) = capacity::check_claim(&target.rules, &existing, *claim) {
            return Err(HoldRefused::Unavailable { item_index, remaining: shortfall.remaining });
        }
        mine.push((item.resource_id, *claim, target.exclusive));
    }
    Ok(mine)
}

/// The claims, bookings and outbox rows of a batch's kept holds in one statement, `$on_conflict`
/// applying to the claims.
macro_rules! insert_holds {
    ($on_conflict:literal) => {
        concat!(
            "WITH claimed AS (
               INSERT INTO claims
                 (item_id, booking_id, resource_id, venue_id, block_start, block_end, quantity, hold_expires_at, exclusive)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[],
                                    $8::int8[], $9::bool[]) ",
            $on_conflict,
            " RETURNING 1),
             booked AS (
               INSERT INTO bookings (id, customer_id, venue_id, status, expires_at, doc)
               SELECT id, customer_id, venue_id, status, expires_at, doc::json
               FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::int8[], $15::text[])
                 AS b(id, customer_id, venue_id, status, expires_at, doc)
               RETURNING id, doc),
             announced AS (
               INSERT INTO outbox (topic, aggregate_id, payload, created_at)
               SELECT 'booking.held', b.id, b.doc, o.created_at
               FROM booked b JOIN unnest($10::text[], $16::int8[]) AS o(id, created_at) ON o.id = b.id
               RETURNING 1)
             SELECT count(*) FROM claimed"
        )
    };
}

/// The rows of every kept hold, as column arrays for one `unnest` insert: one statement (and one
/// prepared plan) whatever the batch's size, and no limit on bind parameters.
#[derive(Default)]
struct HoldRows {
    item_ids: Vec<String>,
    claim_bookings: Vec<String>,
    claim_resources: Vec<String>,
    claim_venues: Vec<String>,
    block_starts: Vec<i64>,
    block_ends: Vec<i64>,
    quantities: Vec<i64>,
    claim_expiries: Vec<Option<i64>>,
    exclusive: Vec<bool>,
    booking_ids: Vec<String>,
    customers: Vec<String>,
    venues: Vec<String>,
    statuses: Vec<&'static str>,
    expiries: Vec<Option<i64>>,
    docs: Vec<String>,
    created: Vec<i64>,
    /// Per booking: its index in the batch.
    batch_index: Vec<usize>,
    /// Per claim: its booking (index into `booking_ids`) and its item's index in that booking.
    claim_of: Vec<(usize, usize)>,
}

impl HoldRows {
    fn add(
        &mut self,
        index: usize,
        booking: &Booking,
        claims: &[(ResourceId, Claim, bool)],
        now: Timestamp,
    ) -> Result<(), sqlx::Error> {
        let doc = to_json(booking)?;
        let id = booking.id.to_string();
        let venue = booking.venue_id.to_string();
        let expires_at = booking.expires_at.map(|t| t.as_second());
        let row = self.booking_ids.len();
        for (item_index, (item, (resource, claim, exclusive))) in booking.items.iter().zip(claims).enumerate() {
            self.claim_of.push((row, item_index));
            self.item_ids.push(item.id.to_string());
            self.claim_bookings.push(id.clone());
            self.claim_resources.push(resource.to_string());
            self.claim_venues.push(venue.clone());
            self.block_starts.push(claim.span.start);
            self.block_ends.push(claim.span.end);
            self.quantities.push(i64::from(claim.quantity));
            self.claim_expiries.push(expires_at);
            self.exclusive.push(*exclusive);
        }
        self.batch_index.push(index);
        self.booking_ids.push(id);
        self.customers.push(booking.customer_id.to_string());
        self.venues.push(venue);
        self.statuses.push(booking.status.as_str());
        self.expiries.push(expires_at);
        self.docs.push(doc);
        self.created.push(now.as_second());
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.booking_ids.is_empty()
    }

    fn claims(&self) -> i64 {
        i64::try_from(self.item_ids.len()).unwrap_or(i64::MAX)
    }

    /// Writes every row in one statement and returns how many claims went in. With `skip`, a
    /// claim the exclusion constraint refuses is left out (`ON CONFLICT DO NOTHING`) instead of
    /// failing the statement; that checks the constraint twice per claim, so it is only the
    /// fallback.
    async fn write(&self, conn: &mut PgConnection, skip: bool) -> Result<i64, sqlx::Error> {
        let sql = if skip { insert_holds!("ON CONFLICT DO NOTHING") } else { insert_holds!("") };
        sqlx::query_scalar(sql)
            .bind(&self.item_ids)
            .bind(&self.claim_bookings)
            .bind(&self.claim_resources)
            .bind(&self.claim_venues)
            .bind(&self.block_starts)
            .bind(&self.block_ends)
            .bind(&self.quantities)
            .bind(&self.claim_expiries)
            .bind(&self.exclusive)
            .bind(&self.booking_ids)
            .bind(&self.customers)
            .bind(&self.venues)
            .bind(&self.statuses)
            .bind(&self.expiries)
            .bind(&self.docs)
            .bind(&self.created)
            .fetch_one(conn)
            .await
    }
}

/// The exclusion constraint refused a claim the core accepted: the second guard caught what the
/// first let through. The bookings missing a claim are removed again and refused (naming the
/// item refused), loudly; the rest of the batch stands.
async fn refuse_unwritten(
    conn: &mut PgConnection,
    rows: &HoldRows,
    results: &mut [Result<Booking, HoldRefused>],
) -> Result<(), sqlx::Error> {
    let missing: HashSet<String> = sqlx::query_scalar(
        "SELECT x.id FROM unnest($1::text[]) AS x(id) WHERE NOT EXISTS (SELECT 1 FROM claims c WHERE c.item_id = x.id)",
    )
    .bind(&rows.item_ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    // Per booking row, its first refused item.
    let mut refused: HashMap<usize, usize> = HashMap::new();
    for (item_id, &(row, item_index)) in rows.item_ids.iter().zip(&rows.claim_of) {
        if missing.contains(item_id) {
            refused.entry(row).or_insert(item_index);
        }
    }
    let ids: Vec<&str> = refused.keys().map(|&row| rows.booking_ids[row].as_str()).collect();
    sqlx::query(
        "WITH unclaimed AS (DELETE FROM claims WHERE booking_id = ANY($1)),
              unbooked AS (DELETE FROM bookings WHERE id = ANY($1))
         DELETE FROM outbox WHERE aggregate_id = ANY($1) AND topic = 'booking.held'",
    )
    .bind(&ids)
    .execute(&mut *conn)
    .await?;
    for (row, item_index) in refused {
        tracing::error!(booking = %rows.booking_ids[row], "exclusion constraint refused a claim the engine accepted");
        results[rows.batch_index[row]] = Err(HoldRefused::Unavailable { item_index, remaining: 0 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use allot_core::capacity::OverrideSpan;

    use super::*;

    #[test]
    fn exclusive_only_when_no_instant_allows_two() {
        assert!(is_exclusive(&CapacityRules::simple(1)));
        assert!(!is_exclusive(&CapacityRules::simple(2)));
        let overbooked = CapacityRules { capacity: 1, overbooking_percent: 100, overrides: Vec::new() };
        assert!(!is_exclusive(&overbooked));
        let small_overbooking = CapacityRules { capacity: 1, overbooking_percent: 50, overrides: Vec::new() };
        assert!(is_exclusive(&small_overbooking), "1 × 1.5 floors to 1");
        let raised = CapacityRules {
            capacity: 1,
            overbooking_percent: 0,
            overrides: vec![OverrideSpan { span: Span::new(0, 10), capacity: 2 }],
        };
        assert!(!is_exclusive(&raised));
    }

    #[test]
    fn claims_taken_on_one_span_are_summed() {
        let resource = ResourceId::new();
        let mut taken = Taken::default();
        let claim = |start, quantity| Claim { span: Span::new(start, start + 10), quantity };
        taken.add(&[(resource, claim(0, 1), false), (resource, claim(0, 2), false), (resource, claim(5, 1), false)]);
        assert_eq!(taken.of(resource), &[claim(0, 3), claim(5, 1)]);
        assert!(taken.of(ResourceId::new()).is_empty());
    }
}
