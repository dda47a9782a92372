//! The storage conformance suite: every test body is written once against the `Store` port and
//! runs on both backends, as `sqlite::<name>` and `postgres::<name>`.
//!
//! Each test gets a fresh store (a new SQLite file, or a new PostgreSQL database made by
//! `allot_store::testing::fresh_postgres_database`, dropped at the end). Time is never read
//! from a clock: every call passes `now` explicitly, non-decreasing within a test (the stores
//! keep their transaction clock monotonic), so the suite is deterministic and never sleeps.
//!
//! Without a reachable PostgreSQL the `postgres::` tests are skipped, except under `CI`, where
//! `fresh_postgres_database` fails them.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;

use allot_app::AppError;
use allot_app::store::{Decide, HoldCommand, HoldRefused, Page, PageRequest, Role, Store, UpdateRefused, User};
use allot_core::booking::{Booking, BookingItem, BookingStatus, Transition, TransitionError};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{BookingId, EventId, ItemId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Currency, Event, Location, Resource, ResourceRules, Venue, VenuePolicies};
use allot_core::time_model::{FreeModel, TimeModel};
use allot_store::testing::{drop_postgres_database, fresh_postgres_database};
use allot_store::{PgStore, SqliteStore};
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;

#[path = "conformance/access.rs"]
mod access;
#[path = "conformance/audit.rs"]
mod audit;
#[path = "conformance/bookings.rs"]
mod bookings;
#[path = "conformance/catalogue.rs"]
mod catalogue;
#[path = "conformance/concurrency.rs"]
mod concurrency;
#[path = "conformance/expiry.rs"]
mod expiry;
#[path = "conformance/holds.rs"]
mod holds;
#[path = "conformance/idempotency.rs"]
mod idempotency;
#[path = "conformance/model.rs"]
mod model;
#[path = "conformance/seats.rs"]
mod seats;
#[path = "conformance/users.rs"]
mod users;

// ---------------------------------------------------------------------------------------------
// Backends and the test macro.
// ---------------------------------------------------------------------------------------------

/// The store under test, with the backend-specific extras (row counts, clean-up).
pub enum Backend {
    Sqlite { store: Arc<SqliteStore>, dir: PathBuf },
    Postgres { store: Arc<PgStore>, url: String },
}

impl Backend {
    pub async fn sqlite() -> Backend {
        Self::sqlite_with(|_| {}).await
    }

    /// A fresh SQLite store, set up by `configure` before use.
    pub async fn sqlite_with(configure: impl FnOnce(&mut SqliteStore)) -> Backend {
        let dir = std::env::temp_dir().join(format!("allot-conformance-{}", uuid::Uuid::now_v7().as_simple()));
        let url = format!("sqlite://{}/allot.db", dir.display());
        let mut store = SqliteStore::open(&url).await.unwrap();
        configure(&mut store);
        Backend::Sqlite { store: Arc::new(store), dir }
    }

    /// `None` when PostgreSQL is not reachable and not required (outside CI).
    pub async fn postgres() -> Option<Backend> {
        let url = fresh_postgres_database().await?;
        let store = match PgStore::open(&url).await {
            Ok(s) => s,
            Err(e) => {
                drop_postgres_database(&url).await;
                panic!("opening {url}: {e}");
            }
        };
        Some(Backend::Postgres { store: Arc::new(store), url })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite { store, .. } => store.clone(),
            Backend::Postgres { store, .. } => store.clone(),
        }
    }

    /// `SELECT COUNT(*) FROM table WHERE where_clause` (portable SQL only).
    pub async fn count(&self, table: &str, where_clause: &str) -> i64 {
        let n = match self {
            Backend::Sqlite { store, .. } => store.count(table, where_clause).await,
            Backend::Postgres { store, .. } => store.count(table, where_clause).await,
        };
        n.unwrap_or_else(|e| panic!("count {table} where {where_clause}: {e}"))
    }

    /// Purges the claims of released holds until none is left (`purge_released_claims`), as
    /// the app's expiry loop does once nothing is due.
    pub async fn purge_released(&self, now: Timestamp) {
        let store = self.store();
        while store.purge_released_claims(now, 1000).await.unwrap() > 0 {}
    }

    /// Runs `sql` on a connection of its own, outside the store: what an operator (or an
    /// attacker) with database access could do.
    pub async fn raw(&self, sql: &str) -> Result<(), sqlx::Error> {
        use sqlx::{Connection, Executor};
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Backend::Sqlite { dir, .. } => {
                let url = format!("sqlite://{}/allot.db", dir.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await?;
                conn.execute(sql).await.map(|_| ())
            }
            Backend::Postgres { url, .. } => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                conn.execute(sql).await.map(|_| ())
            }
        }
    }

    async fn finish(self) {
        match self {
            Backend::Sqlite { store, dir } => {
                drop(store);
                let _ = std::fs::remove_dir_all(dir);
            }
            Backend::Postgres { store, url } => {
                drop(store);
                drop_postgres_database(&url).await;
            }
        }
    }
}

pub type TestFn = for<'a> fn(&'a Backend) -> BoxFuture<'a, ()>;

/// Runs one test body, then cleans up the backend whether or not the body panicked.
pub async fn run(backend: Backend, test: TestFn) {
    let outcome = AssertUnwindSafe(test(&backend)).catch_unwind().await;
    backend.finish().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

macro_rules! conformance {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::Backend::sqlite().await;
                    crate::run(backend, |b| Box::pin(crate::$module::$name(b))).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(backend) = crate::Backend::postgres().await else { return };
                    crate::run(backend, |b| Box::pin(crate::$module::$name(b))).await;
                }
            )*
        }
    };
}

conformance! {
    audit::chain_appends_in_order_and_verifies,
    audit::list_filters_and_pages_newest_first,
    audit::an_attempt_is_recorded_in_the_transaction_of_its_change_or_on_its_own,
    audit::concurrent_appends_form_one_chain,
    audit::a_burst_of_appends_lands_whole_in_one_chain,
    audit::events_are_append_only,
    audit::an_edited_event_breaks_the_chain_there,
    audit::removed_events_break_the_chain,
    audit::rows_outside_the_chain_break_it,
    audit::verifying_a_live_chain_is_not_fooled_by_appends,
    users::users_insert_lookup_and_duplicate_email,
    users::set_manager_lists_venues,
    users::user_reads_see_each_committed_change,
    users::refresh_token_rotation_and_reuse_revokes_the_family,
    users::refresh_token_expiry_and_unknown_are_invalid,
    users::a_lost_refresh_token_is_reissued_once_and_never_passes_for_reuse,
    users::revoke_ends_the_whole_family,
    users::setting_or_insert_keeps_the_first_value_under_concurrency,
    users::set_setting_overwrites,
    users::concurrent_rotation_of_one_token_rotates_once,
    users::concurrent_inserts_of_one_email_one_wins,
    access::roles_are_granted_and_revoked,
    access::the_last_admin_keeps_the_role,
    access::admins_revoking_each_other_at_once_leave_one,
    access::api_keys_are_found_by_digest_listed_and_revoked,
    catalogue::venue_insert_get_update,
    catalogue::venue_insert_records_its_managers_with_it,
    catalogue::venues_cursor_paging_is_complete_and_ordered,
    catalogue::resources_paging_per_venue_and_soft_delete,
    catalogue::resources_by_ids_returns_live_ones_only,
    catalogue::events_insert_list_and_events_of_seat,
    catalogue::delete_resource_refuses_while_claimed,
    catalogue::delete_venue_refuses_while_claimed_and_hides_everything,
    catalogue::bookings_in_the_past_do_not_block_deletion,
    catalogue::nothing_is_created_under_a_deleted_venue,
    catalogue::a_venue_is_created_only_for_managers_who_still_hold_the_role,
    catalogue::lapsed_holds_do_not_block_deletion,
    holds::hold_inserts_claims_booking_and_outbox,
    holds::overlapping_hold_on_capacity_one_is_unavailable,
    holds::multi_item_hold_is_all_or_nothing,
    holds::items_of_one_hold_count_against_each_other,
    holds::hold_on_deleted_or_foreign_resource_is_stale,
    holds::holds_see_catalogue_changes_at_once,
    holds::a_hold_decided_late_keeps_its_whole_time_to_live,
    holds::capacity_n_takes_exactly_n_in_quantity,
    holds::adjacent_spans_do_not_conflict_buffers_do,
    holds::overbooking_and_capacity_overrides_in_the_venue_zone,
    holds::capacity_changes_between_one_and_more,
    concurrency::fifty_concurrent_holds_on_capacity_one_one_wins,
    concurrency::sixty_concurrent_holds_on_capacity_seven_seven_win,
    concurrency::concurrent_multi_item_holds_in_opposite_orders,
    concurrency::holds_kept_in_a_batch_survive_a_refused_neighbour,
    concurrency::a_hold_that_breaks_its_batch_undoes_the_batch_and_the_writer_goes_on,
    concurrency::concurrent_cancels_apply_once,
    concurrency::confirm_racing_expiry_is_decided_once,
    bookings::confirm_keeps_claims_and_clears_hold_expiry,
    bookings::cancel_releases_capacity,
    bookings::rejected_decision_changes_nothing,
    bookings::update_of_unknown_booking_is_not_found,
    bookings::a_decline_announces_itself_and_other_updates_nothing,
    bookings::confirm_at_or_after_expiry_is_rejected,
    bookings::bookings_filter_and_paging,
    bookings::a_cancellations_refund_is_queued_until_its_reference_is_recorded,
    bookings::a_refund_reported_failed_is_announced_and_parked_until_made_again,
    bookings::queued_refunds_are_listed_when_due_rescheduled_and_dropped,
    bookings::pending_payments_are_listed_soonest_to_lapse_first,
    bookings::due_refunds_are_leased_to_one_sweep_at_a_time,
    expiry::expired_hold_stops_counting_before_the_sweep,
    expiry::a_swept_hold_is_stored_and_announced_as_the_transition_makes_it,
    expiry::expire_due_flips_only_due_holds_in_order_and_respects_limit,
    expiry::expire_due_concurrently_releases_each_hold_once,
    expiry::a_storm_of_lapsed_holds_is_released_each_once_over_repeated_calls,
    expiry::pending_payment_counts_and_expires_like_a_hold,
    expiry::upcoming_expiries_are_ordered_and_only_expiring,
    seats::seat_states_held_vs_booked,
    seats::seat_versions_move_with_each_committed_write,
    seats::claims_lists_live_overlapping_claims_of_one_resource,
    idempotency::idempotency_begin_complete_replay,
    idempotency::idempotency_different_request_is_refused,
    idempotency::idempotency_lock_lease_expiry_allows_takeover,
    idempotency::idempotency_abandon_releases_only_unfinished_keys,
    idempotency::idempotency_cleanup_deletes_old_keys_only,
    idempotency::only_the_attempt_holding_a_key_renews_completes_or_releases_it,
    idempotency::a_kept_change_marks_its_key_and_a_retry_recovers_it_instead_of_running,
    idempotency::a_refused_failed_or_unkeyed_attempt_marks_nothing,
    idempotency::an_attempt_whose_key_was_taken_over_commits_nothing,
    idempotency::keys_begun_and_answered_together_come_out_as_one_by_one,
    idempotency::a_keyed_hold_takes_its_key_and_stores_its_answer_with_it,
    idempotency::a_keyed_hold_sent_many_times_at_once_is_made_once,
    model::random_operations_agree_with_reference_model,
}

/// SQLite only: the writer's expiry job runs chunk (100 holds) after chunk while its time budget
/// lasts...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_expiry_job_with_time_to_spare_releases_chunk_after_chunk() {
    let backend = Backend::sqlite_with(|s| s.set_expiry_job_budget(std::time::Duration::from_secs(600))).await;
    run(backend, |b| Box::pin(expiry::one_expiry_job_releases(b, 450, 450))).await;
}

/// ...and stops after the chunk that spends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_expiry_job_stops_after_the_chunk_that_spends_its_budget() {
    let backend = Backend::sqlite_with(|s| s.set_expiry_job_budget(std::time::Duration::ZERO)).await;
    run(backend, |b| Box::pin(expiry::one_expiry_job_releases(b, 450, 100))).await;
}

// ---------------------------------------------------------------------------------------------
// Fixtures.
// ---------------------------------------------------------------------------------------------

/// The suite's time origin (2033-05-18T03:33:20Z); tests use offsets from it.
pub const T0: i64 = 2_000_000_000;
pub const MINUTE: i64 = 60;
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 86_400;

/// `T0 + seconds`.
pub fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(T0 + seconds).unwrap()
}

/// `[T0 + start, T0 + end)`.
pub fn span(start: i64, end: i64) -> Span {
    Span::new(T0 + start, T0 + end)
}

/// A span around everything a test claims.
pub fn everything() -> Span {
    Span::new(T0 - 30 * DAY, T0 + 30 * DAY)
}

pub fn eur() -> Currency {
    Currency::try_from("EUR".to_owned()).unwrap()
}

pub fn venue_in(timezone: &str) -> Venue {
    let id = VenueId::new();
    Venue {
        id,
        name: format!("Venue {id}"),
        category: "studio".into(),
        location: Location { lat: 52.52, lon: 13.405 },
        address: "Alexanderplatz 1".into(),
        timezone: timezone.into(),
        currency: eur(),
        rating: 4.5,
        amenities: vec!["wifi".into()],
        policies: VenuePolicies::default(),
        managers: vec![],
    }
}

/// A `free` resource (any interval) of `capacity` units, no rules.
pub fn free_resource(venue_id: VenueId, capacity: u32) -> Resource {
    let id = ResourceId::new();
    Resource {
        id,
        venue_id,
        name: format!("Room {id}"),
        capacity,
        unit_price: 1000,
        attributes: r#"{"floor":1}"#.into(),
        price_category: None,
        time_model: TimeModel::Free(FreeModel {
            step_minutes: 1,
            min_minutes: 1,
            max_minutes: 24 * 60,
            schedule: None,
        }),
        rules: ResourceRules::default(),
    }
}

/// A seat: an `events` resource of capacity 1.
pub fn seat(venue_id: VenueId, label: &str) -> Resource {
    Resource {
        id: ResourceId::new(),
        venue_id,
        name: format!("Seat {label}"),
        capacity: 1,
        unit_price: 0,
        attributes: format!(r#"{{"seat":"{label}"}}"#),
        price_category: Some("standard".into()),
        time_model: TimeModel::Events,
        rules: ResourceRules::default(),
    }
}

pub fn event(venue_id: VenueId, start: i64, end: i64, seats: &[ResourceId]) -> Event {
    Event {
        id: EventId::new(),
        venue_id,
        name: format!("Show at {start}"),
        start: at(start),
        end: at(end),
        seat_ids: seats.to_vec(),
        price_categories: BTreeMap::from([("standard".to_owned(), 1500)]),
    }
}

pub fn user(email: &str, roles: Vec<Role>) -> User {
    User {
        id: UserId::new(),
        email: email.to_owned(),
        name: "Test User".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        roles,
        venues: vec![],
        created_at: at(0),
    }
}

/// One requested item: `quantity` units of `resource` over `span` (buffers already included,
/// so the item's own times equal the blocked span).
pub type Want = (ResourceId, Span, u32);

pub fn hold_command(venue_id: VenueId, customer: UserId, wants: &[Want], now: Timestamp, ttl: i64) -> HoldCommand {
    let items: Vec<BookingItem> = wants
        .iter()
        .map(|&(resource_id, span, quantity)| BookingItem {
            id: ItemId::new(),
            resource_id,
            event_id: None,
            start: Timestamp::from_second(span.start).unwrap(),
            end: Timestamp::from_second(span.end).unwrap(),
            quantity,
            unit_price: 100,
            price: 100 * i64::from(quantity),
        })
        .collect();
    let expires_at = Timestamp::from_second(now.as_second() + ttl).unwrap();
    let booking = Booking::new_hold(customer, venue_id, eur(), items, now, expires_at);
    let claims = wants.iter().map(|&(_, span, quantity)| Claim { span, quantity }).collect();
    HoldCommand { booking, claims, now }
}

/// A decision that applies `t` through the core's state machine, as the app's use cases do.
pub fn decide(t: Transition) -> Decide {
    Box::new(move |b: &Booking, now| {
        let mut next = b.clone();
        next.status = b.next_status(t, now).map_err(|e| match e {
            TransitionError::HoldExpired => AppError::HoldExpired,
            other => AppError::Conflict(other.to_string()),
        })?;
        if next.status == BookingStatus::Confirmed {
            next.expires_at = None;
        }
        Ok(next)
    })
}

/// A venue (in UTC) and a customer, inserted, with helpers for the common operations.
pub struct World {
    pub store: Arc<dyn Store>,
    pub venue: Venue,
    pub customer: UserId,
}

impl World {
    pub async fn new(b: &Backend) -> World {
        Self::in_zone(b, "UTC").await
    }

    pub async fn in_zone(b: &Backend, timezone: &str) -> World {
        let store = b.store();
        let venue = venue_in(timezone);
        store.insert_venue(&venue).await.unwrap();
        let customer = user(&format!("{}@customers.test", UserId::new()), vec![Role::Customer]);
        store.insert_user(&customer).await.unwrap();
        World { store, venue, customer: customer.id }
    }

    /// Inserts a `free` resource of `capacity` at this venue.
    pub async fn resource(&self, capacity: u32) -> Resource {
        let r = free_resource(self.venue.id, capacity);
        self.store.insert_resource(&r).await.unwrap();
        r
    }

    /// Writes `r` over the stored resource of its id, whatever that is now.
    pub async fn replace_resource(&self, r: &Resource) {
        let before = self.store.resource(r.id).await.unwrap().expect("a live resource");
        self.store.update_resource(&before, r).await.unwrap();
    }

    pub fn command(&self, wants: &[Want], now: Timestamp, ttl: i64) -> HoldCommand {
        hold_command(self.venue.id, self.customer, wants, now, ttl)
    }

    pub async fn hold(&self, wants: &[Want], now: Timestamp, ttl: i64) -> Result<Booking, HoldRefused> {
        self.store.hold(self.command(wants, now, ttl)).await
    }

    /// Holds and expects success.
    pub async fn held(&self, wants: &[Want], now: Timestamp, ttl: i64) -> Booking {
        match self.hold(wants, now, ttl).await {
            Ok(b) => b,
            Err(e) => panic!("hold of {wants:?} at {now} refused: {e:?}"),
        }
    }

    pub async fn apply(&self, id: BookingId, t: Transition, now: Timestamp) -> Result<Booking, UpdateRefused> {
        self.store.update_booking(id, now, decide(t)).await
    }

    pub async fn confirm(&self, id: BookingId, now: Timestamp) -> Booking {
        self.apply(id, Transition::Confirm, now).await.unwrap_or_else(|e| panic!("confirm {id}: {e:?}"))
    }

    pub async fn cancel(&self, id: BookingId, now: Timestamp) -> Booking {
        self.apply(id, Transition::Cancel, now).await.unwrap_or_else(|e| panic!("cancel {id}: {e:?}"))
    }

    /// Total quantity of the claims on `resource` that count at `now`, whatever their time.
    pub async fn claimed(&self, resource: ResourceId, now: Timestamp) -> u32 {
        self.store.claims(resource, everything(), now).await.unwrap().iter().map(|c| c.quantity).sum()
    }
}

/// Collects every page of a cursor-paged list, checking the paging contract on the way:
/// no page over `limit`, `next_after` is the last id of a full page and absent on the last.
pub async fn all_pages<T, F, Fut>(limit: u32, id_of: impl Fn(&T) -> uuid::Uuid, mut fetch: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = Page<T>>,
{
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = fetch(PageRequest { after, limit }).await;
        assert!(page.items.len() <= limit as usize, "page of {} over limit {limit}", page.items.len());
        match page.next_after {
            Some(next) => {
                assert_eq!(page.items.len(), limit as usize, "a page with a successor is full");
                assert_eq!(Some(next), page.items.last().map(&id_of), "next_after is the last item's id");
                out.extend(page.items);
                after = Some(next);
            }
            None => {
                out.extend(page.items);
                return out;
            }
        }
    }
    panic!("paging does not end");
}

/// Quantity-weighted usage of `claims` at the instant `t`.
pub fn used_at(claims: &[Claim], t: i64) -> u32 {
    claims.iter().filter(|c| c.span.contains(t)).map(|c| c.quantity).sum()
}

/// The largest usage of `claims` at any instant (usage changes only at claim starts).
pub fn peak(claims: &[Claim]) -> u32 {
    claims.iter().map(|c| used_at(claims, c.span.start)).max().unwrap_or(0)
}
