-- Partner API keys (issue 4). Only the SHA-256 digest of a key is stored: the key itself is
-- shown once, at creation. Scopes are comma-separated (`bookings:read,bookings:write`).
-- Numbered 0004: 0002 and 0003 are taken by other work; sqlx orders versions, gaps are fine.
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    scopes     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
