//! Accounts and sessions: Argon2id password hashes, short-lived signed access tokens (HS256
//! JWT) and rotating refresh tokens stored only as SHA-256 digests.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use allot_core::ValidationError;
use allot_core::ids::{UserId, VenueId};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::Engine;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::App;
use crate::access::{API_KEY_PREFIX, ApiKey, Scope};
use crate::audit;
use crate::error::{AppError, AppResult};
use crate::store::{RefreshToken, Role, RotateOutcome, User};

pub const ACCESS_TOKEN_TTL_SECONDS: i64 = 15 * 60;
pub const REFRESH_TOKEN_TTL_SECONDS: i64 = 30 * 24 * 3600;
pub const PASSWORD_LEN_MIN: usize = 8;
pub const PASSWORD_LEN_MAX: usize = 256;
pub const EMAIL_LEN_MAX: usize = 254;

/// Who is making a request, as established from a verified access token or API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user, or for a partner the API key's id (the `customer_id` of its bookings).
    pub user_id: UserId,
    pub roles: Vec<Role>,
    pub venues: Vec<VenueId>,
    /// `Some` for a partner's API key: what it may do. Partners have no roles.
    pub scopes: Option<BTreeSet<Scope>>,
}

impl Principal {
    pub fn of_user(user: &User) -> Self {
        Principal { user_id: user.id, roles: user.roles.clone(), venues: user.venues.clone(), scopes: None }
    }

    pub fn partner(key: &ApiKey) -> Self {
        Principal {
            user_id: UserId::from_uuid(key.id.as_uuid()),
            roles: Vec::new(),
            venues: Vec::new(),
            scopes: Some(key.scopes.clone()),
        }
    }

    pub fn is_partner(&self) -> bool {
        self.scopes.is_some()
    }
    /// Never a partner, whatever else the principal carries.
    pub fn is_admin(&self) -> bool {
        !self.is_partner() && self.roles.contains(&Role::Admin)
    }
    /// Admins manage every venue; managers the ones assigned to them.
    pub fn manages(&self, venue: VenueId) -> bool {
        self.is_admin() || (!self.is_partner() && self.roles.contains(&Role::Manager) && self.venues.contains(&venue))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    sub: String,
    exp: i64,
    iat: i64,
}

/// Tokens handed out at login and refresh.
#[derive(Debug, Clone)]
pub struct Session {
    pub access_token: String,
    pub expires_in: i64,
    pub refresh_token: String,
}

/// Signing keys for access tokens.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    /// Built once: building it allocates, and every authenticated request verifies a token.
    validation: jsonwebtoken::Validation,
    verified: Arc<VerifiedTokens>,
}

/// Past this many verified tokens remembered, the memo is emptied rather than grown.
pub const VERIFIED_TOKENS_MAX: usize = 65_536;

/// Access tokens whose signature this process verified, with their subject and expiry. A
/// client sends the same token on every request until it expires, and verifying it (base64,
/// HMAC-SHA256, JSON) was ~5 % of the request threads' time under load. It remembers only
/// what a verification proved, keyed by the whole token; expiry is still checked on every use.
#[derive(Default)]
struct VerifiedTokens {
    entries: RwLock<HashMap<Box<str>, (UserId, i64)>>,
}

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<(UserId, i64)> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).get(token).copied()
    }

    fn put(&self, token: &str, subject: UserId, expires_at: i64) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= VERIFIED_TOKENS_MAX {
            entries.clear();
        }
        entries.insert(token.into(), (subject, expires_at));
    }
}

/// HS256 only; expiry is checked against the injected clock, not the system time.
fn access_validation() -> jsonwebtoken::Validation {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    validation
}

impl TokenKeys {
    pub fn from_secret(secret: &[u8]) -> Self {
        assert!(secret.len() >= 32, "token secret must be at least 32 bytes");
        Self {
            encoding: jsonwebtoken::EncodingKey::from_secret(secret),
            decoding: jsonwebtoken::DecodingKey::from_secret(secret),
            validation: access_validation(),
            verified: Arc::default(),
        }
    }
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

/// A new random secret, base64url, for tokens.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub async fn hash_password(password: String) -> AppResult<String> {
    tokio::task::spawn_blocking(move || Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(format!("password hashing failed: {e}")))
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || Argon2::default().verify_password(password.as_bytes(), hash.as_str()).is_ok())
        .await
        .unwrap_or(false)
}

/// A normalised, plausible e-mail address.
pub fn parse_email(raw: &str) -> Result<String, ValidationError> {
    let email = raw.trim().to_lowercase();
    let plausible = email.len() <= EMAIL_LEN_MAX
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
        && !email.chars().any(char::is_whitespace);
    if plausible { Ok(email) } else { Err(ValidationError::field("email", "must be an e-mail address")) }
}

pub fn check_password_rules(password: &str) -> Result<(), ValidationError> {
    let len = password.chars().count();
    if !(PASSWORD_LEN_MIN..=PASSWORD_LEN_MAX).contains(&len) {
        return Err(ValidationError::field(
            "password",
            format!("must be {PASSWORD_LEN_MIN} to {PASSWORD_LEN_MAX} characters"),
        ));
    }
    Ok(())
}

impl App {
    pub async fn register(&self, email: &str, password: &str, name: &str) -> AppResult<User> {
        let mut errors = allot_core::FieldErrors::new();
        let email = parse_email(email).map_err(|e| errors.merge(e.fields)).ok();
        if let Err(e) = check_password_rules(password) {
            errors.merge(e.fields);
        }
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            errors.add("name", "must be 1 to 200 characters");
        }
        errors.into_result()?;
        let email = email.unwrap_or_default();
        self.create_user(&email, password, name, vec![Role::Customer]).await
    }

    /// Creates an account with the given roles (demo data and admin tooling use this directly).
    pub async fn create_user(&self, email: &str, password: &str, name: &str, roles: Vec<Role>) -> AppResult<User> {
        if self.store.user_by_email(email).await?.is_some() {
            return Err(AppError::Conflict("an account with this e-mail already exists".into()));
        }
        let user = User {
            id: UserId::new(),
            email: email.to_owned(),
            name: name.to_owned(),
            password_hash: hash_password(password.to_owned()).await?,
            roles,
            venues: Vec::new(),
            created_at: self.clock.now(),
        };
        audit::set_target(user.id);
        self.store.insert_user(&user).await?;
        Ok(user)
    }

    pub async fn login(&self, email: &str, password: &str) -> AppResult<Session> {
        // Only a well-formed address is recorded: a password typed into the e-mail field must
        // not end up in append-only rows.
        let parsed = parse_email(email);
        audit::detail("email", parsed.as_deref().unwrap_or("(not an e-mail address)"));
        let email = parsed.map_err(|_| AppError::Unauthenticated)?;
        let user = self.store.user_by_email(&email).await?;
        // Verify against a fixed hash when the user is unknown, so timing does not reveal accounts.
        let hash = user.as_ref().map_or_else(|| self.dummy_hash.clone(), |u| u.password_hash.clone());
        let ok = verify_password(password.to_owned(), hash).await;
        match user {
            Some(user) if ok => {
                audit::set_actor(user.id, audit::role_name(&user.roles));
                self.new_session(user.id, &random_token()).await
            }
            _ => Err(AppError::Unauthenticated),
        }
    }

    async fn new_session(&self, user_id: UserId, family_id: &str) -> AppResult<Session> {
        let (refresh_token, record) = self.refresh_record(user_id, family_id);
        // A keyed login's mark names it: a retry whose answer was lost reissues it.
        audit::set_target(&record.token_hash);
        self.store.insert_refresh_token(&record).await?;
        self.session(user_id, refresh_token)
    }

    /// The tokens of a session of `user_id` whose refresh token is `refresh_token`.
    fn session(&self, user_id: UserId, refresh_token: String) -> AppResult<Session> {
        Ok(Session { access_token: self.access_token(user_id)?, expires_in: ACCESS_TOKEN_TTL_SECONDS, refresh_token })
    }

    fn refresh_record(&self, user_id: UserId, family_id: &str) -> (String, RefreshToken) {
        let token = random_token();
        let expires_at = self.clock.now().checked_add(jiff::SignedDuration::from_secs(REFRESH_TOKEN_TTL_SECONDS));
        let record = RefreshToken {
            token_hash: sha256_hex(token.as_bytes()),
            user_id,
            family_id: family_id.to_owned(),
            expires_at: expires_at.unwrap_or(Timestamp::MAX),
        };
        (token, record)
    }

    fn access_token(&self, user_id: UserId) -> AppResult<String> {
        let now = self.clock.now().as_second();
        let claims = AccessClaims { sub: user_id.to_string(), iat: now, exp: now + ACCESS_TOKEN_TTL_SECONDS };
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.keys.encoding)
            .map_err(|e| AppError::Internal(format!("token signing failed: {e}")))
    }

    /// Rotates a refresh token: the old one stops working; presenting it again revokes the family.
    pub async fn refresh(&self, refresh_token: &str) -> AppResult<Session> {
        let old_hash = sha256_hex(refresh_token.as_bytes());
        let (token, record) = self.refresh_record(UserId::new(), "");
        let now = self.clock.now();
        match self.store.rotate_refresh_token(&old_hash, &record.token_hash, record.expires_at, now).await? {
            RotateOutcome::Rotated { user_id } => self.session(user_id, token),
            RotateOutcome::Reused | RotateOutcome::Invalid => Err(AppError::Unauthenticated),
        }
    }

    /// A fresh session in place of the one a login or refresh opened (refresh token
    /// `lost_hash`) whose answer, the only copy of its secrets, was lost: the lost token is
    /// retired as if rotated and another issued in its family. A conflict if that session is
    /// no longer live (refreshed since, so its secret did reach someone; ended; expired):
    /// nothing changes.
    pub async fn reissue_session(&self, lost_hash: &str) -> AppResult<Session> {
        audit::detail("replaces", lost_hash);
        let (token, record) = self.refresh_record(UserId::new(), "");
        let now = self.clock.now();
        match self.store.reissue_refresh_token(lost_hash, &record.token_hash, record.expires_at, now).await? {
            RotateOutcome::Rotated { user_id } => self.session(user_id, token),
            RotateOutcome::Reused | RotateOutcome::Invalid => Err(AppError::Conflict(
                "the session this request opened is no longer live and its answer was lost: sign in again".into(),
            )),
        }
    }

    pub async fn logout(&self, refresh_token: &str) -> AppResult<()> {
        let hash = sha256_hex(refresh_token.as_bytes());
        Ok(self.store.revoke_refresh_token(&hash, self.clock.now()).await?)
    }

    /// Verifies an access token and loads the principal's current roles, or (for a bearer
    /// token starting `allot_pk_`) finds the partner's unrevoked API key.
    pub async fn authenticate(&self, access_token: &str) -> AppResult<Principal> {
        if access_token.starts_with(API_KEY_PREFIX) {
            return self.authenticate_api_key(access_token).await;
        }
        let user_id = self.token_subject(access_token).ok_or(AppError::Unauthenticated)?;
        let user = self.store.user_by_id(user_id).await?.ok_or(AppError::Unauthenticated)?;
        Ok(Principal::of_user(&user))
    }

    /// The user an access token was issued to, if its signature holds and it has not expired.
    /// No database look-up: cheap enough for every request (rate limits key on it), but the
    /// account may since have been deleted; [`App::authenticate`] is the full check.
    pub fn token_subject(&self, access_token: &str) -> Option<UserId> {
        let (subject, expires_at) = match self.keys.verified.get(access_token) {
            Some(known) => known,
            None => {
                let data =
                    jsonwebtoken::decode::<AccessClaims>(access_token, &self.keys.decoding, &self.keys.validation)
                        .ok()?;
                let subject = data.claims.sub.parse().ok()?;
                self.keys.verified.put(access_token, subject, data.claims.exp);
                (subject, data.claims.exp)
            }
        };
        (expires_at > self.clock.now().as_second()).then_some(subject)
    }

    pub async fn me(&self, principal: &Principal) -> AppResult<User> {
        if principal.is_partner() {
            return Err(AppError::Forbidden("an API key has no user account; /me is for signed-in users"));
        }
        self.store.user_by_id(principal.user_id).await?.ok_or(AppError::Unauthenticated)
    }
}
