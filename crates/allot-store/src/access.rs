//! Roles and partner API keys on both backends: role changes run in the writer's transaction
//! (read the user's roles, change them, write them back), so two changes of one user cannot
//! lose each other, and the last admin is counted under lock. Keys are looked up by digest.

use std::collections::BTreeSet;

use allot_app::StoreError;
use allot_app::access::{ApiKey, LAST_ADMIN, RoleRevoke, Scope};
use allot_app::store::{Page, PageRequest, Role};
use sqlx::QueryBuilder;

use crate::common::{after_key, is_unique_violation, page_of, ts};
use crate::writer::Outcome;

/// A stored key: id, name, key_hash, scopes, created_by, created_at, revoked_at.
pub type ApiKeyRow = (String, String, String, String, String, i64, Option<i64>);
/// The columns of [`ApiKeyRow`], in order.
pub const API_KEY_COLUMNS: &str = "id, name, key_hash, scopes, created_by, created_at, revoked_at";
/// Matches the rows of admins (roles are stored comma-separated).
pub(crate) const IS_ADMIN: &str = "(',' || roles || ',') LIKE '%,admin,%'";

/// Why a venue is not created for a manager whose role was revoked after the request creating
/// it was authorized: its row in `venue_managers` would make them its manager again the day
/// the role is granted back for another venue.
pub(crate) const NOT_A_MANAGER: &str = "the manager role was revoked; only managers create venues";

/// Whether every user of `ids` exists and holds the manager role, given the `roles` of those
/// that exist.
pub(crate) fn all_managers(ids: &[String], roles: &[Vec<Role>]) -> bool {
    let distinct: BTreeSet<&String> = ids.iter().collect();
    roles.len() == distinct.len() && roles.iter().all(|r| r.contains(&Role::Manager))
}

pub(crate) fn scopes_text(scopes: &BTreeSet<Scope>) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
}

fn api_key_of(row: ApiKeyRow) -> Result<ApiKey, StoreError> {
    let (id, name, key_hash, scopes, created_by, created_at, revoked_at) = row;
    let scopes = scopes
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| Scope::try_from(s).map_err(|_| StoreError::Corrupt(format!("API key {id}: scope {s}"))))
        .collect::<Result<_, _>>()?;
    Ok(ApiKey {
        id: id.parse().map_err(|_| StoreError::Corrupt(format!("API key id {id}")))?,
        created_by: created_by.parse().map_err(|_| StoreError::Corrupt(format!("API key {id}: creator")))?,
        name,
        key_hash,
        scopes,
        created_at: ts(created_at),
        revoked_at: revoked_at.map(ts),
    })
}

fn keys_page(rows: Vec<ApiKeyRow>, limit: u32) -> Result<Page<ApiKey>, StoreError> {
    let rows = rows.into_iter().map(|r| Ok((r.0.clone(), api_key_of(r)?))).collect::<Result<Vec<_>, StoreError>>()?;
    Ok(page_of(rows, limit))
}

/// `INSERT` of a new key, for either backend.
fn insert_key_query<DB: sqlx::Database>(key: &ApiKey) -> QueryBuilder<DB>
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new("INSERT INTO api_keys (id, name, key_hash, scopes, created_by, created_at) ");
    qb.push_values([key], |mut b, k| {
        b.push_bind(k.id.to_string())
            .push_bind(k.name.clone())
            .push_bind(k.key_hash.clone())
            .push_bind(scopes_text(&k.scopes))
            .push_bind(k.created_by.to_string())
            .push_bind(k.created_at.as_second());
    });
    qb
}

/// A duplicate key (id or digest) is a conflict, not a database failure.
fn inserted<T>(result: Result<T, sqlx::Error>) -> Outcome<(), StoreError> {
    match result {
        Ok(_) => Ok(Ok(())),
        Err(e) if is_unique_violation(&e) => Ok(Err(StoreError::Conflict("API key exists".into()))),
        Err(e) => Err(e),
    }
}

/// The unrevoked key with this digest.
fn key_by_hash_query<DB: sqlx::Database>(key_hash: &str) -> QueryBuilder<DB>
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = "));
    qb.push_bind(key_hash.to_owned()).push(" AND revoked_at IS NULL");
    qb
}

/// One page of keys (one row more than the page: it says whether there is more).
fn keys_query<DB: sqlx::Database>(page: PageRequest) -> QueryBuilder<DB>
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id > "));
    qb.push_bind(after_key(&page)).push(" ORDER BY id LIMIT ").push_bind(i64::from(page.limit) + 1);
    qb
}

pub(crate) fn parse_roles(text: &str) -> Vec<Role> {
    text.split(',').filter_map(Role::parse).collect()
}

pub(crate) fn roles_text(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

pub(crate) fn with(mut roles: Vec<Role>, role: Role) -> Vec<Role> {
    if !roles.contains(&role) {
        roles.push(role);
    }
    roles
}

pub(crate) fn without(mut roles: Vec<Role>, role: Role) -> Vec<Role> {
    roles.retain(|r| *r != role);
    roles
}

/// What a revocation does once the user's row is read and locked.
pub(crate) enum RevokeStep {
    /// Just write these roles.
    Roles(Vec<Role>),
    /// Drop the admin role, if more than one admin is left.
    LastAdminCheck(Vec<Role>),
    /// Drop the management of one venue; the manager role goes with the last one.
    Venue(String),
    /// Drop every venue and the manager role.
    AllVenues(Vec<Role>),
}

pub(crate) fn revoke_step(roles: Vec<Role>, revoke: RoleRevoke) -> RevokeStep {
    match revoke {
        RoleRevoke::Customer => RevokeStep::Roles(without(roles, Role::Customer)),
        RoleRevoke::Admin if roles.contains(&Role::Admin) => RevokeStep::LastAdminCheck(without(roles, Role::Admin)),
        RoleRevoke::Admin => RevokeStep::Roles(roles),
        RoleRevoke::Manager(Some(venue)) => RevokeStep::Venue(venue.to_string()),
        RoleRevoke::Manager(None) => RevokeStep::AllVenues(without(roles, Role::Manager)),
    }
}

pub mod sqlite {
    //! The SQLite reads of keys; the writes are the writer's (`crate::sqlite::tx`).

    use allot_app::StoreError;
    use allot_app::access::ApiKey;
    use allot_app::store::{Page, PageRequest};
    use sqlx::SqlitePool;

    use super::{ApiKeyRow, keys_page};
    use crate::writer::db_error;

    pub async fn api_key_by_hash(read: &SqlitePool, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let mut query = super::key_by_hash_query::<sqlx::Sqlite>(key_hash);
        let row: Option<ApiKeyRow> = query.build_query_as().fetch_optional(read).await.map_err(db_error)?;
        row.map(super::api_key_of).transpose()
    }

    pub async fn api_keys(read: &SqlitePool, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        let mut query = super::keys_query::<sqlx::Sqlite>(page);
        let rows: Vec<ApiKeyRow> = query.build_query_as().fetch_all(read).await.map_err(db_error)?;
        keys_page(rows, page.limit)
    }
}

pub mod postgres {
    //! The PostgreSQL statements: nodes write concurrently, so a role change locks the user's
    //! row, and revoking an admin first locks every admin's row (in id order, so two such
    //! revocations cannot deadlock) before counting them.

    use allot_app::StoreError;
    use allot_app::access::{ApiKey, RoleGrant, RoleRevoke};
    use allot_app::store::{Page, PageRequest, Role};
    use allot_core::ids::{ApiKeyId, UserId};
    use futures::future::BoxFuture;
    use jiff::Timestamp;
    use sqlx::{PgConnection, PgPool};

    use super::{
        ApiKeyRow, IS_ADMIN, LAST_ADMIN, RevokeStep, keys_page, parse_roles, revoke_step, roles_text, with, without,
    };
    use crate::cache;
    use crate::postgres::PgBackend;
    use crate::writer::{Outcome, WriteCtx, Writer, db_error};

    type Ctx = WriteCtx<PgConnection>;

    async fn roles_of(conn: &mut PgConnection, user: &str) -> Result<Option<Vec<Role>>, sqlx::Error> {
        let roles: Option<String> = sqlx::query_scalar("SELECT roles FROM users WHERE id = $1 FOR UPDATE")
            .bind(user)
            .fetch_optional(conn)
            .await?;
        Ok(roles.as_deref().map(parse_roles))
    }

    async fn set_roles(conn: &mut PgConnection, user: &str, roles: &[Role]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE users SET roles = $1 WHERE id = $2")
            .bind(roles_text(roles))
            .bind(user)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn grant_role(writer: &Writer<PgBackend>, user: UserId, grant: RoleGrant) -> Result<(), StoreError> {
        writer
            .exec_retrying(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let user = user.to_string();
                    let Some(roles) = roles_of(&mut ctx.conn, &user).await? else {
                        return Ok(Err(StoreError::NotFound("user")));
                    };
                    let role = match grant {
                        RoleGrant::Customer => Role::Customer,
                        RoleGrant::Admin => Role::Admin,
                        RoleGrant::Manager(venue) => {
                            sqlx::query(
                                "INSERT INTO venue_managers (venue_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            )
                            .bind(venue.to_string())
                            .bind(&user)
                            .execute(&mut ctx.conn)
                            .await?;
                            Role::Manager
                        }
                    };
                    set_roles(&mut ctx.conn, &user, &with(roles, role)).await?;
                    crate::postgres::announce(&mut ctx.conn, &cache::key("user", &user)).await?;
                    Ok(Ok(()))
                })
            })
            .await
    }

    /// Locks every admin's row, in id order, and returns how many there are. Under READ
    /// COMMITTED a row another transaction just demoted is re-checked after its lock is granted
    /// and left out, so two admins revoking each other at once cannot both succeed.
    async fn lock_admins(conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
        let sql = format!("SELECT id FROM users WHERE {IS_ADMIN} ORDER BY id FOR UPDATE");
        let admins: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(conn).await?;
        Ok(admins.len())
    }

    pub async fn revoke_role(writer: &Writer<PgBackend>, user: UserId, revoke: RoleRevoke) -> Result<(), StoreError> {
        writer
            .exec_retrying(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let user = user.to_string();
                    let conn = &mut ctx.conn;
                    // Admins first, then the user's row (already locked if an admin): one order.
                    let admins = if revoke == RoleRevoke::Admin { lock_admins(&mut *conn).await? } else { 0 };
                    let Some(roles) = roles_of(&mut *conn, &user).await? else {
                        return Ok(Err(StoreError::NotFound("user")));
                    };
                    let roles = match revoke_step(roles.clone(), revoke) {
                        RevokeStep::Roles(r) => r,
                        RevokeStep::LastAdminCheck(_) if admins <= 1 => {
                            return Ok(Err(StoreError::Conflict(LAST_ADMIN.to_owned())));
                        }
                        RevokeStep::LastAdminCheck(r) => r,
                        RevokeStep::Venue(venue) => {
                            let deleted =
                                sqlx::query("DELETE FROM venue_managers WHERE user_id = $1 AND venue_id = $2")
                                    .bind(&user)
                                    .bind(venue)
                                    .execute(&mut *conn)
                                    .await?
                                    .rows_affected();
                            let left: i64 =
                                sqlx::query_scalar("SELECT COUNT(*) FROM venue_managers WHERE user_id = $1")
                                    .bind(&user)
                                    .fetch_one(&mut *conn)
                                    .await?;
                            if deleted > 0 && left == 0 { without(roles, Role::Manager) } else { roles }
                        }
                        RevokeStep::AllVenues(r) => {
                            sqlx::query("DELETE FROM venue_managers WHERE user_id = $1")
                                .bind(&user)
                                .execute(&mut *conn)
                                .await?;
                            r
                        }
                    };
                    set_roles(&mut *conn, &user, &roles).await?;
                    crate::postgres::announce(conn, &cache::key("user", &user)).await?;
                    Ok(Ok(()))
                })
            })
            .await
    }

    pub async fn insert_api_key(writer: &Writer<PgBackend>, key: &ApiKey) -> Result<(), StoreError> {
        let mut query = super::insert_key_query::<sqlx::Postgres>(key);
        writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move { super::inserted(query.build().execute(&mut ctx.conn).await) })
            })
            .await
    }

    pub async fn api_key_by_hash(read: &PgPool, key_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let mut query = super::key_by_hash_query::<sqlx::Postgres>(key_hash);
        let row: Option<ApiKeyRow> = query.build_query_as().fetch_optional(read).await.map_err(db_error)?;
        row.map(super::api_key_of).transpose()
    }

    pub async fn api_keys(read: &PgPool, page: PageRequest) -> Result<Page<ApiKey>, StoreError> {
        let mut query = super::keys_query::<sqlx::Postgres>(page);
        let rows: Vec<ApiKeyRow> = query.build_query_as().fetch_all(read).await.map_err(db_error)?;
        keys_page(rows, page.limit)
    }

    pub async fn revoke_api_key(writer: &Writer<PgBackend>, id: ApiKeyId, now: Timestamp) -> Result<(), StoreError> {
        writer
            .exec(move |ctx: &mut Ctx| -> BoxFuture<'_, Outcome<(), StoreError>> {
                Box::pin(async move {
                    let now = ctx.now(now).as_second();
                    let changed =
                        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                            .bind(now)
                            .bind(id.to_string())
                            .execute(&mut ctx.conn)
                            .await?
                            .rows_affected();
                    Ok(if changed == 0 { Err(StoreError::NotFound("API key")) } else { Ok(()) })
                })
            })
            .await
    }
}
