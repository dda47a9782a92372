//! The storage port: everything the use cases need from a database.
//!
//! Implemented by `allot-store` (SQLite now, PostgreSQL next). The capacity decision (I1) is
//! taken by the core's `capacity::check_claim`, which a store must call inside the same
//! transaction that inserts the claims, over the claims it read in that transaction.

use std::collections::HashMap;
use std::sync::Arc;

use allot_core::booking::{Booking, BookingStatus};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{ApiKeyId, BookingId, EventId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use async_trait::async_trait;
use jiff::Timestamp;

use crate::access::{ApiKey, RoleGrant, RoleRevoke};
use crate::audit::{AuditEvent, AuditFilter, AuditPage};
use crate::error::{AppError, StoreError};

/// Page size limit for every list.
pub const PAGE_LIMIT_MAX: u32 = 100;
pub const PAGE_LIMIT_DEFAULT: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Customer,
    Manager,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Manager => "manager",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Role::Customer, Role::Manager, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub password_hash: String,
    pub roles: Vec<Role>,
    /// Venues this user manages (meaningful with the manager role).
    pub venues: Vec<VenueId>,
    pub created_at: Timestamp,
}

/// Written by hand so that a logged user never shows its password hash.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("roles", &self.roles)
            .field("venues", &self.venues)
            .field("created_at", &self.created_at)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    /// SHA-256 of the token; the token itself is never stored.
    pub token_hash: String,
    pub user_id: UserId,
    pub family_id: String,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    Rotated {
        user_id: UserId,
    },
    /// An already-used token came back: its whole family is now revoked.
    Reused,
    Invalid,
}

/// A list position: the id of the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<uuid::Uuid>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_after: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookingFilter {
    pub customer_id: Option<UserId>,
    /// Restrict to these venues (a manager's); `None` means any.
    pub venue_ids: Option<Vec<VenueId>>,
    pub venue_id: Option<VenueId>,
    pub status: Option<BookingStatus>,
}

/// How long a refund owed waits before the reconciler ([`crate::refunds`]) first makes it: the
/// request that owes it is making it meanwhile, and the provider's idempotency key makes a race
/// harmless, not free.
pub const REFUND_GRACE_SECONDS: i64 = 60;

/// Why money may be owed back on a payment ([`RefundDue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefundKind {
    /// A cancelled booking's refund ([`Booking::refund_owed`]), not yet made. A store queues it
    /// in the transaction that records the cancellation and drops it in the one that records
    /// the refund's reference, so one is queued exactly while it is owed.
    Cancellation,
    /// A charge its booking may not record: the write that records it failed, or the hold ended
    /// first and the refund made there failed. Owed whole unless the booking records it.
    Unrecorded,
}

impl RefundKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundKind::Cancellation => "cancellation",
            RefundKind::Unrecorded => "unrecorded",
        }
    }

    pub fn parse(s: &str) -> Option<RefundKind> {
        [RefundKind::Cancellation, RefundKind::Unrecorded].into_iter().find(|k| k.as_str() == s)
    }
}

/// A refund that may be owed, kept until it is made or found not owed: one per payment
/// reference and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundDue {
    pub kind: RefundKind,
    pub payment_reference: String,
    pub booking_id: BookingId,
    /// In the booking's currency's minor units, as the payment's.
    pub amount: i64,
    /// Attempts that failed (at the provider, or recording what it did).
    pub attempts: u32,
    /// Not tried before then.
    pub next_at: Timestamp,
}

/// A fully priced hold, ready to be claimed atomically (I3).
#[derive(Debug, Clone)]
pub struct HoldCommand {
    pub booking: Booking,
    /// Per item, in the booking's item order: the span blocked (buffers included) and quantity.
    pub claims: Vec<Claim>,
    pub now: Timestamp,
}

/// Why a hold was refused by the store.
#[derive(Debug)]
pub enum HoldRefused {
    Unavailable {
        item_index: usize,
        remaining: u32,
    },
    /// A resource vanished or changed between validation and the transaction.
    Stale {
        item_index: usize,
    },
    Store(StoreError),
}

impl HoldRefused {
    /// The stable code a refused hold is answered with (its `AppError`'s, as in
    /// [`crate::telemetry::outcome`] and the API), recorded as the failed attempt's audit
    /// reason by the transaction that refused it; `None` for a store failure, whose outcome the
    /// request settles later.
    pub fn audit_reason(&self) -> Option<&'static str> {
        match self {
            HoldRefused::Unavailable { .. } => Some("unavailable"),
            HoldRefused::Stale { .. } => Some("conflict"),
            HoldRefused::Store(_) => None,
        }
    }
}

/// A hold run under its request's `Idempotency-Key` ([`Store::hold_keyed`]): the key is taken,
/// the hold decided and `answer`'s rendering of it stored as the key's answer, all in one
/// transaction, so a keyed hold costs one commit where admitting, running and answering it
/// cost three, and a retry always finds the answer of a hold that was kept.
pub struct HoldKey {
    pub key: IdempotencyKey,
    pub now: Timestamp,
    pub lock_seconds: u32,
    pub answer: HoldAnswer,
}

impl std::fmt::Debug for HoldKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldKey").field("key", &self.key).field("now", &self.now).finish_non_exhaustive()
    }
}

/// Renders a decided hold (kept, or refused for want of capacity) as the answer its request
/// gets, inside the store's transaction. Never called with [`HoldRefused::Store`].
pub type HoldAnswer = Box<dyn FnOnce(Result<&Booking, &HoldRefused>) -> StoredAnswer + Send>;

/// A response as stored for replay: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What [`Store::hold_keyed`] did.
// Moved a few times per hold; boxing the common variant would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum KeyedHoldOutcome {
    /// The key was taken and the hold decided: `result`, whose `answer` is stored as the key's.
    Ran { result: Result<Booking, HoldRefused>, answer: StoredAnswer },
    /// The key was not free (answered, running, or another request's): nothing was written.
    NotRun(IdempotencyBegin),
}

/// Decides a booking's new state from its current one, inside the store's transaction, at
/// the transaction's `now` (never earlier than the `now` of any write committed before it).
pub type Decide = Box<dyn FnOnce(&Booking, Timestamp) -> Result<Booking, AppError> + Send>;

#[derive(Debug)]
pub enum UpdateRefused {
    NotFound,
    Rejected(AppError),
    Store(StoreError),
}

/// Seat status of an event, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatState {
    Held,
    Booked,
}

/// The taken seats of an event at some `now`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeatStates {
    pub states: HashMap<ResourceId, SeatState>,
    /// The earliest expiry among the holds counted (whole seconds): from then on, without any
    /// write, the same read shows a seat freed.
    pub until: Option<Timestamp>,
}

impl SeatStates {
    /// Adds a seat taken by a booking, `confirmed` or a hold lapsing at `hold_expires_at`:
    /// booked wins over held.
    pub fn add(&mut self, seat: ResourceId, confirmed: bool, hold_expires_at: Option<Timestamp>) {
        let state = if confirmed { SeatState::Booked } else { SeatState::Held };
        let entry = self.states.entry(seat).or_insert(state);
        if state == SeatState::Booked {
            *entry = SeatState::Booked;
        }
        if let Some(at) = hold_expires_at {
            self.until = Some(self.until.map_or(at, |u| u.min(at)));
        }
    }
}

/// What a store can say about changes it made: equal versions of the same seats mean no
/// committed write touched their claims in between (see [`Store::seat_version`]).
pub type SeatVersion = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new, or its last attempt died before changing anything: it is now locked for
    /// this attempt ([`IdempotencyKey::owner`]).
    Started,
    InProgress,
    Completed {
        request_hash: String,
        status: u16,
        body: Vec<u8>,
    },
    /// An earlier attempt's change committed ([`IdempotencyMark`]) but its answer was never
    /// stored (its node died, or the store refused the answer for good): the key is now locked
    /// for this attempt, which must answer from `target` as it now is instead of running again.
    Recover {
        request_hash: String,
        target: String,
    },
    /// Same key, different request.
    Mismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub principal: String,
    pub key: String,
    pub request_hash: String,
    /// Which attempt holds the key: a token of its own per request. Only the holder renews,
    /// completes or releases it, so an attempt whose lease ran out cannot overwrite the
    /// outcome of the one that took over.
    pub owner: String,
}

/// Written in the transaction of a keyed request's first kept, successful change: the key's
/// request has changed `target`, so a retry must never run it again ([`IdempotencyBegin::Recover`]).
/// Only while attempt `owner` still holds the key: an attempt whose key was taken over (it
/// stalled past its lease, and a retry ran the request) must not commit its change as well,
/// so a mark that finds another owner fails its whole batch as busy ([`StoreError::Busy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyMark {
    pub principal: String,
    pub key: String,
    pub owner: String,
    pub target: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the database answers and every migration this build embeds is applied (`/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;

    // Users and sessions.
    async fn insert_user(&self, user: &User) -> Result<(), StoreError>;
    async fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError>;
    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError>;
    async fn set_manager(&self, venue_id: VenueId, user_id: UserId) -> Result<(), StoreError>;
    async fn insert_refresh_token(&self, token: &RefreshToken) -> Result<(), StoreError>;
    /// Marks `old_hash` used and stores `new_hash` in its family, for the same user.
    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError>;
    /// Replaces `lost_hash`, a live token whose secret should never have reached anyone (the
    /// answer of the request that issued it was lost), with `new_hash` in its family, for the
    /// same user. The lost token is marked used, as by a rotation: if it did reach someone
    /// after all (an answer sent but not stored), presenting it revokes the family, the new
    /// token too. `Invalid` if it is no longer live (used, revoked, expired, unknown): then
    /// nothing changes.
    async fn reissue_refresh_token(
        &self,
        lost_hash: &str,
        new_hash: &str,
        new_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<RotateOutcome, StoreError>;
    async fn revoke_refresh_token(&self, token_hash: &str, now: Timestamp) -> Result<(), StoreError>;
    /// Returns the stored value of `key`, storing `value` first if there was none.
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String, StoreError>;
    async fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// The value of setting `key`, if it is set (a read only).
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    // Catalogue.
    async fn insert_venue(&self, venue: &Venue) -> Result<(), StoreError>;
    /// Replaces the live venue `before` with `after` (the same id), in one write that first
    /// checks that what is stored still equals `before`: `Changed` if another change came in
    /// between (nothing written), `NotFound` if it is gone. Cached copies may be stale
    /// (another node's change, a concurrent request), so an edit is never written over them.
    async fn update_venue(&self, before: &Venue, after: &Venue) -> Result<(), StoreError>;
    /// Refuses (Conflict) while the venue has bookings that claim capacity. `Changed` if its
    /// resources kept changing while it tried (several nodes creating them): try again.
    async fn delete_venue(&self, id: VenueId, now: Timestamp) -> Result<(), StoreError>;
    /// Catalogue documents come shared (`Arc`): they are cached, and a hold reads three of them.
    async fn venue(&self, id: VenueId) -> Result<Option<Arc<Venue>>, StoreError>;
    async fn venues(&self, page: PageRequest) -> Result<Page<Venue>, StoreError>;
    /// `NotFound` if its venue is deleted (whatever the caller read before), as for an event.
    async fn insert_resource(&self, resource: &Resource) -> Result<(), StoreError>;
    /// As [`Store::update_venue`], for a resource.
    async fn update_resource(&self, before: &Resource, after: &Resource) -> Result<(), StoreError>;
    async fn delete_resource(&self, id: ResourceId, now: Timestamp) -> Result<(), StoreError>;
    async fn resource(&self, id: ResourceId) -> Result<Option<Arc<Resource>>, StoreError>;
    /// The live resources among `ids` (missing ones are left out), in no particular order.
    async fn resources_by_ids(&self, ids: &[ResourceId]) -> Result<Vec<Resource>, StoreError>;
    async fn resources(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Resource>, StoreError>;
    async fn insert_event(&self, event: &Event) -> Result<(), StoreError>;
    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, StoreError>;
    async fn events(&self, venue_id: VenueId, page: PageRequest) -> Result<Page<Event>, StoreError>;
    /// Events that include `seat` and overlap `span`, in start order (at most `limit`).
    async fn events_of_seat(&self, seat: ResourceId, span: Span, limit: u32) -> Result<Vec<Event>, StoreError>;

    // Capacity reads (availability, seat maps).
    /// Claims on `resource` overlapping `span` that count at `now` (held unexpired, pending, confirmed);
    /// claims of the same block may come summed into one.
    async fn claims(&self, resource: ResourceId, span: Span, now: Timestamp) -> Result<Vec<Claim>, StoreError>;
    /// For each seat of `event` that is taken during the event's window, whether held or booked.
    async fn seat_states(&self, event: &Event, now: Timestamp) -> Result<SeatStates, StoreError>;
    /// A version of `seats` (their documents and what their claims count) that changes once
    /// any write changing them commits, before that write is acknowledged; read it before
    /// reading them. Releasing a lapsed hold need not move it: the hold stopped counting at its
    /// `expires_at`. `None` where this process cannot know every write (other nodes share the
    /// database).
    fn seat_version(&self, _seats: &[ResourceId]) -> Option<SeatVersion> {
        None
    }

    // Bookings.
    async fn hold(&self, command: HoldCommand) -> Result<Booking, HoldRefused>;
    /// [`Store::hold`] under an idempotency key, taken and answered in the hold's transaction
    /// ([`HoldKey`]). `Err` when that transaction failed (nothing of it kept, the key included)
    /// or its outcome is unknown (a COMMIT whose answer was lost: the hold and its answer may
    /// be kept): what the key holds afterwards tells. The hold is made even if the caller
    /// stops waiting once its key is taken: a retry is answered with it.
    async fn hold_keyed(&self, command: HoldCommand, key: HoldKey) -> Result<KeyedHoldOutcome, StoreError>;
    async fn update_booking(&self, id: BookingId, now: Timestamp, decide: Decide) -> Result<Booking, UpdateRefused>;
    async fn booking(&self, id: BookingId) -> Result<Option<Booking>, StoreError>;
    async fn bookings(&self, filter: &BookingFilter, page: PageRequest) -> Result<Page<Booking>, StoreError>;
    /// Marks up to `limit` holds with `expires_at <= now` expired, releasing their capacity.
    /// It may release fewer and leave the rest to the next call; it releases none only when
    /// none is due.
    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<BookingId>, StoreError>;
    /// Deletes the claim rows of up to `limit` bookings `expire_due` released by `now`: how many
    /// bookings' claims it deleted. A store may leave a released hold's claims in place, since
    /// from its `expires_at` they count for nothing, so that a storm of lapsed holds is
    /// released sooner; this removes them later. It may delete fewer than asked; none only
    /// when none is left. The default is for stores that delete them on release.
    async fn purge_released_claims(&self, _now: Timestamp, _limit: u32) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// Up to `limit` bookings waiting for an asynchronous payment (`pending_payment`), the
    /// soonest to lapse first.
    async fn pending_payments(&self, limit: u32) -> Result<Vec<BookingId>, StoreError>;
    /// The soonest `limit` hold expiries, for the expiry scheduler.
    async fn upcoming_expiries(&self, limit: u32) -> Result<Vec<(BookingId, Timestamp)>, StoreError>;

    // Refunds owed ([`RefundDue`]; cancellations' are queued by `update_booking`).
    /// Queues `due`, unless one of its kind is queued for its payment already.
    async fn queue_refund(&self, due: &RefundDue) -> Result<(), StoreError>;
    /// Up to `limit` refunds whose `next_at` has come by `now`, with fewer than `attempts_max`
    /// attempts, soonest first.
    async fn refunds_due(&self, now: Timestamp, attempts_max: u32, limit: u32) -> Result<Vec<RefundDue>, StoreError>;
    /// The refunds queued for `payment_reference` (one of each kind at most), parked or not.
    async fn refunds_of_payment(&self, payment_reference: &str) -> Result<Vec<RefundDue>, StoreError>;
    /// [`Store::refunds_due`] for the reconciler: each refund returned is leased in the same
    /// write (its `next_at` moved to `lease_until`, as returned), so a sweep of another node
    /// skips it while this one settles it, and takes it again once the lease ends if this one
    /// died first.
    async fn claim_refunds_due(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        attempts_max: u32,
        limit: u32,
    ) -> Result<Vec<RefundDue>, StoreError>;
    /// Sets the attempts and the next time of a queued refund; with `leased_until`, only while
    /// its lease is still that one ([`Store::claim_refunds_due`]): a sweep that outlived its
    /// lease leaves the refund to the sweep that took it over.
    async fn reschedule_refund(
        &self,
        kind: RefundKind,
        payment_reference: &str,
        attempts: u32,
        next_at: Timestamp,
        leased_until: Option<Timestamp>,
    ) -> Result<(), StoreError>;
    /// Drops a queued refund (made, or found not owed).
    async fn drop_refund(&self, kind: RefundKind, payment_reference: &str) -> Result<(), StoreError>;

    // Idempotency (I4).
    async fn idempotency_begin(
        &self,
        key: &IdempotencyKey,
        now: Timestamp,
        lock_seconds: u32,
    ) -> Result<IdempotencyBegin, StoreError>;
    /// Stores the answer to `key`'s request, if `key.owner` still holds the key.
    async fn idempotency_complete(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> Result<(), StoreError>;
    /// Releases `key` for a retry, if `key.owner` still holds it: deleted when its request
    /// changed nothing, unlocked (to be recovered) when it did.
    async fn idempotency_abandon(&self, key: &IdempotencyKey) -> Result<(), StoreError>;
    /// Extends `key.owner`'s lease on `key` to `locked_until`; false when it no longer holds it.
    async fn idempotency_renew(&self, key: &IdempotencyKey, locked_until: Timestamp) -> Result<bool, StoreError>;
    /// Deletes keys created before `before`; returns how many.
    async fn idempotency_cleanup(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError>;

    // Roles and partner API keys (`access`).
    /// Adds the role (a manager's on its venue) and returns the user as it now is.
    async fn grant_role(&self, user_id: UserId, grant: RoleGrant) -> Result<User, StoreError>;
    /// Removes the role; a manager losing their last venue loses the manager role. Refuses
    /// (`Conflict`, [`crate::access::LAST_ADMIN`]) to leave no admin, even under concurrency.
    async fn revoke_role(&self, user_id: UserId, revoke: RoleRevoke) -> Result<User, StoreError>;
    async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError>;
    /// The unrevoked key whose SHA-256 digest is `key_hash`.
    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>, StoreError>;
    /// All keys, revoked ones too, in creation order.
    async fn api_keys(&self, page: PageRequest) -> Result<Page<ApiKey>, StoreError>;
    /// Marks the key revoked (a second revocation keeps the first time); `NotFound` if unknown.
    async fn revoke_api_key(&self, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError>;

    // Audit trail (append-only hash chain; see `crate::audit`).
    /// Appends an event on its own (an attempt that changed nothing), after the chain's head.
    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    async fn audit_range(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError>;
    /// `(seq, hash)` of the chain's last event; `(0, GENESIS_HASH)` while it is empty.
    async fn audit_head(&self) -> Result<(u64, String), StoreError>;
    /// Events matching `filter`, newest first, at most `page.limit`.
    async fn audit_events(&self, filter: &AuditFilter, page: AuditPage) -> Result<Vec<AuditEvent>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_debug_output_hides_its_password_hash() {
        let user = User {
            id: UserId::new(),
            email: "a@b.c".into(),
            name: "A".into(),
            password_hash: "$argon2id$v=19$secret-hash".into(),
            roles: vec![Role::Customer],
            venues: Vec::new(),
            created_at: Timestamp::UNIX_EPOCH,
        };
        let shown = format!("{user:?}");
        assert!(!shown.contains("argon2") && shown.contains("<redacted>") && shown.contains("a@b.c"), "{shown}");
    }
}
