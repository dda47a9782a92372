-- Allot on PostgreSQL, shared by every node. Times are seconds since the Unix epoch (BIGINT),
-- ids are 32-char hex UUIDv7 (ordering by id is ordering by creation), as on SQLite, so both
-- backends behave alike. Domain records are kept whole in `doc` (JSONB); the columns beside
-- it exist for lookups and for the capacity rule. `venue_id` is on every venue-owned table:
-- it is the shard key when the data outgrows one primary (docs/scale-out.md).

CREATE EXTENSION IF NOT EXISTS btree_gist;

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
    created_at    BIGINT NOT NULL
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
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

CREATE TABLE venues (
    id         TEXT PRIMARY KEY,
    doc        JSONB NOT NULL,
    deleted_at BIGINT
);

CREATE TABLE resources (
    id         TEXT PRIMARY KEY,
    venue_id   TEXT NOT NULL,
    doc        JSONB NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX resources_venue ON resources (venue_id, id);

-- One row per resource: the row every transaction deciding on the resource locks first (in
-- resource-id order across a batch, so nodes never deadlock), and that resource's clock: the
-- latest `now` any node decided on it with. A later decision never uses an earlier `now`, so
-- nodes with slightly different clocks cannot both re-sell an expiring hold's capacity and
-- confirm that hold.
CREATE TABLE resource_clocks (
    resource_id TEXT PRIMARY KEY,
    venue_id    TEXT NOT NULL,
    last_now    BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE events (
    id         TEXT PRIMARY KEY,
    venue_id   TEXT NOT NULL,
    start_at   BIGINT NOT NULL,
    end_at     BIGINT NOT NULL,
    doc        JSONB NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX events_venue ON events (venue_id, id);

CREATE TABLE event_seats (
    resource_id TEXT NOT NULL,
    start_at    BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    end_at      BIGINT NOT NULL,
    PRIMARY KEY (resource_id, start_at, event_id)
);

CREATE TABLE bookings (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    venue_id    TEXT NOT NULL,
    status      TEXT NOT NULL,
    expires_at  BIGINT,
    doc         JSONB NOT NULL
);
CREATE INDEX bookings_customer ON bookings (customer_id, id);
CREATE INDEX bookings_venue ON bookings (venue_id, id);
CREATE INDEX bookings_expiry ON bookings (expires_at) WHERE status IN ('held', 'pending_payment');

-- Only items that currently count against capacity (I1): rows are deleted when their
-- booking is cancelled, expires or fails. `block_*` include the resource's buffers.
-- The core decides I1 over these rows under the resource's lock; for resources of capacity
-- one (`exclusive`) the exclusion constraint is a second, independent guard.
CREATE TABLE claims (
    item_id         TEXT PRIMARY KEY,
    booking_id      TEXT NOT NULL,
    resource_id     TEXT NOT NULL,
    venue_id        TEXT NOT NULL,
    block_start     BIGINT NOT NULL,
    block_end       BIGINT NOT NULL,
    quantity        BIGINT NOT NULL CHECK (quantity > 0),
    hold_expires_at BIGINT,
    exclusive       BOOLEAN NOT NULL DEFAULT FALSE,
    CHECK (block_start < block_end),
    CONSTRAINT claims_exclusive EXCLUDE USING gist (
        resource_id WITH =,
        tstzrange(to_timestamp(block_start::double precision), to_timestamp(block_end::double precision)) WITH &&
    ) WHERE (exclusive)
);
CREATE INDEX claims_resource ON claims (resource_id, block_start);
CREATE INDEX claims_booking ON claims (booking_id);

CREATE TABLE idempotency_keys (
    principal    TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status       BIGINT,
    body         BYTEA,
    created_at   BIGINT NOT NULL,
    locked_until BIGINT,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Domain events, written in the same transaction as the change they describe.
CREATE TABLE outbox (
    seq          BIGSERIAL PRIMARY KEY,
    topic        TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    payload      JSONB NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX outbox_aggregate ON outbox (aggregate_id);
