//! Bookings, their items and the lifecycle state machine of SPEC §3.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ids::{BookingId, EventId, ItemId, ResourceId, UserId, VenueId};
use crate::inventory::Currency;

/// Declines allowed before a hold ends as `payment_failed`.
pub const PAYMENT_ATTEMPTS_MAX: u32 = 3;
/// Items one booking may hold.
pub const ITEMS_MAX: usize = 20;
/// The domain event announcing that a cancelled booking's refund was made
/// ([`Booking::event_topic`]).
pub const REFUNDED_TOPIC: &str = "booking.refunded";
/// The domain event announcing that the provider reported a booking's refund failed after it
/// was made: the money did not go back, and an operator decides how it does.
pub const REFUND_FAILED_TOPIC: &str = "booking.refund_failed";
/// The domain event of a payment that failed while the booking stays held for another attempt
/// (a card declined at once, or an asynchronous payment reported failed): no final status is
/// entered, and a `booking.held` again would read as a new hold.
pub const PAYMENT_DECLINED_TOPIC: &str = "booking.payment_declined";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingStatus {
    Held,
    PendingPayment,
    Confirmed,
    Cancelled,
    Expired,
    PaymentFailed,
    Completed,
    NoShow,
}

impl BookingStatus {
    pub const ALL: [BookingStatus; 8] = [
        BookingStatus::Held,
        BookingStatus::PendingPayment,
        BookingStatus::Confirmed,
        BookingStatus::Cancelled,
        BookingStatus::Expired,
        BookingStatus::PaymentFailed,
        BookingStatus::Completed,
        BookingStatus::NoShow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BookingStatus::Held => "held",
            BookingStatus::PendingPayment => "pending_payment",
            BookingStatus::Confirmed => "confirmed",
            BookingStatus::Cancelled => "cancelled",
            BookingStatus::Expired => "expired",
            BookingStatus::PaymentFailed => "payment_failed",
            BookingStatus::Completed => "completed",
            BookingStatus::NoShow => "no_show",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The domain event announcing that a booking entered this status.
    pub fn event_topic(self) -> &'static str {
        match self {
            BookingStatus::Held => "booking.held",
            BookingStatus::PendingPayment => "booking.pending_payment",
            BookingStatus::Confirmed => "booking.confirmed",
            BookingStatus::Cancelled => "booking.cancelled",
            BookingStatus::Expired => "booking.expired",
            BookingStatus::PaymentFailed => "booking.payment_failed",
            BookingStatus::Completed => "booking.completed",
            BookingStatus::NoShow => "booking.no_show",
        }
    }

    /// Whether the booking's items count against capacity (I1). A hold past its expiry stops
    /// counting at `expires_at` even before the expiry job has marked it.
    pub fn claims_capacity(self) -> bool {
        matches!(self, BookingStatus::Held | BookingStatus::PendingPayment | BookingStatus::Confirmed)
    }

    /// Statuses that end at `expires_at` unless something completes them first.
    pub fn expires(self) -> bool {
        matches!(self, BookingStatus::Held | BookingStatus::PendingPayment)
    }

    pub fn is_final(self) -> bool {
        !self.claims_capacity() && self != BookingStatus::Completed
    }

    /// `Transition::Expire` at `now` of a booking in this status whose hold ends at
    /// `expires_at`: its status after, or `None` while it still holds. Needs no more of the
    /// booking than these two, so a store can release lapsed holds without reading documents.
    pub fn on_expiry(self, expires_at: Option<Timestamp>, now: Timestamp) -> Option<BookingStatus> {
        let lapsed = self.expires() && expires_at.is_some_and(|e| e <= now);
        lapsed.then_some(BookingStatus::Expired)
    }
}

/// Something that happens to a booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Confirm,
    AwaitPayment,
    PaymentDeclined,
    Cancel,
    Expire,
    Complete,
    NoShow,
}

/// Why a transition is not allowed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the hold expired")]
    HoldExpired,
    #[error("a booking that is {} cannot be {}", .from.as_str(), transition_verb(*.transition))]
    NotAllowed { from: BookingStatus, transition: Transition },
}

fn transition_verb(t: Transition) -> &'static str {
    match t {
        Transition::Confirm | Transition::AwaitPayment => "confirmed",
        Transition::PaymentDeclined => "charged",
        Transition::Cancel => "cancelled",
        Transition::Expire => "expired",
        Transition::Complete => "completed",
        Transition::NoShow => "marked as no-show",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookingItem {
    pub id: ItemId,
    pub resource_id: ResourceId,
    pub event_id: Option<EventId>,
    pub start: Timestamp,
    pub end: Timestamp,
    pub quantity: u32,
    pub unit_price: i64,
    pub price: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub provider: String,
    pub reference: String,
    pub amount: i64,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub amount: i64,
    /// The provider's refund, once made.
    pub reference: Option<String>,
    /// Why the provider reported the refund `reference` failed after it was made (the card
    /// closed since, say): the money did not go back, and the refund is owed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The provider's refunds that failed and were made again since, oldest first (a late
    /// report of one of them is no news).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
}

impl Refund {
    /// A refund of `amount` owed and not made yet.
    pub fn owed(amount: i64) -> Refund {
        Refund { amount, reference: None, failure: None, replaced: Vec::new() }
    }

    /// A refund of `amount` made as `reference`.
    pub fn made(amount: i64, reference: &str) -> Refund {
        Refund { amount, reference: Some(reference.to_owned()), failure: None, replaced: Vec::new() }
    }

    /// This refund, owed, made as `reference`: a failed one it is made in place of moves to
    /// `replaced`.
    pub fn settled_as(&self, reference: &str) -> Refund {
        let mut replaced = self.replaced.clone();
        if self.failure.is_some() {
            replaced.extend(self.reference.clone());
        }
        Refund { amount: self.amount, reference: Some(reference.to_owned()), failure: None, replaced }
    }

    /// Whether the money is still to go back: not made, or made and reported failed since.
    fn unsettled(&self) -> bool {
        self.reference.is_none() || self.failure.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    pub id: BookingId,
    pub status: BookingStatus,
    pub customer_id: UserId,
    pub venue_id: VenueId,
    pub expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub items: Vec<BookingItem>,
    pub currency: Currency,
    pub subtotal: i64,
    pub discount: i64,
    pub total: i64,
    pub payment_attempts: u32,
    pub payment: Option<Payment>,
    pub refund: Option<Refund>,
    pub cancel_reason: Option<String>,
}

impl Booking {
    /// A new hold of `items` (priced), expiring at `expires_at`.
    pub fn new_hold(
        customer_id: UserId,
        venue_id: VenueId,
        currency: Currency,
        items: Vec<BookingItem>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Booking {
        assert!(expires_at > now, "a hold expires after it is made");
        let subtotal = items.iter().map(|i| i.price).sum();
        Booking {
            id: BookingId::new(),
            status: BookingStatus::Held,
            customer_id,
            venue_id,
            expires_at: Some(expires_at),
            created_at: now,
            updated_at: now,
            items,
            currency,
            subtotal,
            discount: 0,
            total: subtotal,
            payment_attempts: 0,
            payment: None,
            refund: None,
            cancel_reason: None,
        }
    }

    /// Stamps a new hold, requested at `requested_at` (a whole second, as its expiry), with the
    /// time the store decided it at, never earlier (the decision clock only moves forward, and
    /// on PostgreSQL follows the latest clock any node used on the resource): created then,
    /// and its expiry later by the whole seconds in between, so a hold that queued or met a
    /// clock ahead of its request's still gets its whole time to live and never starts lapsed
    /// (I2: its claim would not count, and a second customer could hold the same unit).
    pub fn decided_at(&mut self, requested_at: Timestamp, decided_at: Timestamp) {
        let late_seconds = (decided_at.as_second() - requested_at.as_second()).max(0);
        if let Some(expires_at) = self.expires_at {
            self.expires_at =
                Some(expires_at.checked_add(jiff::SignedDuration::from_secs(late_seconds)).unwrap_or(expires_at));
        }
        self.created_at = decided_at;
        self.updated_at = decided_at;
        debug_assert!(self.expires_at.is_none_or(|e| e > decided_at), "a hold starts live");
    }

    /// Earliest start among the items (what cancellation policies measure from).
    pub fn first_start(&self) -> Option<Timestamp> {
        self.items.iter().map(|i| i.start).min()
    }

    /// A held booking (or one still waiting for an asynchronous payment) whose `expires_at`
    /// has passed no longer claims capacity: a payment that never completes cannot keep
    /// capacity forever.
    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.status.on_expiry(self.expires_at, now).is_some()
    }

    /// The refund this booking still owes: the payment it gives money back on and the amount,
    /// while the refund has not been made (its reference not recorded), or was reported failed
    /// after it was made. A refund of nothing is not owed.
    pub fn refund_owed(&self) -> Option<(&str, i64)> {
        let (Some(payment), Some(refund)) = (&self.payment, &self.refund) else { return None };
        (refund.amount > 0 && refund.unsettled()).then_some((payment.reference.as_str(), refund.amount))
    }

    /// The provider's refund this booking's refund was, until the provider reported it failed.
    pub fn failed_refund(&self) -> Option<&str> {
        self.refund.as_ref().filter(|r| r.failure.is_some()).and_then(|r| r.reference.as_deref())
    }

    /// Whether `after` is this booking with only its refund's reference recorded, made (a
    /// failure reported of an earlier one cleared), and its `updated_at` moved: with
    /// [`Booking::fails_refund`], the one change a booking in a final status still takes,
    /// since the money is refunded once the cancellation has committed.
    pub fn settles_refund(&self, after: &Booking) -> bool {
        let (Some(refund), Some(settled)) = (&self.refund, &after.refund) else { return false };
        let Some(reference) = settled.reference.as_deref() else { return false };
        if !refund.unsettled() || self.failed_refund() == Some(reference) {
            return false;
        }
        self.with_refund(after, refund.settled_as(reference)) == *after
    }

    /// Whether `after` is this booking with only its refund, made, reported failed (and its
    /// `updated_at` moved).
    pub fn fails_refund(&self, after: &Booking) -> bool {
        let (Some(refund), Some(failed)) = (&self.refund, &after.refund) else { return false };
        if refund.reference.is_none() || refund.failure.is_some() || failed.failure.is_none() {
            return false;
        }
        self.with_refund(after, Refund { failure: failed.failure.clone(), ..refund.clone() }) == *after
    }

    /// This booking with `refund`, updated when `after` was.
    fn with_refund(&self, after: &Booking, refund: Refund) -> Booking {
        let mut expected = self.clone();
        expected.updated_at = after.updated_at;
        expected.refund = Some(refund);
        expected
    }

    /// The domain event a change from this booking to `after` announces, if any: the status it
    /// enters, [`PAYMENT_DECLINED_TOPIC`] when a failed payment leaves it held, or
    /// [`REFUNDED_TOPIC`] when the change records its refund made (money moved, but no status
    /// changed: a partner or a ledger following the feed learns of it only so), or
    /// [`REFUND_FAILED_TOPIC`] when the provider reported that refund failed.
    pub fn event_topic(&self, after: &Booking) -> Option<&'static str> {
        if after.status == BookingStatus::Held && after.payment_attempts > self.payment_attempts {
            Some(PAYMENT_DECLINED_TOPIC)
        } else if self.status != after.status {
            Some(after.status.event_topic())
        } else if self.settles_refund(after) {
            Some(REFUNDED_TOPIC)
        } else if self.fails_refund(after) {
            Some(REFUND_FAILED_TOPIC)
        } else {
            None
        }
    }

    /// The state machine of SPEC §3: the status after `t` at `now`, or why not.
    pub fn next_status(&self, t: Transition, now: Timestamp) -> Result<BookingStatus, TransitionError> {
        use BookingStatus as S;
        use Transition as T;
        let not_allowed = Err(TransitionError::NotAllowed { from: self.status, transition: t });
        match (self.status, t) {
            (S::Held | S::PendingPayment, T::Confirm | T::AwaitPayment | T::PaymentDeclined)
                if self.is_expired_at(now) =>
            {
                Err(TransitionError::HoldExpired)
            }
            (_, T::Expire) => self.status.on_expiry(self.expires_at, now).map_or(not_allowed, Ok),
            (S::Held | S::PendingPayment, T::Confirm) => Ok(S::Confirmed),
            (S::Held, T::AwaitPayment) => Ok(S::PendingPayment),
            // A card declined at once, or an asynchronous payment reported failed later (the
            // provider's event): the customer may try again while attempts and the hold last.
            (S::Held | S::PendingPayment, T::PaymentDeclined) if self.payment_attempts + 1 >= PAYMENT_ATTEMPTS_MAX => {
                Ok(S::PaymentFailed)
            }
            (S::Held | S::PendingPayment, T::PaymentDeclined) => Ok(S::Held),
            (S::Held | S::PendingPayment | S::Confirmed, T::Cancel) => Ok(S::Cancelled),
            (S::Confirmed, T::Complete) => Ok(S::Completed),
            (S::Confirmed, T::NoShow) => Ok(S::NoShow),
            (S::Expired, T::Confirm) => Err(TransitionError::HoldExpired),
            _ => not_allowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Currency;

    fn booking(status: BookingStatus, expires_at: i64) -> Booking {
        let t = |s: i64| Timestamp::from_second(s).expect("ts");
        Booking {
            id: BookingId::new(),
            status,
            customer_id: UserId::new(),
            venue_id: VenueId::new(),
            expires_at: Some(t(expires_at)),
            created_at: t(0),
            updated_at: t(0),
            items: vec![],
            currency: Currency::try_from("EUR".to_owned()).expect("EUR"),
            subtotal: 0,
            discount: 0,
            total: 0,
            payment_attempts: 0,
            payment: None,
            refund: None,
            cancel_reason: None,
        }
    }

    #[test]
    fn confirm_before_and_after_expiry() {
        let b = booking(BookingStatus::Held, 100);
        let at = |s| Timestamp::from_second(s).expect("ts");
        assert_eq!(b.next_status(Transition::Confirm, at(99)), Ok(BookingStatus::Confirmed));
        assert_eq!(b.next_status(Transition::Confirm, at(100)), Err(TransitionError::HoldExpired));
        assert!(b.next_status(Transition::Expire, at(99)).is_err());
        assert_eq!(b.next_status(Transition::Expire, at(100)), Ok(BookingStatus::Expired));
    }

    #[test]
    fn a_pending_payment_reported_failed_is_held_again_until_the_last_attempt() {
        let at = |s| Timestamp::from_second(s).expect("ts");
        let mut b = booking(BookingStatus::PendingPayment, 100);
        assert_eq!(b.next_status(Transition::PaymentDeclined, at(99)), Ok(BookingStatus::Held));
        b.payment_attempts = PAYMENT_ATTEMPTS_MAX - 1;
        assert_eq!(b.next_status(Transition::PaymentDeclined, at(99)), Ok(BookingStatus::PaymentFailed));
        assert_eq!(b.next_status(Transition::PaymentDeclined, at(100)), Err(TransitionError::HoldExpired));
    }

    #[test]
    fn a_pending_payment_expires_like_a_hold() {
        let b = booking(BookingStatus::PendingPayment, 100);
        let at = |s| Timestamp::from_second(s).expect("ts");
        assert_eq!(b.next_status(Transition::Confirm, at(99)), Ok(BookingStatus::Confirmed));
        assert_eq!(b.next_status(Transition::Confirm, at(100)), Err(TransitionError::HoldExpired));
        assert_eq!(b.next_status(Transition::Expire, at(100)), Ok(BookingStatus::Expired));
    }

    #[test]
    fn a_final_booking_settles_its_refund_and_nothing_else() {
        let mut cancelled = booking(BookingStatus::Cancelled, 100);
        cancelled.refund = Some(Refund::owed(600));
        let mut settled = cancelled.clone();
        settled.updated_at = Timestamp::from_second(50).expect("ts");
        settled.refund = Some(Refund::made(600, "re_1"));
        assert!(cancelled.settles_refund(&settled));
        assert!(!settled.settles_refund(&settled), "settled once");
        let mut more = settled.clone();
        more.refund = Some(Refund::made(1200, "re_1"));
        assert!(!cancelled.settles_refund(&more), "the amount stays");
        let mut other = settled.clone();
        other.cancel_reason = Some("changed".into());
        assert!(!cancelled.settles_refund(&other), "nothing else changes");
        assert!(!booking(BookingStatus::Cancelled, 100).settles_refund(&settled), "no refund to settle");
    }

    #[test]
    fn a_refund_reported_failed_is_owed_again_and_settled_by_another() {
        let mut made = booking(BookingStatus::Cancelled, 100);
        made.payment =
            Some(Payment { provider: "p".into(), reference: "pi_1".into(), amount: 600, status: "s".into() });
        made.refund = Some(Refund::made(600, "re_1"));
        assert_eq!((made.refund_owed(), made.failed_refund()), (None, None));
        let mut failed = made.clone();
        failed.updated_at = Timestamp::from_second(60).expect("ts");
        failed.refund = Some(Refund { failure: Some("expired_or_canceled_card".into()), ..Refund::made(600, "re_1") });
        assert_eq!(Refund::made(600, "re_1").settled_as("re_2"), Refund::made(600, "re_2"), "nothing replaced");
        assert!(made.fails_refund(&failed));
        assert_eq!(made.event_topic(&failed), Some(REFUND_FAILED_TOPIC));
        assert!(!failed.fails_refund(&failed), "reported once");
        assert!(!booking(BookingStatus::Cancelled, 100).fails_refund(&failed), "none made");
        let mut unmade = made.clone();
        unmade.refund = Some(Refund::owed(600));
        assert!(!unmade.fails_refund(&failed), "not made: nothing to fail");
        let mut other = failed.clone();
        other.refund = Some(Refund { failure: Some("x".into()), ..Refund::made(600, "re_2") });
        assert!(!made.fails_refund(&other), "the same refund");
        assert_eq!((failed.refund_owed(), failed.failed_refund()), (Some(("pi_1", 600)), Some("re_1")));

        let mut again = failed.clone();
        again.refund = Some(Refund { replaced: vec!["re_1".into()], ..Refund::made(600, "re_2") });
        assert_eq!(failed.refund.as_ref().map(|r| r.settled_as("re_2")), again.refund);
        assert!(failed.settles_refund(&again));
        let mut forgetting = failed.clone();
        forgetting.refund = Some(Refund::made(600, "re_2"));
        assert!(!failed.settles_refund(&forgetting), "the failed one is kept as replaced");
        assert_eq!(failed.event_topic(&again), Some(REFUNDED_TOPIC));
        assert_eq!(again.refund_owed(), None);
        let mut same = failed.clone();
        same.refund = Some(Refund::made(600, "re_1"));
        assert!(!failed.settles_refund(&same), "not by the refund that failed");
    }

    #[test]
    fn a_change_announces_the_status_it_enters_or_the_refund_it_records() {
        for status in BookingStatus::ALL {
            assert_eq!(status.event_topic(), format!("booking.{}", status.as_str()), "the feed's names");
        }
        let held = booking(BookingStatus::Held, 100);
        let mut cancelled = booking(BookingStatus::Cancelled, 100);
        cancelled.refund = Some(Refund::owed(600));
        assert_eq!(held.event_topic(&cancelled), Some("booking.cancelled"));
        assert_eq!(held.event_topic(&held), None, "nothing announced");
        let mut settled = cancelled.clone();
        settled.refund = Some(Refund::made(600, "re_1"));
        assert_eq!(cancelled.event_topic(&settled), Some(REFUNDED_TOPIC));
        assert_eq!(settled.event_topic(&settled), None, "announced once");

        let mut declined = held.clone();
        declined.payment_attempts += 1;
        assert_eq!(held.event_topic(&declined), Some(PAYMENT_DECLINED_TOPIC), "a card declined at once");
        let pending = booking(BookingStatus::PendingPayment, 100);
        let mut held_again = held.clone();
        held_again.payment_attempts = pending.payment_attempts + 1;
        assert_eq!(pending.event_topic(&held_again), Some(PAYMENT_DECLINED_TOPIC), "not a second hold");
        let mut failed = booking(BookingStatus::PaymentFailed, 100);
        failed.payment_attempts = PAYMENT_ATTEMPTS_MAX;
        assert_eq!(declined.event_topic(&failed), Some("booking.payment_failed"), "the last attempt");
    }

    #[test]
    fn a_refund_is_owed_until_made_and_only_of_money_paid() {
        let mut cancelled = booking(BookingStatus::Cancelled, 100);
        cancelled.refund = Some(Refund::owed(600));
        assert_eq!(cancelled.refund_owed(), None, "nothing was paid");
        cancelled.payment = Some(Payment {
            provider: "test".into(),
            reference: "pi_1".into(),
            amount: 1200,
            status: "succeeded".into(),
        });
        assert_eq!(cancelled.refund_owed(), Some(("pi_1", 600)));
        let mut settled = cancelled.clone();
        settled.refund = Some(Refund::made(600, "re_1"));
        assert_eq!(settled.refund_owed(), None, "made");
        let mut nothing = cancelled.clone();
        nothing.refund = Some(Refund::owed(0));
        assert_eq!(nothing.refund_owed(), None, "a refund of nothing");
    }

    #[test]
    fn third_decline_fails_the_booking() {
        let mut b = booking(BookingStatus::Held, 100);
        let now = Timestamp::from_second(1).expect("ts");
        assert_eq!(b.next_status(Transition::PaymentDeclined, now), Ok(BookingStatus::Held));
        b.payment_attempts = 2;
        assert_eq!(b.next_status(Transition::PaymentDeclined, now), Ok(BookingStatus::PaymentFailed));
    }

    #[test]
    fn final_states_accept_nothing_but_what_spec_allows() {
        let now = Timestamp::from_second(1).expect("ts");
        for status in [BookingStatus::Cancelled, BookingStatus::PaymentFailed, BookingStatus::NoShow] {
            let b = booking(status, 100);
            for t in [Transition::Confirm, Transition::Cancel, Transition::Expire, Transition::PaymentDeclined] {
                assert!(b.next_status(t, now).is_err(), "{status:?} {t:?}");
            }
        }
    }

    #[test]
    fn a_hold_decided_late_keeps_its_whole_time_to_live() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).expect("ts");
        let hold = Booking::new_hold(
            UserId::new(),
            VenueId::new(),
            Currency::try_from("EUR".to_owned()).expect("EUR"),
            Vec::new(),
            t(0),
            t(600),
        );
        let mut on_time = hold.clone();
        on_time.decided_at(t(0), t(0) + jiff::SignedDuration::from_millis(300));
        assert_eq!(on_time.expires_at, Some(t(600)), "within the second it was requested in");
        let mut queued = hold.clone();
        queued.decided_at(t(0), t(1) + jiff::SignedDuration::from_millis(10));
        assert_eq!(queued.expires_at, Some(t(601)));
        let mut ahead = hold;
        ahead.decided_at(t(0), t(1_200));
        assert_eq!((ahead.created_at, ahead.updated_at, ahead.expires_at), (t(1_200), t(1_200), Some(t(1_800))));
    }
}
