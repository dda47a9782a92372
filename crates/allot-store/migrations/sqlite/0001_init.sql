-- Allot on SQLite. Times are seconds since the Unix epoch; ids are 32-char hex UUIDv7, so
-- ordering by id is ordering by creation. Domain records are kept whole in `doc` (JSON);
-- the columns beside it exist for lookups and for the capacity rule.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    roles         TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE venue_managers (
    venue_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    PRIMARY KEY (venue_id, user_id)
);
CREATE INDEX venue_managers_user ON venue_managers (user_id);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    family_id  TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

CREATE TABLE venues (
    id         TEXT PRIMARY KEY,
    doc        TEXT NOT NULL,
    deleted_at INTEGER
);

CREATE TABLE resources (
    id         TEXT PRIMARY KEY,
    venue_id   TEXT NOT NULL,
    doc        TEXT NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX resources_venue ON resources (venue_id, id);

CREATE TABLE events (
    id         TEXT PRIMARY KEY,
    venue_id   TEXT NOT NULL,
    start_at   INTEGER NOT NULL,
    end_at     INTEGER NOT NULL,
    doc        TEXT NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX events_venue ON events (venue_id, id);

CREATE TABLE event_seats (
    resource_id TEXT NOT NULL,
    start_at    INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    end_at      INTEGER NOT NULL,
    PRIMARY KEY (resource_id, start_at, event_id)
);

CREATE TABLE bookings (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    venue_id    TEXT NOT NULL,
    status      TEXT NOT NULL,
    expires_at  INTEGER,
    doc         TEXT NOT NULL
);
CREATE INDEX bookings_customer ON bookings (customer_id, id);
CREATE INDEX bookings_venue ON bookings (venue_id, id);
CREATE INDEX bookings_held_expiry ON bookings (expires_at) WHERE status = 'held';

-- Only items that currently count against capacity (I1): rows are deleted when their
-- booking is cancelled, expires or fails. `block_*` include the resource's buffers.
CREATE TABLE claims (
    item_id         TEXT PRIMARY KEY,
    booking_id      TEXT NOT NULL,
    resource_id     TEXT NOT NULL,
    block_start     INTEGER NOT NULL,
    block_end       INTEGER NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    hold_expires_at INTEGER
);
CREATE INDEX claims_resource ON claims (resource_id, block_start);
CREATE INDEX claims_booking ON claims (booking_id);

CREATE TABLE idempotency_keys (
    principal    TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status       INTEGER,
    body         BLOB,
    created_at   INTEGER NOT NULL,
    locked_until INTEGER,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Domain events, written in the same transaction as the change they describe.
CREATE TABLE outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
