#!/usr/bin/env bash
# pgbench-baseline.sh — the baseline Allot's PostgreSQL backend must beat by 2× (issue "Prove the speed").
#
# What it measures: the classic seat-booking design that Allot replaces, run directly on the
# local PostgreSQL with pgbench, with no application in between. One booking is one transaction:
#
#     BEGIN;
#     UPDATE show_seats SET status='HELD', held_by=:user, held_at=now()
#      WHERE id=:seat AND status='AVAILABLE' RETURNING show_id;   -- the row lock is the guard
#     INSERT INTO bookings (seat_id, show_id, user_id) VALUES (...); -- only if the UPDATE took the seat
#     COMMIT;
#
# over a table of N show seats (default 1 000 000: 1000 shows × 1000 seats), each client picking a
# seat uniformly at random, so nearly every attempt succeeds and contention is negligible: what is
# measured is the cost of a durable (synchronous_commit on, server's own fsync) booking transaction.
# It reports tps (without initial connection time), latency avg/p50/p99 (from pgbench's
# per-transaction log), and checks afterwards that bookings and held seats agree.
#
# Why the explicit BEGIN/UPDATE/INSERT/COMMIT (default, --variant transaction): it is the design as
# an application writes it — send the conditional UPDATE, look at whether it hit a row, INSERT the
# booking only then, COMMIT — i.e. literally "UPDATE … WHERE status='AVAILABLE' plus an INSERT per
# booking, in one transaction", four round trips with the seat's row lock held across them.
# The decision is made client-side with pgbench's \aset/\if, as an application would with the
# command's row count. `--variant cte` instead runs the same work as one autocommit statement
# (WITH s AS (UPDATE … RETURNING …) INSERT … SELECT … FROM s): a single round trip, a hand-tuned
# and therefore stronger baseline; run it too if you want the claim to hold against both. On the
# 2-core development machine, at 87 clients, the cte variant did about 2.4× the transactions per
# second of the transaction variant (both CPU-bound there); at 8 clients they were within ~10%.
#
# tps counts attempts, including the few (a few %, growing with the run) whose seat was already
# taken; the JSON also carries "transactions" and "bookings" (bookings / duration = bookings/s).
# The database is left in place after the run for inspection; the next run drops and recreates it.
#
# Schema choices, all in the baseline's favour: only the primary keys (no index on show_id, no
# foreign key from bookings to seats), so each booking writes as little as the design allows.
# The server's settings are never changed; the script creates, fills and drops only its own
# database (default allot_pgbench) and refuses the names test, postgres, template0 and template1.
#
# Usage: bench/pgbench-baseline.sh [--clients N] [--duration-seconds S] [--seats N]
#            [--database-url postgres://postgres@127.0.0.1:5432/allot_pgbench] [--json FILE]
#            [--variant transaction|cte]
# Needs: bash, psql, pgbench (15+), awk, sort.
set -euo pipefail

prog=${0##*/}
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$prog" "$*" >&2; }
usage() {
    cat >&2 <<'EOF'
Usage: pgbench-baseline.sh [--clients N] [--duration-seconds S] [--seats N]
           [--database-url postgres://postgres@127.0.0.1:5432/allot_pgbench] [--json FILE]
           [--variant transaction|cte]
Defaults: --clients 256 (capped to what the server's max_connections allows), --duration-seconds 20,
          --seats 1000000, --variant transaction.
EOF
}

clients_requested=256
duration=20
seats=1000000
database_url=postgres://postgres@127.0.0.1:5432/allot_pgbench
json_file=
variant=transaction
seats_per_show=1000
connection_margin=10

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --clients) need_value "$@"; clients_requested=$2; shift 2 ;;
        --clients=*) clients_requested=${1#*=}; shift ;;
        --duration-seconds) need_value "$@"; duration=$2; shift 2 ;;
        --duration-seconds=*) duration=${1#*=}; shift ;;
        --seats) need_value "$@"; seats=$2; shift 2 ;;
        --seats=*) seats=${1#*=}; shift ;;
        --database-url) need_value "$@"; database_url=$2; shift 2 ;;
        --database-url=*) database_url=${1#*=}; shift ;;
        --json) need_value "$@"; json_file=$2; shift 2 ;;
        --json=*) json_file=${1#*=}; shift ;;
        --variant) need_value "$@"; variant=$2; shift 2 ;;
        --variant=*) variant=${1#*=}; shift ;;
        -h|--help) usage 2>&1; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done

is_pos_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_pos_int "$clients_requested" || die "--clients must be a positive integer, got '$clients_requested'"
is_pos_int "$duration" || die "--duration-seconds must be a positive integer, got '$duration'"
is_pos_int "$seats" || die "--seats must be a positive integer, got '$seats'"
[[ $variant == transaction || $variant == cte ]] || die "--variant must be 'transaction' or 'cte', got '$variant'"

for tool in psql pgbench awk sort; do
    command -v "$tool" >/dev/null || die "'$tool' is not on PATH"
done

# Split the URL into the part before the database name, the name and the query string, so the
# database can be (re)created through the maintenance database 'postgres' on the same server.
url_re='^(postgres(ql)?://[^/?]*)/([^/?]*)(\?.*)?$'
[[ $database_url =~ $url_re ]] ||
    die "--database-url must look like postgres://user@host:port/dbname, got '$database_url'"
url_base=${BASH_REMATCH[1]}
db_name=${BASH_REMATCH[3]}
url_query=${BASH_REMATCH[4]:-}
[[ -n $db_name ]] || die "--database-url names no database: '$database_url'"
[[ $db_name =~ ^[a-z_][a-z0-9_]*$ ]] ||
    die "database name '$db_name' must be lower-case letters, digits and '_' (it is dropped and recreated)"
case $db_name in
    test|postgres|template0|template1)
        die "refusing to drop and recreate database '$db_name'; name a dedicated one (default allot_pgbench)" ;;
esac
admin_url="$url_base/postgres$url_query"

tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/pgbench-baseline.XXXXXX")
cleanup() { rm -rf -- "$tmp_dir"; }
trap cleanup EXIT

# psql that fails on the first error, quiet, unaligned tuples only.
q() { local url=$1; shift; PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" psql "$url" -X -q -v ON_ERROR_STOP=1 -At "$@"; }

server_version=$(q "$admin_url" -c 'SHOW server_version' 2>"$tmp_dir/connect.err") || {
    cat "$tmp_dir/connect.err" >&2
    die "cannot connect to PostgreSQL at '$admin_url' (is the server running and does the user exist?)"
}

# --- Concurrency cap ------------------------------------------------------------------------
# pgbench opens one connection per client, so the usable clients are max_connections minus the
# slots reserved for superusers (and, from PostgreSQL 16, reserved_connections) minus a margin
# for other sessions; if more sessions than the margin are already open, they are subtracted.
max_connections=$(q "$admin_url" -c 'SHOW max_connections')
su_reserved=$(q "$admin_url" -c 'SHOW superuser_reserved_connections')
reserved=$(q "$admin_url" -c "SELECT coalesce(current_setting('reserved_connections', true), '0')")
in_use=$(q "$admin_url" -c "SELECT count(*) FROM pg_stat_activity
                             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
margin=$(( in_use > connection_margin ? in_use : connection_margin ))
clients_cap=$(( max_connections - su_reserved - reserved - margin ))
(( clients_cap >= 1 )) ||
    die "no connections to spare: max_connections=$max_connections, superuser_reserved=$su_reserved, reserved=$reserved, in use=$in_use"
clients=$clients_requested
if (( clients > clients_cap )); then
    clients=$clients_cap
    note "requested concurrency of $clients_requested clients CAPPED to $clients" \
         "(max_connections=$max_connections - superuser_reserved_connections=$su_reserved" \
         "- reserved_connections=$reserved - margin=$margin; $in_use other sessions open)"
fi
threads=$(( clients < 2 ? clients : 2 ))
synchronous_commit=$(q "$admin_url" -c 'SHOW synchronous_commit')
fsync=$(q "$admin_url" -c 'SHOW fsync')

# --- Database and data ---------------------------------------------------------------------
note "recreating database $db_name and filling $seats seats ($seats_per_show per show)"
q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)" -c "CREATE DATABASE \"$db_name\"" \
    || die "could not recreate database '$db_name'"
q "$database_url" -v seats="$seats" -v per_show="$seats_per_show" <<'SQL' || die "could not create and fill the tables"
CREATE TABLE show_seats (
    id       bigint      NOT NULL,
    show_id  bigint      NOT NULL,
    seat_no  integer     NOT NULL,
    status   text        NOT NULL DEFAULT 'AVAILABLE',
    held_by  bigint,
    held_at  timestamptz
);
INSERT INTO show_seats (id, show_id, seat_no)
SELECT g, (g - 1) / :per_show + 1, (g - 1) % :per_show + 1
  FROM generate_series(1, :seats) AS g;
ALTER TABLE show_seats ADD PRIMARY KEY (id);
CREATE TABLE bookings (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seat_id    bigint      NOT NULL,
    show_id    bigint      NOT NULL,
    user_id    bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
SQL
q "$database_url" -c 'VACUUM ANALYZE show_seats' -c 'VACUUM ANALYZE bookings'
# Flush the load's dirty pages now rather than during the measurement (not a settings change).
q "$database_url" -c 'CHECKPOINT' 2>/dev/null || note "CHECKPOINT not permitted for this user; continuing without it"

# --- The pgbench script -------------------------------------------------------------------
script="$tmp_dir/booking.sql"
if [[ $variant == transaction ]]; then
    # \aset assigns only when the UPDATE returns a row, so 'took' stays 0 when the seat was gone.
    cat >"$script" <<'SQL'
\set seat random(1, :seats)
\set user random(1, 1000000000)
\set took 0
BEGIN;
UPDATE show_seats SET status = 'HELD', held_by = :user, held_at = now()
 WHERE id = :seat AND status = 'AVAILABLE'
RETURNING 1 AS took, show_id AS show_id \aset
\if :took
INSERT INTO bookings (seat_id, show_id, user_id) VALUES (:seat, :show_id, :user);
\endif
COMMIT;
SQL
else
    cat >"$script" <<'SQL'
\set seat random(1, :seats)
\set user random(1, 1000000000)
WITH s AS (
    UPDATE show_seats SET status = 'HELD', held_by = :user, held_at = now()
     WHERE id = :seat AND status = 'AVAILABLE'
    RETURNING id, show_id
)
INSERT INTO bookings (seat_id, show_id, user_id) SELECT id, show_id, :user FROM s;
SQL
fi

# --- Run ----------------------------------------------------------------------------------------
note "pgbench: variant=$variant clients=$clients threads=$threads duration=${duration}s (-M prepared, -n)"
out="$tmp_dir/pgbench.out"
set +e
pgbench -n -M prepared -c "$clients" -j "$threads" -T "$duration" -P 5 \
    -D seats="$seats" -f "$script" -l --log-prefix="$tmp_dir/txlog" \
    "$database_url" >"$out" 2>&1
rc=$?
set -e
cat "$out" >&2
(( rc == 0 )) || die "pgbench failed (exit $rc); see its output above"

tps=$(awk '/^tps = .*without initial connection time/ { print $3 }' "$out")
lat_avg=$(awk '/^latency average = / { print $4 }' "$out")
transactions=$(awk '/^number of transactions actually processed: / { print $6 }' "$out")
failed=$(awk '/^number of failed transactions: / { print $5 }' "$out")
[[ -n $tps && -n $lat_avg && -n $transactions ]] || die "could not parse pgbench's output (above)"
failed=${failed:-0}

# Per-transaction log lines: client_id transaction_no latency_us script_no epoch_s epoch_us.
# The latency field reads 'failed' or 'skipped' for transactions that did not complete.
shopt -s nullglob
logs=("$tmp_dir"/txlog.*)
shopt -u nullglob
(( ${#logs[@]} > 0 )) || die "pgbench wrote no per-transaction log"
percentiles=$(
    awk '$3 ~ /^[0-9]+$/ { print $3 }' "${logs[@]}" | sort -n |
    awk '{ v[NR] = $1 }
         END {
             if (NR == 0) { print 0, "null", "null"; exit }
             i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
             i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
             printf "%d %.3f %.3f\n", NR, v[i50] / 1000, v[i99] / 1000
         }') || die "could not compute latency percentiles from the per-transaction log"
read -r logged p50 p99 <<<"$percentiles"

# --- Consistency check ------------------------------------------------------------------------
# Fresh statistics first: the planner still believes bookings is empty and would otherwise pick a
# nested-loop anti-join over a sequential scan of the seats (tens of seconds instead of a hash join).
counts=$(q "$database_url" -F ' ' -c 'ANALYZE bookings' -c 'ANALYZE show_seats' -c "
    SELECT (SELECT count(*) FROM bookings),
           (SELECT count(*) FROM show_seats WHERE status = 'HELD'),
           (SELECT count(*) FROM bookings b
             WHERE NOT EXISTS (SELECT 1 FROM show_seats s
                                WHERE s.id = b.seat_id AND s.status = 'HELD' AND s.held_by = b.user_id)),
           (SELECT count(*) - count(DISTINCT seat_id) FROM bookings)") ||
    die "could not count bookings and held seats in '$db_name'"
read -r bookings seats_held orphans duplicates <<<"$counts"
[[ $bookings =~ ^[0-9]+$ && $seats_held =~ ^[0-9]+$ && $orphans =~ ^[0-9]+$ && $duplicates =~ ^-?[0-9]+$ ]] ||
    die "could not count bookings and held seats in '$db_name'"
consistent=false
(( bookings == seats_held && orphans == 0 && duplicates == 0 )) && consistent=true

nproc_n=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
mem_total_mib=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)

# --- Report ---------------------------------------------------------------------------------
cat <<EOF
pgbench baseline: conditional UPDATE + INSERT per booking ($variant)
  server        PostgreSQL $server_version, synchronous_commit=$synchronous_commit, fsync=$fsync
  machine       $nproc_n CPUs, $mem_total_mib MiB
  clients       $clients (requested $clients_requested), $threads threads, ${duration}s, $seats seats
  tps           $tps (without initial connection time)
  latency ms    avg $lat_avg  p50 $p50  p99 $p99  ($logged logged transactions)
  transactions  $transactions processed, $failed failed
  bookings      $bookings inserted, $seats_held seats held, $orphans without their held seat, $duplicates duplicate seats
  consistent    $consistent
EOF

if [[ -n $json_file ]]; then
    json_tmp="$tmp_dir/result.json"
    printf '{"name":"pgbench_conditional_update_insert","variant":"%s","clients_requested":%d,"clients":%d,"threads":%d,"duration_seconds":%d,"seats":%d,"tps":%s,"latency_ms":{"avg":%s,"p50":%s,"p99":%s},"transactions":%d,"failed_transactions":%d,"bookings":%d,"seats_held":%d,"consistent":%s,"nproc":%d,"mem_total_mib":%d,"postgres_version":"%s","synchronous_commit":"%s","fsync":"%s"}\n' \
        "$variant" "$clients_requested" "$clients" "$threads" "$duration" "$seats" "$tps" \
        "$lat_avg" "$p50" "$p99" "$transactions" "$failed" "$bookings" "$seats_held" "$consistent" \
        "$nproc_n" "$mem_total_mib" "$server_version" "$synchronous_commit" "$fsync" >"$json_tmp"
    cp -- "$json_tmp" "$json_file" || die "could not write --json file '$json_file'"
    note "wrote $json_file"
fi

[[ $consistent == true ]] || die "inconsistent result: $bookings bookings vs $seats_held held seats ($orphans orphans, $duplicates duplicates)"
