//! Who may do what beyond their own bookings: admins grant and revoke roles (`customer`,
//! `manager` of given venues, `admin`) and issue partner API keys.
//!
//! An API key (`allot_pk_<32 random bytes, base64url>`) is shown once, when it is created, and
//! stored only as its SHA-256 digest. It authenticates a partner principal: no user roles, only
//! the key's scopes, and the key's id as its identity (bookings a partner holds carry it as
//! `customer_id`, so a partner sees and changes only its own).

use std::collections::BTreeSet;
use std::fmt;

use allot_core::ValidationError;
use allot_core::ids::{ApiKeyId, UserId, VenueId};
use jiff::Timestamp;

use crate::App;
use crate::audit;
use crate::auth::{Principal, random_token, sha256_hex};
use crate::error::{AppError, AppResult};
use crate::store::{Page, PageRequest, Role, User};

/// Every API key starts with this, so a bearer token is told apart from an access token (and
/// rate limits can key partners by it) without a lookup.
pub const API_KEY_PREFIX: &str = "allot_pk_";
pub const API_KEY_NAME_LEN_MAX: usize = 100;

/// What a partner's API key may do, on top of the public catalogue reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Reads inventory; will gate the inventory change feed (`GET /inventory/changes`).
    InventoryRead,
    /// Lists and reads the partner's own bookings.
    BookingsRead,
    /// Holds, confirms and cancels the partner's own bookings.
    BookingsWrite,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::InventoryRead, Scope::BookingsRead, Scope::BookingsWrite];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::InventoryRead => "inventory:read",
            Scope::BookingsRead => "bookings:read",
            Scope::BookingsWrite => "bookings:write",
        }
    }

    fn missing_message(self) -> &'static str {
        match self {
            Scope::InventoryRead => "this API key lacks the inventory:read scope",
            Scope::BookingsRead => "this API key lacks the bookings:read scope",
            Scope::BookingsWrite => "this API key lacks the bookings:write scope",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text names no scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope; known scopes: inventory:read, bookings:read, bookings:write")]
pub struct UnknownScope;

impl TryFrom<&str> for Scope {
    type Error = UnknownScope;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s).ok_or(UnknownScope)
    }
}

/// A role to grant: a manager's is always on one venue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleGrant {
    Customer,
    Manager(VenueId),
    Admin,
}

impl RoleGrant {
    /// `venue` is required for a manager and refused for every other role.
    pub fn new(role: Role, venue: Option<VenueId>) -> Result<Self, ValidationError> {
        match (role, venue) {
            (Role::Manager, Some(v)) => Ok(RoleGrant::Manager(v)),
            (Role::Manager, None) => Err(ValidationError::field("venue_id", "required for the manager role")),
            (_, Some(_)) => Err(ValidationError::field("venue_id", "only the manager role is per venue")),
            (Role::Customer, None) => Ok(RoleGrant::Customer),
            (Role::Admin, None) => Ok(RoleGrant::Admin),
        }
    }
}

/// A role to revoke. `Manager(Some(v))` ends the management of `v` (and the manager role with
/// the last venue); `Manager(None)` ends the manager role and every venue at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleRevoke {
    Customer,
    Manager(Option<VenueId>),
    Admin,
}

impl RoleRevoke {
    pub fn new(role: Role, venue: Option<VenueId>) -> Result<Self, ValidationError> {
        match (role, venue) {
            (Role::Manager, v) => Ok(RoleRevoke::Manager(v)),
            (_, Some(_)) => Err(ValidationError::field("venue_id", "only the manager role is per venue")),
            (Role::Customer, None) => Ok(RoleRevoke::Customer),
            (Role::Admin, None) => Ok(RoleRevoke::Admin),
        }
    }
}

/// Why the admin role cannot be revoked: nobody could manage roles any more.
pub const LAST_ADMIN: &str = "this is the last admin; grant the admin role to someone else first";

/// A partner's API key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub name: String,
    /// SHA-256 (hex) of the key.
    pub key_hash: String,
    pub scopes: BTreeSet<Scope>,
    pub created_by: UserId,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// A key just created: the only time its secret exists outside the caller's hands.
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Principal {
    /// Refuses a partner whose key lacks `scope`; users are governed by their roles instead.
    pub fn require_scope(&self, scope: Scope) -> AppResult<()> {
        match &self.scopes {
            Some(scopes) if !scopes.contains(&scope) => Err(AppError::Forbidden(scope.missing_message())),
            _ => Ok(()),
        }
    }

    fn require_admin(&self) -> AppResult<()> {
        if self.is_admin() { Ok(()) } else { Err(AppError::Forbidden("only admins manage users, roles and API keys")) }
    }
}

fn parse_key_name(raw: &str) -> Result<String, ValidationError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > API_KEY_NAME_LEN_MAX {
        return Err(ValidationError::field("name", format!("must be 1 to {API_KEY_NAME_LEN_MAX} characters")));
    }
    Ok(name.to_owned())
}

impl App {
    pub async fn user(&self, principal: &Principal, id: UserId) -> AppResult<User> {
        principal.require_admin()?;
        self.store.user_by_id(id).await?.ok_or(AppError::NotFound("user"))
    }

    /// Takes effect on the user's next request: roles are read afresh for every request.
    pub async fn grant_role(&self, principal: &Principal, id: UserId, grant: RoleGrant) -> AppResult<User> {
        audit::detail("role", &format!("{grant:?}"));
        if let RoleGrant::Manager(venue) = grant {
            audit::set_venue(venue);
        }
        principal.require_admin()?;
        if let RoleGrant::Manager(venue) = grant {
            self.venue(venue).await?;
        }
        Ok(self.store.grant_role(id, grant).await?)
    }

    /// Revoking a role the user does not have changes nothing. The last admin stays (409).
    pub async fn revoke_role(&self, principal: &Principal, id: UserId, revoke: RoleRevoke) -> AppResult<User> {
        audit::detail("role", &format!("{revoke:?}"));
        principal.require_admin()?;
        Ok(self.store.revoke_role(id, revoke).await?)
    }

    pub async fn create_api_key(
        &self,
        principal: &Principal,
        name: &str,
        scopes: BTreeSet<Scope>,
    ) -> AppResult<CreatedApiKey> {
        principal.require_admin()?;
        let mut errors = allot_core::FieldErrors::new();
        let name = parse_key_name(name).map_err(|e| errors.merge(e.fields)).ok();
        if scopes.is_empty() {
            errors.add("scopes", "give at least one scope");
        }
        errors.into_result()?;
        let secret = format!("{API_KEY_PREFIX}{}", random_token());
        let key = ApiKey {
            id: ApiKeyId::new(),
            name: name.unwrap_or_default(),
            key_hash: sha256_hex(secret.as_bytes()),
            scopes,
            created_by: principal.user_id,
            created_at: self.clock.now(),
            revoked_at: None,
        };
        audit::set_target(key.id);
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        audit::detail("scopes", &scopes.join(" "));
        self.store.insert_api_key(&key).await?;
        Ok(CreatedApiKey { key, secret })
    }

    /// Every key, revoked ones included (with `revoked_at`), oldest first.
    pub async fn api_keys(&self, principal: &Principal, page: PageRequest) -> AppResult<Page<ApiKey>> {
        principal.require_admin()?;
        Ok(self.store.api_keys(page).await?)
    }

    /// The key stops working at once; revoking it again changes nothing.
    pub async fn revoke_api_key(&self, principal: &Principal, id: ApiKeyId) -> AppResult<()> {
        principal.require_admin()?;
        Ok(self.store.revoke_api_key(id, self.clock.now()).await?)
    }

    /// The partner behind an unrevoked key.
    pub(crate) async fn authenticate_api_key(&self, secret: &str) -> AppResult<Principal> {
        let hash = sha256_hex(secret.as_bytes());
        let key = self.store.api_key_by_hash(&hash).await?.ok_or(AppError::Unauthenticated)?;
        // The store looked the digest up; check it here too, without a timing signal, so a
        // store that matched loosely can never let another key through.
        if key.revoked_at.is_some() || !constant_time_eq(key.key_hash.as_bytes(), hash.as_bytes()) {
            return Err(AppError::Unauthenticated);
        }
        Ok(Principal::partner(&key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_from_their_names_only() {
        for scope in Scope::ALL {
            assert_eq!(Scope::try_from(scope.as_str()), Ok(scope));
        }
        for bad in ["", "bookings", "BOOKINGS:READ", "bookings:read ", "admin"] {
            assert_eq!(Scope::try_from(bad), Err(UnknownScope), "{bad:?}");
        }
    }

    #[test]
    fn only_managers_are_per_venue() {
        let v = VenueId::new();
        assert_eq!(RoleGrant::new(Role::Manager, Some(v)).unwrap(), RoleGrant::Manager(v));
        assert!(RoleGrant::new(Role::Manager, None).is_err());
        assert!(RoleGrant::new(Role::Admin, Some(v)).is_err());
        assert!(RoleGrant::new(Role::Customer, Some(v)).is_err());
        assert_eq!(RoleRevoke::new(Role::Manager, None).unwrap(), RoleRevoke::Manager(None));
        assert!(RoleRevoke::new(Role::Admin, Some(v)).is_err());
    }

    #[test]
    fn constant_time_eq_compares_whole_inputs() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn partners_pass_only_their_scopes_and_never_role_checks() {
        let key = ApiKey {
            id: ApiKeyId::new(),
            name: "OTA".into(),
            key_hash: String::new(),
            scopes: BTreeSet::from([Scope::BookingsRead]),
            created_by: UserId::new(),
            created_at: Timestamp::UNIX_EPOCH,
            revoked_at: None,
        };
        let partner = Principal::partner(&key);
        assert!(partner.require_scope(Scope::BookingsRead).is_ok());
        assert!(matches!(partner.require_scope(Scope::BookingsWrite), Err(AppError::Forbidden(_))));
        assert!(!partner.is_admin() && !partner.manages(VenueId::new()));
        assert!(partner.require_admin().is_err());
        assert_eq!(partner.user_id.as_uuid(), key.id.as_uuid(), "a partner acts as its key");
    }
}
