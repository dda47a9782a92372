#!/usr/bin/env python3
"""expiry-statements.py — what each statement of an expiry release costs, per booking.

Runs the SQLite statements the writer used to release lapsed holds until ce3350d (crates/
allot-store/src/sqlite/tx.rs, `expire_chunk` and `release`; since 4d8c31d the release copies
no document into the outbox and leaves the claims to a later purge, and since 44da020 it
edits documents with its own SQL function, not json_set), 100 bookings per statement, on a
copy of a database filled by a bench run, inside transactions that are rolled back. Prints
microseconds per booking for each statement (Python's binding overhead included: compare the
rows with one another, not with the server's figures).

Usage: bench/expiry-statements.py DB [BOOKINGS]
  DB        a copy of a bench run's SQLite file (e.g. target/bench/s10/sqlite/allot.db with
            its -wal), never a live server's: nothing is kept, but the file is written to.
  BOOKINGS  held bookings to release per repetition (default 5000; three repetitions).
"""
import sqlite3
import sys
import time

CHUNK_ROWS = 100


def per_booking(conn, sql, columns, values, bookings):
    started = time.perf_counter()
    for i in range(0, len(bookings), CHUNK_ROWS):
        part = bookings[i:i + CHUNK_ROWS]
        row = "(" + ", ".join(["?"] * columns) + ")" if columns > 1 else "?"
        statement = sql.replace("%s", ", ".join([row] * len(part)))
        conn.execute(statement, [v for b in part for v in values(b)]).fetchall()
    return (time.perf_counter() - started) / len(bookings) * 1e6


STATEMENTS = [
    ("read status and expiry", "SELECT id, status, expires_at FROM bookings WHERE id IN (%s)", 1, lambda b: (b[1],)),
    ("update the bookings (json_set)",
     "UPDATE bookings SET status = 'expired', expires_at = NULL, "
     "doc = json_set(doc, '$.status', 'expired', '$.updated_at', '2026-11-30T12:00:00Z') WHERE id IN (%s)", 1,
     lambda b: (b[1],)),
    # What the writer did before `b8db55c`: the document parsed and re-written in Rust, bound.
    ("update the bookings (document bound)",
     "WITH v(id, status, expires_at, doc) AS (VALUES %s) UPDATE bookings SET status = v.status, "
     "expires_at = v.expires_at, doc = v.doc FROM v WHERE bookings.id = v.id", 4,
     lambda b: (b[1], "expired", None, b[2])),
    ("read the claims' resources", "SELECT resource_id FROM claims WHERE booking_id IN (%s)", 1, lambda b: (b[1],)),
    ("delete the claims (totals trigger)", "DELETE FROM claims WHERE booking_id IN (%s)", 1, lambda b: (b[1],)),
    # The same with the trigger dropped inside the (rolled back) transaction: its share.
    ("delete the claims (no trigger)", "DELETE FROM claims WHERE booking_id IN (%s)", 1, lambda b: (b[1],)),
    ("copy the outbox rows",
     "INSERT INTO outbox (topic, aggregate_id, payload, created_at) "
     "SELECT 'booking.' || status, id, doc, 1 FROM bookings WHERE id IN (%s)", 1, lambda b: (b[1],)),
]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA cache_size = -65536")
    held = conn.execute(
        "SELECT rowid, id, doc FROM bookings WHERE status = 'held' LIMIT ?", (3 * count,)).fetchall()
    if len(held) < 3 * count:
        sys.exit(f"need {3 * count} held bookings, found {len(held)}")
    for rep in range(3):
        bookings = held[rep * count:(rep + 1) * count]
        figures = []
        for name, sql, columns, values in STATEMENTS:
            conn.execute("BEGIN")
            if "no trigger" in name:
                conn.execute("DROP TRIGGER claim_totals_delete")
            figures.append(f"{name} {per_booking(conn, sql, columns, values, bookings):.2f}")
            conn.execute("ROLLBACK")
        print(f"run {rep + 1} (us per booking): " + "; ".join(figures))


if __name__ == "__main__":
    main()
