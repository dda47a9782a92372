//! Booking use cases: hold, confirm (with payment), cancel (with refund), read, expire.

use std::collections::HashMap;
use std::sync::Arc;

use allot_core::FieldErrors;
use allot_core::booking::{
    Booking, BookingItem, BookingStatus, ITEMS_MAX, PAYMENT_ATTEMPTS_MAX, Payment, Refund, Transition, TransitionError,
};
use allot_core::ids::{BookingId, ResourceId};
use allot_core::inventory::{Event, ItemRequest, Resource, Venue, price_item};
use jiff::{SignedDuration, Timestamp};

use crate::App;
use crate::access::Scope;
use crate::audit;
use crate::auth::Principal;
use crate::error::{AppError, AppResult, StoreError};
use crate::idempotency::{Admission, LOCK_SECONDS, check_key};
use crate::payments::{ChargeOutcome, ChargeRequest, PAYMENT_PENDING, PAYMENT_SUCCEEDED, ProviderError, RefundRequest};
use crate::store::{
    BookingFilter, HoldAnswer, HoldCommand, HoldKey, HoldRefused, IdempotencyKey, KeyedHoldOutcome, Page, PageRequest,
    Role, StoredAnswer, UpdateRefused,
};
use crate::telemetry;

/// Attempts at a provider that is failing before answering 503.
pub const PROVIDER_ATTEMPTS_MAX: u32 = 3;
pub const PROVIDER_BACKOFF_MS: u64 = 50;
pub const CANCEL_REASON_LEN_MAX: usize = 500;
/// Holds released per expiry transaction.
pub const EXPIRY_BATCH_MAX: u32 = 2_000;
/// Expiry jobs kept queued at the store at once. With one, the job waits behind the batch that
/// was already queued when the previous one committed, so a storm of lapsed holds got a slice
/// of every other batch; with two, one job is always queued and every batch has a slice
/// (`docs/benchmarks-history.md`). More would only queue more slices behind one another.
pub const EXPIRY_JOBS_IN_FLIGHT: usize = 2;

pub struct HoldRequest {
    pub items: Vec<ItemRequest>,
    pub coupon_code: Option<String>,
}

impl App {
    /// Claims every item for the principal, or none (I3). 409 `unavailable` names the item.
    pub async fn hold(&self, principal: &Principal, request: HoldRequest) -> AppResult<Booking> {
        let result = self.try_hold(principal, request).await;
        telemetry::count(telemetry::HOLDS, &result);
        result
    }

    async fn try_hold(&self, principal: &Principal, request: HoldRequest) -> AppResult<Booking> {
        let PreparedHold { command, refusals } = self.prepare_hold(principal, request).await?;
        let result = self.store.hold(command).await;
        self.held(result.map_err(|refused| refusals.error(&refused)))
    }

    /// [`App::hold`] under the request's idempotency `key`, taken and answered in the hold's
    /// own transaction ([`HoldKey`]): `render` makes the answer stored for replay, the one the
    /// request is then answered with. `Err` when the hold was refused before that transaction
    /// (invalid, forbidden) or it failed: nothing was written under the key then, and the
    /// caller settles the key as for any request.
    pub async fn hold_keyed(
        &self,
        principal: &Principal,
        request: HoldRequest,
        key: IdempotencyKey,
        render: RenderHold,
    ) -> AppResult<KeyedHold> {
        let outcome = self.try_hold_keyed(principal, request, key, render).await;
        let counted = match &outcome {
            Ok(KeyedHold::Ran { result, .. }) => Some(telemetry::outcome(result)),
            // A replay, or a refusal of the key: the hold was counted when it ran.
            Ok(KeyedHold::NotRun(_)) => None,
            Err(e) => Some(telemetry::failure(e)),
        };
        if let Some(label) = counted {
            telemetry::count_outcome(telemetry::HOLDS, label);
        }
        outcome
    }

    async fn try_hold_keyed(
        &self,
        principal: &Principal,
        request: HoldRequest,
        key: IdempotencyKey,
        render: RenderHold,
    ) -> AppResult<KeyedHold> {
        check_key(&key)?;
        let PreparedHold { command, refusals } = self.prepare_hold(principal, request).await?;
        let answer_refusals = refusals.clone();
        let answer: HoldAnswer = Box::new(move |decided| match decided {
            Ok(booking) => render(Ok(booking)),
            Err(refused) => render(Err(answer_refusals.error(refused))),
        });
        let hold_key = HoldKey { key: key.clone(), now: self.clock.now(), lock_seconds: LOCK_SECONDS, answer };
        Ok(match self.store.hold_keyed(command, hold_key).await? {
            KeyedHoldOutcome::Ran { result, answer } => {
                KeyedHold::Ran { result: self.held(result.map_err(|refused| refusals.error(&refused))), answer }
            }
            KeyedHoldOutcome::NotRun(begun) => KeyedHold::NotRun(self.admission(&key, begun)),
        })
    }

    /// A decided hold: a kept one's expiry scheduled.
    fn held(&self, result: AppResult<Booking>) -> AppResult<Booking> {
        if let Ok(Booking { id, expires_at: Some(expires_at), .. }) = &result {
            self.expiry.schedule(*id, *expires_at);
        }
        result
    }

    /// Checks, prices and builds the hold of `request` for the store.
    async fn prepare_hold(&self, principal: &Principal, request: HoldRequest) -> AppResult<PreparedHold> {
        principal.require_scope(Scope::BookingsWrite)?;
        if request.items.is_empty() || request.items.len() > ITEMS_MAX {
            return Err(allot_core::ValidationError::field("items", format!("must hold 1 to {ITEMS_MAX} items")).into());
        }
        if let Some(code) = &request.coupon_code {
            // Coupons are not offered yet: an unknown code must not silently give no discount.
            return Err(allot_core::ValidationError::field("coupon_code", format!("unknown coupon '{code}'")).into());
        }
        let (venue, resources, events) = self.load_for_hold(&request.items).await?;
        audit::set_venue(venue.id);
        let now = self.clock.now();
        let mut errors = FieldErrors::new();
        let mut priced = Vec::with_capacity(request.items.len());
        for (i, item) in request.items.iter().enumerate() {
            let resource = &resources[&item.resource_id];
            let event = item.event_id.map(|id| &*events[&id]);
            match price_item(&venue, resource, event, *item, now) {
                Ok(p) => priced.push(p),
                Err(e) => errors.merge(e.fields.prefixed(&format!("items[{i}]"))),
            }
        }
        errors.into_result()?;
        let items: Vec<BookingItem> = priced.iter().map(|p| p.to_booking_item()).collect();
        let ttl = SignedDuration::from_secs(i64::from(venue.policies.hold_ttl_seconds));
        // Expiry is kept in whole seconds, in the booking and in its claims alike: a fraction
        // here would let the claim stop counting while the booking could still be confirmed.
        let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
        let expires_at = now.checked_add(ttl).map_err(|e| AppError::Internal(e.to_string()))?;
        let booking = Booking::new_hold(principal.user_id, venue.id, venue.currency, items, now, expires_at);
        audit::set_target(booking.id);
        let claims = priced.iter().map(|p| p.claim).collect();
        let refusals = Arc::new(Refusals { items: request.items, resources });
        Ok(PreparedHold { command: HoldCommand { booking, claims, now }, refusals })
    }

    /// Loads the venue, resources and events a hold refers to; all must be at one venue.
    async fn load_for_hold(
        &self,
        items: &[ItemRequest],
    ) -> AppResult<(Arc<Venue>, HashMap<ResourceId, Arc<Resource>>, HashMap<allot_core::ids::EventId, Arc<Event>>)>
    {
        let mut errors = FieldErrors::new();
        let mut resources = HashMap::new();
        let mut events = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            if !resources.contains_key(&item.resource_id) {
                match self.store.resource(item.resource_id).await? {
                    Some(r) => {
                        resources.insert(r.id, r);
                    }
                    None => errors.add(format!("items[{i}].resource_id"), "no such resource"),
                }
            }
            if let Some(event_id) = item.event_id.filter(|id| !events.contains_key(id)) {
                match self.store.event(event_id).await? {
                    Some(e) => {
                        events.insert(e.id, e);
                    }
                    None => errors.add(format!("items[{i}].event_id"), "no such event"),
                }
            }
        }
        std::mem::take(&mut errors).into_result()?;
        let first_venue = resources[&items[0].resource_id].venue_id;
        for (i, item) in items.iter().enumerate() {
            if resources[&item.resource_id].venue_id != first_venue {
                errors.add(format!("items[{i}].resource_id"), "all items of a booking must be at one venue");
            }
            if let Some(e) = item.event_id.map(|id| &events[&id])
                && e.venue_id != first_venue
            {
                errors.add(format!("items[{i}].event_id"), "all items of a booking must be at one venue");
            }
        }
        errors.into_result()?;
        let venue = self.store.venue(first_venue).await?.ok_or(AppError::NotFound("venue"))?;
        Ok((venue, resources, events))
    }

    /// Charges the card and confirms; a decline leaves the hold (until the third).
    pub async fn confirm(&self, principal: &Principal, id: BookingId, token: &str) -> AppResult<Booking> {
        let result = self.try_confirm(principal, id, token).await;
        telemetry::count(telemetry::CONFIRMS, &result);
        result
    }

    async fn try_confirm(&self, principal: &Principal, id: BookingId, token: &str) -> AppResult<Booking> {
        principal.require_scope(Scope::BookingsWrite)?;
        let booking = self.booking_for_owner(principal, id).await?;
        if booking.status == BookingStatus::PendingPayment {
            return Err(AppError::Conflict("a payment for this booking is already in progress".into()));
        }
        booking.next_status(Transition::Confirm, self.clock.now()).map_err(transition_error)?;
        if booking.total == 0 {
            // Nothing to pay (every item free, or discounted to nothing): no charge, which a
            // provider would refuse as below its minimum.
            return self.confirm_free(booking.id).await;
        }
        let request = ChargeRequest {
            booking_id: booking.id,
            amount: booking.total,
            currency: booking.currency,
            token: token.to_owned(),
            idempotency_key: format!("{}_{}", booking.id, booking.payment_attempts),
        };
        let charged = self.charge_with_retries(&request).await;
        telemetry::count_payment(&charged);
        match charged? {
            ChargeOutcome::Succeeded { reference } => {
                self.record_payment(&booking, reference, Transition::Confirm).await
            }
            ChargeOutcome::Pending { reference } => {
                self.record_payment(&booking, reference, Transition::AwaitPayment).await
            }
            ChargeOutcome::Declined { .. } => {
                // The decline is written (it counts towards the last attempt) but the attempt failed.
                audit::fail("payment_declined");
                self.record_decline(id).await
            }
        }
    }

    async fn charge_with_retries(&self, request: &ChargeRequest) -> AppResult<ChargeOutcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.payments.charge(request).await {
                Ok(outcome) => return Ok(outcome),
                Err(ProviderError::InvalidToken) => {
                    return Err(allot_core::ValidationError::field(
                        "payment.token",
                        "not a token this provider accepts",
                    )
                    .into());
                }
                Err(ProviderError::Rejected(why)) => {
                    tracing::warn!(booking_id = %request.booking_id, %why, "the payment provider refused the charge");
                    return Err(allot_core::ValidationError::field(
                        "payment",
                        format!("the payment provider refused it: {why}"),
                    )
                    .into());
                }
                Err(ProviderError::CircuitOpen) => {
                    tracing::warn!(booking_id = %request.booking_id, "payment provider left alone: circuit open");
                    return Err(AppError::PaymentProviderUnavailable);
                }
                Err(ProviderError::Unavailable(why) | ProviderError::Retryable(why))
                    if attempt >= PROVIDER_ATTEMPTS_MAX =>
                {
                    tracing::warn!(booking_id = %request.booking_id, %why, "payment provider unavailable");
                    return Err(AppError::PaymentProviderUnavailable);
                }
                Err(ProviderError::Unavailable(_) | ProviderError::Retryable(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(PROVIDER_BACKOFF_MS << attempt)).await;
                }
            }
        }
    }

    async fn record_payment(&self, booking: &Booking, reference: String, transition: Transition) -> AppResult<Booking> {
        let payment = Payment {
            provider: self.payments.name().to_owned(),
            reference: reference.clone(),
            amount: booking.total,
            status: if transition == Transition::Confirm { PAYMENT_SUCCEEDED } else { PAYMENT_PENDING }.to_owned(),
        };
        let decide = Box::new(move |b: &Booking, now| {
            // Not a booking another confirm's payment is pending for: that one is settled by
            // its payment's event (`webhooks`), and this charge is given back (below).
            if b.status == BookingStatus::PendingPayment {
                return Err(AppError::Conflict("a payment for this booking is already in progress".into()));
            }
            let mut next = b.clone();
            next.status = b.next_status(transition, now).map_err(transition_error)?;
            next.payment = Some(payment);
            if next.status == BookingStatus::Confirmed {
                next.expires_at = None;
            }
            Ok(next)
        });
        match self.store.update_booking(booking.id, self.clock.now(), decide).await {
            Ok(b) => Ok(b),
            Err(UpdateRefused::Store(e)) => {
                // The write failed (a busy or overloaded store, a failed batch, a commit whose
                // answer was lost): the payment may even be recorded. Refunding now would be
                // wrong either way, since the client's retry sends this attempt's idempotency key
                // again, the provider replays this very charge, and the booking would be
                // confirmed with its money given back. The charge stands; the retry records it.
                // Queued all the same: if no retry records it before the hold ends, the
                // reconciler refunds it then (`refunds`).
                tracing::warn!(booking_id = %booking.id, error = %e, "a charged payment could not be recorded yet");
                self.queue_unrecorded(booking.id, &reference, booking.total).await;
                Err(update_error(UpdateRefused::Store(e)))
            }
            Err(refused) => {
                // The hold ended between the charge and the commit (a retry cannot charge it
                // again): give the money back, unless a concurrent confirm of the same attempt
                // recorded this very payment.
                // A booking that cannot be read now is left to the reconciler, which decides on
                // the booking as stored (refunding on a failed read could give back the money
                // of a confirm that recorded this very charge).
                let recorded = match self.store.booking(booking.id).await {
                    Ok(current) => current.and_then(|b| b.payment).is_some_and(|p| p.reference == reference),
                    Err(e) => {
                        tracing::warn!(booking_id = %booking.id, error = %e, "a charge's booking could not be read; queued");
                        self.queue_unrecorded(booking.id, &reference, booking.total).await;
                        true
                    }
                };
                if !recorded {
                    let refunded =
                        self.payments.refund(&RefundRequest::of(booking.id, &reference, booking.total)).await;
                    telemetry::count_refund(&refunded);
                    if let Err(e) = refunded {
                        tracing::warn!(booking_id = %booking.id, error = %e, "refund after failed confirm failed; queued");
                        self.queue_unrecorded(booking.id, &reference, booking.total).await;
                    }
                }
                Err(update_error(refused))
            }
        }
    }

    async fn confirm_free(&self, id: BookingId) -> AppResult<Booking> {
        let decide = Box::new(|b: &Booking, now| {
            if b.total != 0 || b.status == BookingStatus::PendingPayment {
                return Err(AppError::Conflict("the booking is not free to confirm".into()));
            }
            let mut next = b.clone();
            next.status = b.next_status(Transition::Confirm, now).map_err(transition_error)?;
            next.expires_at = None;
            Ok(next)
        });
        self.store.update_booking(id, self.clock.now(), decide).await.map_err(update_error)
    }

    async fn record_decline(&self, id: BookingId) -> AppResult<Booking> {
        let decide = Box::new(|b: &Booking, now| {
            // Declined at once: the booking must still be held, not waiting for another
            // confirm's pending payment (whose failure its provider's event reports).
            if b.status == BookingStatus::PendingPayment {
                return Err(AppError::Conflict("a payment for this booking is already in progress".into()));
            }
            let mut next = b.clone();
            next.status = b.next_status(Transition::PaymentDeclined, now).map_err(transition_error)?;
            next.payment_attempts += 1;
            Ok(next)
        });
        let booking = self.store.update_booking(id, self.clock.now(), decide).await.map_err(update_error)?;
        Err(AppError::PaymentDeclined { attempts_left: PAYMENT_ATTEMPTS_MAX.saturating_sub(booking.payment_attempts) })
    }

    /// Cancels a held or confirmed booking; confirmed ones are refunded per the venue policy.
    pub async fn cancel(&self, principal: &Principal, id: BookingId, reason: Option<String>) -> AppResult<Booking> {
        let result = self.try_cancel(principal, id, reason).await;
        telemetry::count(telemetry::CANCELS, &result);
        result
    }

    async fn try_cancel(&self, principal: &Principal, id: BookingId, reason: Option<String>) -> AppResult<Booking> {
        principal.require_scope(Scope::BookingsWrite)?;
        if reason.as_ref().is_some_and(|r| r.chars().count() > CANCEL_REASON_LEN_MAX) {
            return Err(allot_core::ValidationError::field(
                "reason",
                format!("at most {CANCEL_REASON_LEN_MAX} characters"),
            )
            .into());
        }
        let booking = self.visible_booking(principal, id).await?;
        let venue = self.store.venue(booking.venue_id).await?.ok_or(AppError::NotFound("venue"))?;
        let policy = venue.policies.cancellation;
        let now = self.clock.now();
        let decide = Box::new(move |b: &Booking, now| {
            let mut next = b.clone();
            next.status = b.next_status(Transition::Cancel, now).map_err(transition_error)?;
            next.cancel_reason = reason;
            next.expires_at = None;
            if b.status == BookingStatus::Confirmed {
                let start = b.first_start().unwrap_or(now);
                next.refund = Some(Refund::owed(policy.refund(b.total, start, now)));
            }
            Ok(next)
        });
        let mut cancelled = self.store.update_booking(id, now, decide).await.map_err(update_error)?;
        if let (Some(refund), Some(payment)) = (cancelled.refund.as_mut(), cancelled.payment.as_ref())
            && refund.amount > 0
        {
            // Recorded refund first, then money moves: a crash here leaves a refund to reconcile,
            // never a refund without a cancellation.
            // The cancellation's write queued the refund (`RefundKind::Cancellation`): if it
            // fails here, or its reference is not recorded, the reconciler makes it later.
            let refunded = self.payments.refund(&RefundRequest::of(id, &payment.reference, refund.amount)).await;
            telemetry::count_refund(&refunded);
            match refunded {
                Ok(reference) => {
                    refund.reference = Some(reference.clone());
                    return Ok(self.record_refund(id, reference).await.unwrap_or(cancelled));
                }
                Err(e) => tracing::warn!(booking_id = %id, error = %e, "refund failed; queued for the reconciler"),
            }
        }
        Ok(cancelled)
    }

    /// Stores the reference of the refund made for cancelled booking `id`, so that what the
    /// cancel answered is what every later read says. `None` (logged) when it could not be.
    pub(crate) async fn record_refund(&self, id: BookingId, reference: String) -> Option<Booking> {
        let decide = Box::new(move |b: &Booking, _now| {
            let mut next = b.clone();
            // Not made yet, or made again in place of one reported failed.
            match next.refund.as_mut() {
                Some(refund) if b.refund_owed().is_some() && refund.reference.as_ref() != Some(&reference) => {
                    *refund = refund.settled_as(&reference);
                }
                _ => return Err(AppError::Conflict("the refund is already settled".into())),
            }
            Ok(next)
        });
        match self.store.update_booking(id, self.clock.now(), decide).await {
            Ok(booking) => Some(booking),
            Err(UpdateRefused::Rejected(e)) => {
                // Recorded already: by the reconciler of another node, making the same refund.
                tracing::info!(booking_id = %id, error = %e, "a refund's reference was recorded already");
                None
            }
            Err(e) => {
                tracing::error!(booking_id = %id, error = ?e, "a refund was made but its reference not recorded; queued");
                None
            }
        }
    }

    pub async fn booking_for(&self, principal: &Principal, id: BookingId) -> AppResult<Booking> {
        principal.require_scope(Scope::BookingsRead)?;
        self.visible_booking(principal, id).await
    }

    /// The booking if the principal may see it; 404 otherwise, so ids do not leak.
    async fn visible_booking(&self, principal: &Principal, id: BookingId) -> AppResult<Booking> {
        let booking = self.store.booking(id).await?.ok_or(AppError::NotFound("booking"))?;
        if booking.customer_id != principal.user_id && !principal.manages(booking.venue_id) {
            return Err(AppError::NotFound("booking"));
        }
        audit::set_venue(booking.venue_id);
        Ok(booking)
    }

    async fn booking_for_owner(&self, principal: &Principal, id: BookingId) -> AppResult<Booking> {
        let booking = self.visible_booking(principal, id).await?;
        if booking.customer_id != principal.user_id {
            return Err(AppError::Forbidden("only the customer who holds a booking can pay for it"));
        }
        Ok(booking)
    }

    /// Admins see all bookings, managers their venues', customers their own.
    pub async fn list_bookings(
        &self,
        principal: &Principal,
        mut filter: BookingFilter,
        page: PageRequest,
    ) -> AppResult<Page<Booking>> {
        principal.require_scope(Scope::BookingsRead)?;
        if !principal.is_admin() {
            if principal.roles.contains(&Role::Manager) && !principal.venues.is_empty() {
                filter.venue_ids = Some(principal.venues.clone());
            } else {
                filter.customer_id = Some(principal.user_id);
            }
        }
        Ok(self.store.bookings(&filter, page).await?)
    }

    /// Releases every hold whose `expires_at` has passed, then deletes released claims the
    /// store left behind; returns how many holds it released.
    pub async fn expire_due(&self) -> AppResult<usize> {
        // One loop purges: the purge has no deadline, so it takes a slice of every other batch.
        let jobs = (0..EXPIRY_JOBS_IN_FLIGHT).map(|i| self.expire_due_in_turn(i == 0));
        let released = futures::future::try_join_all(jobs).await?;
        Ok(released.into_iter().sum())
    }

    /// One of the expiry loops [`App::expire_due`] runs side by side: releases, and once none
    /// is due purges if it `purges`, until neither has anything left. Both loops may see the
    /// same lapsed holds; the store releases each once.
    async fn expire_due_in_turn(&self, purges: bool) -> AppResult<usize> {
        let mut total = 0;
        loop {
            let expired = self.store.expire_due(self.clock.now(), EXPIRY_BATCH_MAX).await?;
            metrics::counter!(telemetry::HOLDS_EXPIRED).increment(expired.len() as u64);
            total += expired.len();
            // A store may release fewer than asked and leave the rest to the next call (the
            // SQLite writer slices a storm so that holds are not kept waiting behind it).
            if !expired.is_empty() {
                continue;
            }
            if !purges || self.store.purge_released_claims(self.clock.now(), EXPIRY_BATCH_MAX).await? == 0 {
                return Ok(total);
            }
        }
    }
}

/// A hold ready for the store, with what its refusal is reported against.
struct PreparedHold {
    command: HoldCommand,
    refusals: Arc<Refusals>,
}

/// A hold's items and their resources: what a refusal names.
struct Refusals {
    items: Vec<ItemRequest>,
    resources: HashMap<ResourceId, Arc<Resource>>,
}

impl Refusals {
    fn error(&self, refused: &HoldRefused) -> AppError {
        match refused {
            HoldRefused::Unavailable { item_index, remaining } => {
                let item = &self.items[*item_index];
                unavailable(*item_index, &self.resources[&item.resource_id], *remaining)
            }
            HoldRefused::Stale { item_index } => {
                AppError::Conflict(format!("items[{item_index}]: the resource changed while holding; try again"))
            }
            HoldRefused::Store(e) => e.clone().into(),
        }
    }
}

/// What [`App::hold_keyed`] did.
// Moved a few times per hold; boxing the common variant would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum KeyedHold {
    /// The hold ran under its key: `result`, answered with `answer`, which its transaction
    /// stored as the key's.
    Ran { result: AppResult<Booking>, answer: StoredAnswer },
    /// It did not run: the key was not free. How to answer, as [`App::idempotency_admit`]
    /// would have said (never [`Admission::Run`]).
    NotRun(AppResult<Admission>),
}

/// Renders a hold's outcome as its response (the HTTP layer's, which knows the format).
pub type RenderHold = fn(Result<&Booking, AppError>) -> StoredAnswer;

fn unavailable(item_index: usize, resource: &Resource, remaining: u32) -> AppError {
    let message = if resource.capacity == 1 {
        format!("{} is already taken", resource.name)
    } else {
        format!("{} has only {remaining} left for that time", resource.name)
    };
    AppError::Unavailable { item_index, message }
}

pub(crate) fn transition_error(e: TransitionError) -> AppError {
    match e {
        TransitionError::HoldExpired => AppError::HoldExpired,
        other => AppError::Conflict(other.to_string()),
    }
}

pub(crate) fn update_error(e: UpdateRefused) -> AppError {
    match e {
        UpdateRefused::NotFound => AppError::NotFound("booking"),
        UpdateRefused::Rejected(e) => e,
        UpdateRefused::Store(StoreError::NotFound(w)) => AppError::NotFound(w),
        UpdateRefused::Store(e) => e.into(),
    }
}
