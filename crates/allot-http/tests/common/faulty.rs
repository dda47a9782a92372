//! A store that fails on demand: the app's real store (SQLite or PostgreSQL) behind a wrapper
//! that makes chosen calls fail as the database would, for the paths that only a failing
//! store reaches, including a write that committed and answered an error (its answer lost).
//! Every other call goes through unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use allot_app::StoreError;
use allot_app::access::{ApiKey, RoleGrant, RoleRevoke};
use allot_app::audit::{AuditEvent, AuditFilter, AuditPage};
use allot_app::store::*;
use allot_core::booking::Booking;
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, EventId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use jiff::Timestamp;

/// What to fail next, shared with the test that arms it.
#[derive(Debug, Default)]
pub struct Faults {
    /// `user_by_id` calls still to fail as busy (how a request's principal is loaded).
    user_by_id_failures: AtomicU32,
    /// `update_booking` calls still to fail as busy (a payment's or a refund's record), once
    /// `update_booking_passing` more have gone through.
    update_booking_failures: AtomicU32,
    update_booking_passing: AtomicU32,
    /// `booking` reads still to fail as busy.
    booking_read_failures: AtomicU32,
    /// `update_booking` calls still to commit and then answer busy (the commit's answer lost),
    /// once `update_booking_answers_kept` more have answered as they should.
    update_booking_answers_lost: AtomicU32,
    update_booking_answers_kept: AtomicU32,
}

impl Faults {
    /// The next `n` reads of a user by id fail as busy.
    pub fn fail_user_reads(&self, n: u32) {
        self.user_by_id_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` booking updates fail as busy, changing nothing.
    pub fn fail_booking_updates(&self, n: u32) {
        self.fail_booking_updates_after(0, n);
    }

    /// [`Faults::fail_booking_updates`] once the next `passing` updates have gone through.
    pub fn fail_booking_updates_after(&self, passing: u32, n: u32) {
        self.update_booking_passing.store(passing, Ordering::SeqCst);
        self.update_booking_failures.store(n, Ordering::SeqCst);
    }

    fn booking_update(&self) -> Result<(), StoreError> {
        take_failure_after(&self.update_booking_passing, &self.update_booking_failures)
    }

    /// The next `n` booking updates commit, and then answer busy, as a write does whose
    /// commit's answer was lost (a connection cut after `COMMIT` was sent).
    pub fn lose_booking_update_answers(&self, n: u32) {
        self.lose_booking_update_answers_after(0, n);
    }

    /// [`Faults::lose_booking_update_answers`] once the next `kept` updates have answered.
    pub fn lose_booking_update_answers_after(&self, kept: u32, n: u32) {
        self.update_booking_answers_kept.store(kept, Ordering::SeqCst);
        self.update_booking_answers_lost.store(n, Ordering::SeqCst);
    }

    /// Whether a committed update's answer is lost (busy then).
    fn booking_update_answer(&self) -> Result<(), StoreError> {
        take_failure_after(&self.update_booking_answers_kept, &self.update_booking_answers_lost)
    }

    /// The next `n` reads of a booking by id fail as busy.
    pub fn fail_booking_reads(&self, n: u32) {
        self.booking_read_failures.store(n, Ordering::SeqCst);
    }

    fn user_by_id(&self) -> Result<(), StoreError> {
        take_failure(&self.user_by_id_failures)
    }
}

/// [`take_failure`] once `passing` calls (counted down while failures are armed) went through.
fn take_failure_after(passing: &AtomicU32, armed: &AtomicU32) -> Result<(), StoreError> {
    if armed.load(Ordering::SeqCst) == 0 || take_failure(passing).is_err() {
        return Ok(());
    }
    take_failure(armed)
}

/// Busy if `armed` counts a failure still to inject (one less then).
fn take_failure(armed: &AtomicU32) -> Result<(), StoreError> {
    match armed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => Err(StoreError::Busy("injected: the database is busy".into())),
        Err(_) => Ok(()),
    }
}

pub struct FaultyStore {
    pub inner: Arc<dyn Store>,
    pub faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl Store for FaultyStore {
    async fn ready(&self) -> Result<(), StoreError> {
        self.inner.ready().await
    }

    async fn insert_user(&self, user: &User) -> Result<(), StoreError> {
        self.inner.insert_user(user).await
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        self.inner.user_by_email(email).await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.faults.user_by_id()?;
        self.inner.user_by_id(id).await
    }

    async fn set_manager(&self, venue_id: VenueId, user_id: UserId) -> Result<(), StoreError> {
        self.inner.set_manager(venue_id, user_id).await
    }

    async fn insert_refresh_token(&self, token: &RefreshToken) -> Result<(), StoreError> {
        self.inner.insert_refresh_token(token).await
    }

    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError> {
        self.inner.rotate_refresh_token(old_hash, new_hash, new_expires_at, now).await
    }

    async fn reissue_refresh_token(
        &self,
        lost_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError> {
        self.inner.reissue_refresh_token(lost_hash, new_hash, new_expires_at, now).await
    }

    async fn revoke_refresh_token(&self, token_hash: &str, now: Timestamp) -> Result<(), StoreError> {
        self.inner.revoke_refresh_token(token_hash, now).await
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.inner.setting_or_insert(key, value).await
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_setting(key, value).await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.setting(key).await
    }

    async fn insert_venue(&self, venue: &Venue) -> Result<(), StoreError> {
        self.inner.insert_venue(venue).await
    }

    async fn update_venue(&self, before: &Venue, after: &Venue) -> Result<(), StoreError> {
        self.inner.update_venue(before, after).await
    }

    async fn delete_venue(&self, id: VenueId, now: Timestamp) -> Result<(), StoreError> {
        self.inner.delete_venue(id, now).await
    }

    async fn venue(&self, id: VenueId) -> Result<Option<Arc<Venue>>, StoreError> {
        self.inner.venue(id).await
    }

    async fn venues(&self, page: PageRequest) -> Result<Page<Venue>, StoreError> {
        self.inner.venues(page).await
    }

    async fn insert_resource(&self, resource: &Resource) -> Result<(), StoreError> {
        self.inner.insert_resource(resource).await
    }

    async fn update_resource(&self, before: &Resource, after: &Resource) -> Result<(), StoreError> {
        self.inner.update_resource(before, after).await
    }

    async fn delete_resource(&self, id: ResourceId, now: Timestamp) -> Result<(), StoreError> {
        self.inner.delete_resource(id, now).await
    }

    async fn resource(&self, id: ResourceId) -> Result<Option<Arc<Resource>>, StoreError> {
        self.inner.resource(id).await
    }

    async fn resources_by_ids(&self, ids: &[ResourceId]) -> Result<Vec<Resource>, StoreError> {
        self.inner.resources_by_ids(ids).await
    }

    async fn resources(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Resource>, StoreError> {
        self.inner.resources(venue_id, page).await
    }

    async fn insert_event(&self, event: &Event) -> Result<(), StoreError> {
        self.inner.insert_event(event).await
    }

    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, StoreError> {
        self.inner.event(id).await
    }

    async fn events(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Event>, StoreError> {
        self.inner.events(venue_id, page).await
    }

    async fn events_of_seat(&self, seat: ResourceId, span: Span, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.inner.events_of_seat(seat, span, limit).await
    }

    async fn claims(&self, resource: ResourceId, span: Span, now: Timestamp) -> Result<Vec<Claim>, StoreError> {
        self.inner.claims(resource, span, now).await
    }

    async fn seat_states(&self, event: &Event, now: Timestamp) -> Result<SeatStates, StoreError> {
        self.inner.seat_states(event, now).await
    }

    fn seat_version(&self, seats: &[ResourceId]) -> Option<SeatVersion> {
        self.inner.seat_version(seats)
    }

    async fn hold(&self, command: HoldCommand) -> Result<Booking, HoldRefused> {
        self.inner.hold(command).await
    }

    async fn hold_keyed(&self, command: HoldCommand, key: HoldKey) -> Result<KeyedHoldOutcome, StoreError> {
        self.inner.hold_keyed(command, key).await
    }

    async fn update_booking(&self, id: BookingId, now: Timestamp, decide: Decide) -> Result<Booking, UpdateRefused> {
        self.faults.booking_update().map_err(UpdateRefused::Store)?;
        let updated = self.inner.update_booking(id, now, decide).await?;
        self.faults.booking_update_answer().map_err(UpdateRefused::Store)?;
        Ok(updated)
    }

    async fn booking(&self, id: BookingId) -> Result<Option<Booking>, StoreError> {
        take_failure(&self.faults.booking_read_failures)?;
        self.inner.booking(id).await
    }

    async fn bookings(&self, filter: &BookingFilter, page: PageRequest) -> Result<Page<Booking>, StoreError> {
        self.inner.bookings(filter, page).await
    }

    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        self.inner.expire_due(now, limit).await
    }

    async fn purge_released_claims(&self, now: Timestamp, limit: u32) -> Result<usize, StoreError> {
        self.inner.purge_released_claims(now, limit).await
    }

    async fn upcoming_expiries(&self, limit: u32) -> Result<Vec<(BookingId, Timestamp)>, StoreError> {
        self.inner.upcoming_expiries(limit).await
    }

    async fn idempotency_begin(
        &self,
        key: &IdempotencyKey,
        now: Timestamp,
        lock_seconds: u32,
    ) -> Result<IdempotencyBegin, StoreError> {
        self.inner.idempotency_begin(key, now, lock_seconds).await
    }

    async fn idempotency_complete(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> Result<(), StoreError> {
        self.inner.idempotency_complete(key, status, body).await
    }

    async fn idempotency_abandon(&self, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.inner.idempotency_abandon(key).await
    }

    async fn idempotency_renew(&self, key: &IdempotencyKey, locked_until: Timestamp) -> Result<bool, StoreError> {
        self.inner.idempotency_renew(key, locked_until).await
    }

    async fn idempotency_cleanup(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.inner.idempotency_cleanup(before, limit).await
    }

    async fn queue_refund(&self, due: &RefundDue) -> Result<(), StoreError> {
        self.inner.queue_refund(due).await
    }

    async fn refunds_due(&self, now: Timestamp, attempts_max: u32, limit: u32) -> Result<Vec<RefundDue>, StoreError> {
        self.inner.refunds_due(now, attempts_max, limit).await
    }

    async fn refunds_of_payment(&self, payment_reference: &str) -> Result<Vec<RefundDue>, StoreError> {
        self.inner.refunds_of_payment(payment_reference).await
    }

    async fn pending_payments(&self, limit: u32) -> Result<Vec<BookingId>, StoreError> {
        self.inner.pending_payments(limit).await
    }

    async fn claim_refunds_due(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        attempts_max: u32,
        limit: u32,
    ) -> Result<Vec<RefundDue>, StoreError> {
        self.inner.claim_refunds_due(now, lease_until, attempts_max, limit).await
    }

    async fn reschedule_refund(
        &self,
        kind: RefundKind,
        payment_reference: &str,
        attempts: u32,
        next_at: Timestamp,
        leased_until: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        self.inner.reschedule_refund(kind, payment_reference, attempts, next_at, leased_until).await
    }

    async fn drop_refund(&self, kind: RefundKind, payment_reference: &str) -> Result<(), StoreError> {
        self.inner.drop_refund(kind, payment_reference).await
    }

    async fn grant_role(&self, user_id: UserId, grant: RoleGrant) -> Result<User, StoreError> {
        self.inner.grant_role(user_id, grant).await
    }

    async fn revoke_role(&self, user_id: UserId, revoke: RoleRevoke) -> Result<User, StoreError> {
        self.inner.revoke_role(user_id, revoke).await
    }

    async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.inner.insert_api_key(key).await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        self.inner.api_key_by_hash(key_hash).await
    }

    async fn api_keys(&self, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        self.inner.api_keys(page).await
    }

    async fn revoke_api_key(&self, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError> {
        self.inner.revoke_api_key(id, now).await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.inner.append_audit(event).await
    }

    async fn audit_range(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.audit_range(after, limit).await
    }

    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        self.inner.audit_head().await
    }

    async fn audit_events(&self, filter: &AuditFilter, page: AuditPage) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.audit_events(filter, page).await
    }
}
