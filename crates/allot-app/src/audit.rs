//! The audit trail (I6): one event per state-changing attempt — success, business refusal,
//! validation failure, authorization denial, rate-limit rejection, failed login — with who,
//! from where, which request, what, on what, and how it ended.
//!
//! Events form one hash chain: each event's `hash` is SHA-256 over the previous event's hash
//! and the event's canonical bytes, so editing, deleting or reordering any stored event breaks
//! the chain from that event on ([`verify`]).
//!
//! An attempt that changes something is recorded **in the transaction of the change**: the
//! HTTP layer opens an [`AuditScope`] around the request (a task-local), the store's writer
//! takes the scope's event when a write of that request is kept, and appends it before the
//! commit. An attempt that changed nothing (refused, invalid, denied) is appended on its own
//! after the response is known ([`AuditScope::finish`]). Either way exactly one event.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use allot_core::ids::VenueId;
use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::App;
use crate::auth::Principal;
use crate::error::{AppError, AppResult, StoreError};
use crate::store::{IdempotencyKey, IdempotencyMark, PAGE_LIMIT_MAX, Role, Store};

/// The actor role of the server's own work (a refund owed, made later by the reconciler).
pub const SYSTEM_ROLE: &str = "system";
/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Events read per query while verifying the chain.
pub const VERIFY_PAGE_SIZE: u32 = 1000;
/// Longest detail value kept; longer ones are cut (details are for people, not payloads).
pub const DETAIL_BYTES_MAX: usize = 512;
/// Most details one event keeps.
pub const DETAILS_MAX: usize = 16;
/// Longest text kept in any other field of an event (ids, names, request ids).
pub const FIELD_BYTES_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Outcome::Success, Outcome::Failure].into_iter().find(|o| o.as_str() == s)
    }
}

/// One audit event. `seq`, `prev_hash` and `hash` are set when it is appended to the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub seq: u64,
    pub id: String,
    pub at: Timestamp,
    pub actor_id: Option<String>,
    /// `anonymous`, `customer`, `manager`, `admin`, `partner` or `system`.
    pub actor_role: String,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    /// What was attempted, e.g. `booking.hold`, `auth.login`, `venue.update`.
    pub action: String,
    pub target_id: Option<String>,
    /// The venue the target belongs to, when there is one: managers see their venues' events.
    pub venue_id: Option<VenueId>,
    pub outcome: Outcome,
    /// The stable error code of a failure (`unavailable`, `forbidden`, `rate_limited`, …).
    pub reason: Option<String>,
    pub details: BTreeMap<String, String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEvent {
    /// A new, not yet chained event.
    pub fn new(action: impl Into<String>, actor_role: impl Into<String>, at: Timestamp) -> Self {
        AuditEvent {
            seq: 0,
            id: uuid::Uuid::now_v7().to_string(),
            at,
            actor_id: None,
            actor_role: actor_role.into(),
            ip: None,
            request_id: None,
            action: action.into(),
            target_id: None,
            venue_id: None,
            outcome: Outcome::Success,
            reason: None,
            details: BTreeMap::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// Links the event after `(prev_seq, prev_hash)` and returns its own `(seq, hash)`. The
    /// text is made storable first: events of many requests are appended together, so one
    /// client's NUL byte (which PostgreSQL refuses in text) must not fail everyone's batch.
    pub fn chain_after(&mut self, prev_seq: u64, prev_hash: &str) -> (u64, String) {
        self.make_storable();
        self.seq = prev_seq + 1;
        self.prev_hash = prev_hash.to_owned();
        self.hash = self.computed_hash();
        (self.seq, self.hash.clone())
    }

    /// The hash this event must carry, given its `prev_hash` and contents.
    pub fn computed_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        self.hash_canonical(&mut hasher);
        hex::encode(hasher.finalize())
    }

    /// Every field but `hash`, length-prefixed so no two events share a byte string, fed to
    /// the hasher as it goes: the writer chains every event of a batch, and formatting each
    /// field into a fresh string was most of the chaining's cost.
    fn hash_canonical(&self, hasher: &mut Sha256) {
        let mut venue = uuid::Uuid::encode_buffer();
        let venue = self.venue_id.map(|v| &*v.as_uuid().simple().encode_lower(&mut venue));
        number_field(hasher, self.seq);
        text_field(hasher, Some(&self.id));
        number_field(hasher, self.at.as_second());
        text_field(hasher, self.actor_id.as_deref());
        text_field(hasher, Some(&self.actor_role));
        text_field(hasher, self.ip.as_deref());
        text_field(hasher, self.request_id.as_deref());
        text_field(hasher, Some(&self.action));
        text_field(hasher, self.target_id.as_deref());
        text_field(hasher, venue);
        text_field(hasher, Some(self.outcome.as_str()));
        text_field(hasher, self.reason.as_deref());
        number_field(hasher, self.details.len());
        for (k, v) in &self.details {
            text_field(hasher, Some(k));
            text_field(hasher, Some(v));
        }
    }

    /// Cuts and cleans every text field in place: the writer does this for every event it
    /// chains, and nearly all text is stored as it came.
    fn make_storable(&mut self) {
        for field in [&mut self.actor_id, &mut self.ip, &mut self.request_id, &mut self.target_id, &mut self.reason] {
            if let Some(text) = field.as_mut() {
                make_text_storable(text, FIELD_BYTES_MAX);
            }
        }
        make_text_storable(&mut self.actor_role, FIELD_BYTES_MAX);
        make_text_storable(&mut self.action, FIELD_BYTES_MAX);
        if self.details.keys().any(|k| needs_cleaning(k, FIELD_BYTES_MAX)) {
            let details = std::mem::take(&mut self.details);
            self.details = details.into_iter().map(|(k, v)| (storable(&k, FIELD_BYTES_MAX), v)).collect();
        }
        for value in self.details.values_mut() {
            make_text_storable(value, DETAIL_BYTES_MAX);
        }
    }

    /// Adds detail `key` (at most [`DETAILS_MAX`] details; longer values cut).
    pub fn add_detail(&mut self, key: &str, value: &str) {
        if self.details.len() >= DETAILS_MAX && !self.details.contains_key(key) {
            return;
        }
        self.details.insert(key.to_owned(), storable(value, DETAIL_BYTES_MAX));
    }
}

/// `len:text;` for a present field, `-;` for an absent one.
fn text_field(hasher: &mut Sha256, value: Option<&str>) {
    let Some(text) = value else {
        hasher.update(b"-;");
        return;
    };
    hasher.update(itoa::Buffer::new().format(text.len()).as_bytes());
    hasher.update(b":");
    hasher.update(text.as_bytes());
    hasher.update(b";");
}

/// A number as the text field of its decimal digits.
fn number_field(hasher: &mut Sha256, value: impl itoa::Integer) {
    text_field(hasher, Some(itoa::Buffer::new().format(value)));
}

/// Whether [`storable`] would change `text`.
fn needs_cleaning(text: &str, bytes_max: usize) -> bool {
    text.len() > bytes_max || text.contains('\0')
}

/// [`storable`] in place, leaving text that needs nothing untouched.
fn make_text_storable(text: &mut String, bytes_max: usize) {
    if needs_cleaning(text, bytes_max) {
        *text = storable(text, bytes_max);
    }
}

/// `text` without NUL characters (which PostgreSQL cannot store), cut to `bytes_max` at a
/// character boundary.
fn storable(text: &str, bytes_max: usize) -> String {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace('\0', "\u{fffd}")
}

/// Filters of the audit list; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    pub target_id: Option<String>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    /// Only events of these venues (a manager's view).
    pub venue_ids: Option<Vec<VenueId>>,
}

/// A page of the audit list, newest first: events with `seq < before`.
#[derive(Debug, Clone, Copy)]
pub struct AuditPage {
    pub before: Option<u64>,
    pub limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing recorded yet.
    Open,
    /// Handed to a write transaction that has not committed yet.
    Pending,
    /// Committed.
    Written,
}

struct ScopeState {
    event: AuditEvent,
    stage: Stage,
    /// The request's `Idempotency-Key` (principal, key), if it carries one.
    idempotency_key: Option<IdempotencyKey>,
}

/// The audit event of one request in the making. Cloning shares it.
#[derive(Clone)]
pub struct AuditScope(Arc<Mutex<ScopeState>>);

impl std::fmt::Debug for AuditScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditScope").field("action", &self.lock().event.action).finish()
    }
}

tokio::task_local! {
    static SCOPE: AuditScope;
}

impl AuditScope {
    pub fn new(event: AuditEvent) -> Self {
        AuditScope(Arc::new(Mutex::new(ScopeState { event, stage: Stage::Open, idempotency_key: None })))
    }

    /// This scope for a request that runs as attempt `key` (its `Idempotency-Key`): its kept
    /// change then marks the key in the same transaction ([`AuditScope::mark`]), if the
    /// attempt still holds it.
    #[must_use]
    pub fn with_idempotency_key(self, key: IdempotencyKey) -> Self {
        self.lock().idempotency_key = Some(key);
        self
    }

    /// For the writer, with a claimed event that succeeded: the mark to write in the same
    /// transaction, so that the key's retry answers from what this request changed instead of
    /// running it again, even if the request's own answer is never stored. `None` for a
    /// request without a key or a target, or an attempt that failed (a declined payment
    /// changed nothing a retry would repeat harmfully).
    pub fn mark(&self) -> Option<IdempotencyMark> {
        let state = self.lock();
        let key = state.idempotency_key.as_ref()?;
        let target = state.event.target_id.clone().filter(|_| state.event.outcome == Outcome::Success)?;
        let (principal, owner) = (key.principal.clone(), key.owner.clone());
        Some(IdempotencyMark { principal, key: key.key.clone(), owner, target })
    }

    fn lock(&self) -> MutexGuard<'_, ScopeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with this scope as the current one.
    pub async fn run<F: Future>(self, f: F) -> F::Output {
        SCOPE.scope(self, f).await
    }

    /// For the writer, when a write of this request is kept: the event to append in the same
    /// transaction, the first time only.
    pub fn claim(&self, at: Timestamp) -> Option<AuditEvent> {
        let mut state = self.lock();
        if state.stage != Stage::Open {
            return None;
        }
        state.stage = Stage::Pending;
        let mut event = state.event.clone();
        event.at = at;
        Some(event)
    }

    /// For the writer, when it refuses this request's write for `reason` (the code the request
    /// will be answered with): the failed attempt's event to append in the refusing
    /// transaction, so the answer need not wait for a second one. The first time only.
    pub fn claim_failure(&self, at: Timestamp, reason: &str) -> Option<AuditEvent> {
        let mut event = self.claim(at)?;
        mark_failed(&mut event, Some(reason));
        Some(event)
    }

    /// For the writer, once the transaction of a claimed event has ended.
    pub fn settle(&self, committed: bool) {
        let mut state = self.lock();
        if state.stage == Stage::Pending {
            state.stage = if committed { Stage::Written } else { Stage::Open };
        }
    }

    /// For the writer, when the request's write did not run because its idempotency key was
    /// not free: nothing is recorded for it here (a replay is the attempt that ran; the
    /// idempotency layer records a refusal of the key, as for a request it never ran).
    pub fn discard(&self) {
        let mut state = self.lock();
        if state.stage == Stage::Open {
            state.stage = Stage::Written;
        }
    }

    /// For the HTTP layer once the response is known: the event still to append on its own (an
    /// attempt that changed nothing), or `None` when a transaction already recorded it.
    pub fn finish(&self, succeeded: bool, reason: Option<&str>, at: Timestamp) -> Option<AuditEvent> {
        let mut state = self.lock();
        if state.stage != Stage::Open {
            return None;
        }
        state.stage = Stage::Written;
        let mut event = state.event.clone();
        event.at = at;
        if !succeeded {
            mark_failed(&mut event, reason);
        }
        Some(event)
    }

    fn edit(&self, f: impl FnOnce(&mut AuditEvent)) {
        f(&mut self.lock().event);
    }
}

/// Marks `event` as a failed attempt, keeping a reason already given.
fn mark_failed(event: &mut AuditEvent, reason: Option<&str>) {
    event.outcome = Outcome::Failure;
    if event.reason.is_none() {
        event.reason = reason.map(str::to_owned);
    }
}

/// The scope of the request this task is serving, if any.
pub fn current() -> Option<AuditScope> {
    SCOPE.try_with(Clone::clone).ok()
}

fn edit_current(f: impl FnOnce(&mut AuditEvent)) {
    if let Some(scope) = current() {
        scope.edit(f);
    }
}

/// The role an event names for an account: its strongest.
pub fn role_name(roles: &[Role]) -> &'static str {
    [Role::Admin, Role::Manager, Role::Customer].into_iter().find(|r| roles.contains(r)).map_or("none", Role::as_str)
}

/// Names what the current request acts on.
pub fn set_target(id: impl std::fmt::Display) {
    edit_current(|e| e.target_id = Some(id.to_string()));
}

pub fn set_venue(venue: VenueId) {
    edit_current(|e| e.venue_id = Some(venue));
}

/// Names who acts, once a request establishes it (a login).
pub fn set_actor(id: impl std::fmt::Display, role: &str) {
    edit_current(|e| {
        e.actor_id = Some(id.to_string());
        e.actor_role = role.to_owned();
    });
}

pub fn detail(key: &str, value: &str) {
    edit_current(|e| e.add_detail(key, value));
}

/// Marks the current attempt as failed with `reason` even if it records a change (a declined
/// payment attempt is written, but the attempt failed).
pub fn fail(reason: &str) {
    if let Some(scope) = current() {
        fail_scope(&scope, reason);
    }
}

/// Decides a scope captured earlier (inside a store transaction, off the request's task) for
/// a change whose target and outcome are known only once it is decided: its target, and
/// `failure`'s reason or success. Both are set whatever an earlier run of the same write left
/// (one rolled back and run again, `Writer::write_locked_retrying`).
pub fn decide_scope(scope: &AuditScope, target: Option<&str>, failure: Option<&str>) {
    scope.edit(|e| {
        e.target_id = target.map(str::to_owned);
        e.outcome = if failure.is_some() { Outcome::Failure } else { Outcome::Success };
        e.reason = failure.map(str::to_owned);
    });
}

/// [`fail`] on a scope captured earlier (inside a store transaction, off the request's task).
pub fn fail_scope(scope: &AuditScope, reason: &str) {
    scope.edit(|e| {
        e.outcome = Outcome::Failure;
        e.reason = Some(reason.to_owned());
    });
}

/// Attempts at appending an event on its own before giving up on the database.
pub const APPEND_ATTEMPTS_MAX: u32 = 3;
pub const APPEND_BACKOFF_MS: u64 = 100;

impl App {
    /// Appends the event of an attempt that changed nothing (or whose change was written
    /// without it). A full write queue or a busy database is retried with backoff; if the event
    /// still cannot be stored it is logged whole at error level, so that it is not lost without
    /// a trace.
    pub async fn append_audit(&self, event: AuditEvent) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.store.append_audit(event.clone()).await {
                Ok(()) => return,
                Err(e) => e,
            };
            let transient = matches!(error, StoreError::Overloaded | StoreError::Busy(_));
            if !transient || attempt >= APPEND_ATTEMPTS_MAX {
                tracing::error!(error = %error, event = ?event, "an audit event could not be stored");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(APPEND_BACKOFF_MS << attempt)).await;
        }
    }

    /// The audit list: admins read everything; managers the events of the venues they manage
    /// (all of them, or the one `filter` names); nobody else.
    pub async fn audit_list(
        &self,
        principal: &Principal,
        mut filter: AuditFilter,
        page: AuditPage,
    ) -> AppResult<Vec<AuditEvent>> {
        assert!(page.limit <= PAGE_LIMIT_MAX, "pages are bounded at the edge");
        if !principal.is_admin() {
            if !principal.roles.contains(&Role::Manager) {
                return Err(AppError::Forbidden("only admins and venue managers may read the audit trail"));
            }
            match filter.venue_ids.as_deref() {
                Some([venue]) if principal.manages(*venue) => {}
                Some(_) => return Err(AppError::Forbidden("not a manager of this venue")),
                None => filter.venue_ids = Some(principal.venues.clone()),
            }
        }
        Ok(self.store.audit_events(&filter, page).await?)
    }

    /// Checks the whole audit chain.
    pub async fn audit_verify(&self) -> AppResult<Verdict> {
        Ok(verify(self.store.as_ref()).await?)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact { events: u64 },
    Broken { seq: u64, id: Option<String>, problem: String },
}

/// Walks the chain from its first row: every `seq` follows the one before from 1, every
/// `prev_hash` is the previous event's hash, every `hash` matches the contents, and the walk
/// ends exactly at the head the store recorded (so a removed tail, or a row beyond the head,
/// shows too). On a live database the head is read only once no row is left, and the rows
/// once more after it: an append that commits meanwhile is walked, not taken for tampering.
/// A row that cannot even be read back (a negative `seq`, say) breaks the chain where it is.
pub async fn verify(store: &dyn Store) -> Result<Verdict, StoreError> {
    let (mut seq, mut hash) = (0_u64, GENESIS_HASH.to_owned());
    let mut head = None;
    loop {
        let events = match store.audit_range(seq, VERIFY_PAGE_SIZE).await {
            Ok(events) => events,
            Err(StoreError::Corrupt(problem)) => return Ok(Verdict::Broken { seq: seq + 1, id: None, problem }),
            Err(e) => return Err(e),
        };
        for event in &events {
            if let Some(problem) = check_link(event, seq, &hash) {
                return Ok(Verdict::Broken { seq: event.seq, id: Some(event.id.clone()), problem });
            }
            (seq, hash) = (event.seq, event.hash.clone());
        }
        match (events.is_empty(), head.take()) {
            (false, _) => {}
            // No row left: read the head, then look for rows once more.
            (true, None) => head = Some(store.audit_head().await?),
            (true, Some((head_seq, head_hash))) => return Ok(ends_at_head(seq, &hash, head_seq, &head_hash)),
        }
    }
}

fn ends_at_head(seq: u64, hash: &str, head_seq: u64, head_hash: &str) -> Verdict {
    if (seq, hash) == (head_seq, head_hash) {
        return Verdict::Intact { events: seq };
    }
    let problem = format!("the chain ends at event {seq} but the recorded head is event {head_seq}");
    Verdict::Broken { seq: seq.min(head_seq) + 1, id: None, problem }
}

fn check_link(event: &AuditEvent, prev_seq: u64, prev_hash: &str) -> Option<String> {
    if event.seq != prev_seq + 1 {
        return Some(format!("event {} follows event {prev_seq}: events are missing", event.seq));
    }
    if event.prev_hash != prev_hash {
        return Some("its prev_hash is not the previous event's hash".into());
    }
    if event.computed_hash() != event.hash {
        return Some("its contents do not match its hash (edited)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        AuditEvent::new(action, "customer", Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let mut base = event("booking.hold");
        base.chain_after(0, GENESIS_HASH);
        type Edit = Box<dyn Fn(&mut AuditEvent)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.actor_id = Some("x".into())),
            Box::new(|e| e.actor_role = "admin".into()),
            Box::new(|e| e.ip = Some("10.0.0.1".into())),
            Box::new(|e| e.request_id = Some("r".into())),
            Box::new(|e| e.action = "booking.cancel".into()),
            Box::new(|e| e.target_id = Some("t".into())),
            Box::new(|e| e.venue_id = Some(VenueId::new())),
            Box::new(|e| e.outcome = Outcome::Failure),
            Box::new(|e| e.reason = Some("unavailable".into())),
            Box::new(|e| e.add_detail("k", "v")),
            Box::new(|e| e.at = Timestamp::UNIX_EPOCH),
            Box::new(|e| e.seq = 2),
            Box::new(|e| e.prev_hash = "1".repeat(64)),
        ];
        for edit in edits {
            let mut changed = base.clone();
            edit(&mut changed);
            assert_ne!(changed.computed_hash(), base.hash, "{changed:?}");
        }
    }

    /// Stored chains were hashed by earlier builds: the canonical bytes must never change.
    #[test]
    fn the_hash_of_a_known_event_is_stable() {
        let mut full = event("booking.hold");
        full.seq = 1_234_567;
        full.id = "0192f0c4-0000-7000-8000-000000000001".into();
        full.actor_id = Some("c0ffee".into());
        full.ip = Some("10.1.2.3".into());
        full.request_id = Some("req-9".into());
        full.target_id = Some("b00k".into());
        full.venue_id = "0192f0c400007000800000000000abcd".parse().ok();
        full.outcome = Outcome::Failure;
        full.reason = Some("unavailable".into());
        full.add_detail("seats", "3");
        full.add_detail("é", "ünïcode");
        full.prev_hash = "ab".repeat(32);
        let mut bare = event("x");
        bare.id = String::new();
        assert!(full.venue_id.is_some());
        assert_eq!(full.computed_hash(), "66a99e441905b4b805589e92d7faf4e825d81c9cb0bd4715d46a759e86a47f7b");
        assert_eq!(bare.computed_hash(), "733ab5df80845100b59896daedecfa3f7b89050e466fe9170627fe574d37bc26");
    }

    #[test]
    fn length_prefixes_keep_neighbouring_fields_apart() {
        let (mut a, mut b) = (event("x"), event("x"));
        a.add_detail("ab", "c");
        b.add_detail("a", "bc");
        assert_ne!(a.computed_hash(), b.computed_hash());
        let (mut c, mut d) = (event("x"), event("x"));
        c.actor_id = Some(String::new());
        d.actor_id = None;
        assert_ne!(c.computed_hash(), d.computed_hash());
    }

    #[test]
    fn a_scope_records_once_and_reopens_when_its_transaction_fails() {
        let at = Timestamp::UNIX_EPOCH;
        let scope = AuditScope::new(event("booking.hold"));
        assert!(scope.claim(at).is_some());
        assert!(scope.claim(at).is_none(), "a second write of the same request adds nothing");
        scope.settle(false);
        let standalone = scope.finish(false, Some("internal"), at).expect("the rolled-back attempt is recorded");
        assert_eq!((standalone.outcome, standalone.reason.as_deref()), (Outcome::Failure, Some("internal")));
        assert!(scope.finish(false, None, at).is_none());

        let committed = AuditScope::new(event("booking.hold"));
        assert!(committed.claim(at).is_some());
        committed.settle(true);
        assert!(committed.finish(true, None, at).is_none(), "already in the change's transaction");
    }

    #[test]
    fn a_refusal_is_recorded_by_the_refusing_transaction_once() {
        let at = Timestamp::UNIX_EPOCH;
        let refused = AuditScope::new(event("booking.hold"));
        let recorded = refused.claim_failure(at, "unavailable").expect("claimed");
        assert_eq!((recorded.outcome, recorded.reason.as_deref()), (Outcome::Failure, Some("unavailable")));
        assert!(refused.claim_failure(at, "unavailable").is_none(), "the first time only");
        refused.settle(true);
        assert!(refused.finish(false, Some("unavailable"), at).is_none(), "the answer adds no second event");

        let rolled_back = AuditScope::new(event("booking.hold"));
        assert!(rolled_back.claim_failure(at, "unavailable").is_some());
        rolled_back.settle(false);
        let standalone = rolled_back.finish(false, Some("internal"), at).expect("recorded by the answer instead");
        assert_eq!((standalone.outcome, standalone.reason.as_deref()), (Outcome::Failure, Some("internal")));
    }

    #[test]
    fn a_failure_marked_before_the_write_is_what_the_transaction_records() {
        let scope = AuditScope::new(event("booking.confirm"));
        fail_scope(&scope, "payment_declined");
        let recorded = scope.claim(Timestamp::UNIX_EPOCH).expect("claimed");
        assert_eq!((recorded.outcome, recorded.reason.as_deref()), (Outcome::Failure, Some("payment_declined")));
    }

    #[test]
    fn chained_events_hold_only_storable_text() {
        let mut e = event("booking.hold");
        e.target_id = Some("a\0b".into());
        e.request_id = Some("r".repeat(10 * FIELD_BYTES_MAX));
        e.add_detail("email", "x\0y");
        e.chain_after(0, GENESIS_HASH);
        assert_eq!(e.target_id.as_deref(), Some("a\u{fffd}b"));
        assert_eq!(e.request_id.as_ref().map(String::len), Some(FIELD_BYTES_MAX));
        assert_eq!(e.details["email"], "x\u{fffd}y");
        assert_eq!(e.hash, e.computed_hash(), "the hash covers what is stored");
    }

    #[test]
    fn details_are_bounded() {
        let mut e = event("x");
        for i in 0..(DETAILS_MAX + 5) {
            e.add_detail(&format!("k{i}"), &"é".repeat(DETAIL_BYTES_MAX));
        }
        assert_eq!(e.details.len(), DETAILS_MAX);
        assert!(e.details.values().all(|v| v.len() <= DETAIL_BYTES_MAX));
    }
}
