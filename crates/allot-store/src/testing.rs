//! Test support shared by every crate's test suites: a fresh, empty PostgreSQL database per
//! test, created on the server named by `ALLOT_TEST_DATABASE_URL` (default: the local
//! `postgres://postgres@127.0.0.1:5432/test`).
//!
//! When the server cannot be reached the suites must not pass silently in CI: with `CI` set
//! [`fresh_postgres_database`] panics; on a laptop without PostgreSQL it returns `None` after
//! printing why, and the calling test returns early.

use sqlx::{Connection, Executor, PgConnection};

pub const TEST_DATABASE_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Prefix of every database created here, so they are easy to find and drop.
pub const TEST_DATABASE_PREFIX: &str = "allot_t_";
/// Test databases older than this are dropped by the next test run (names carry a UUIDv7, so
/// their age is known): crashed or killed runs do not pile databases up.
pub const TEST_DATABASE_AGE_MAX_SECONDS: u64 = 3600;

/// The admin URL tests create their databases through.
pub fn test_server_url() -> String {
    std::env::var("ALLOT_TEST_DATABASE_URL").unwrap_or_else(|_| TEST_DATABASE_URL_DEFAULT.to_owned())
}

/// True where a missing PostgreSQL must fail the run (CI sets `CI`).
pub fn postgres_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Creates a new empty database and returns its URL, or `None` (outside CI only) when no
/// PostgreSQL server is reachable.
pub async fn fresh_postgres_database() -> Option<String> {
    let admin_url = test_server_url();
    let mut admin = match PgConnection::connect(&admin_url).await {
        Ok(conn) => conn,
        Err(e) if !postgres_required() => {
            eprintln!("SKIPPED: PostgreSQL not reachable at {admin_url} ({e}); set CI=1 to make this a failure");
            return None;
        }
        Err(e) => panic!("PostgreSQL is required (CI is set) but {admin_url} is not reachable: {e}"),
    };
    drop_stale_databases(&mut admin).await;
    let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::now_v7().as_simple());
    // The name is generated here from hex digits only: nothing to escape.
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let _ = admin.close().await;
    Some(replace_database(&admin_url, &name))
}

/// Drops a database made by [`fresh_postgres_database`], disconnecting whoever still uses it.
pub async fn drop_postgres_database(url: &str) {
    let Some(name) = url.rsplit('/').next().map(|n| n.split('?').next().unwrap_or(n).to_owned()) else {
        return;
    };
    assert!(name.starts_with(TEST_DATABASE_PREFIX), "only test databases are dropped");
    if let Ok(mut admin) = PgConnection::connect(&test_server_url()).await {
        let _ = admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
        let _ = admin.close().await;
    }
}

async fn drop_stale_databases(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
        .bind(TEST_DATABASE_PREFIX)
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    for name in names {
        let created = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .and_then(|hex| uuid::Uuid::parse_str(hex).ok())
            .and_then(|id| id.get_timestamp())
            .map(|t| t.to_unix().0);
        if created.is_some_and(|c| now.saturating_sub(c) > TEST_DATABASE_AGE_MAX_SECONDS) {
            let _ = admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
        }
    }
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn database_name_is_replaced_keeping_parameters() {
        assert_eq!(replace_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(replace_database("postgres://u@h/test?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    }
}
