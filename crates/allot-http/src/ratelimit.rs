//! Rate limits (SPEC §5): GCRA buckets per client IP, user, partner API key, login/register
//! attempt (IP + e-mail) and hold (user). Each request is checked against every bucket that
//! applies to it at once and counts against all of them or none; over any limit it gets `429
//! rate_limited` with `Retry-After`, and every limited response carries the `RateLimit-*`
//! headers of its tightest bucket.
//!
//! Buckets live in this process, or in Redis when a URL is configured so that all nodes share
//! them (one Lua script decides and updates all of a request's buckets atomically). Redis
//! failing must not take the API down with it: the limiter then fails open to the per-node
//! in-memory buckets (each node enforcing the budget alone) and logs a warning, and retries
//! Redis a little later.
//!
//! Time is the app's `Clock` in microseconds, so tests move it by hand; the GCRA core
//! ([`gcra`], [`decide`]) takes `now` explicitly and is the same math the Lua script runs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use allot_app::App;
use allot_app::auth::sha256_hex;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::BODY_BYTES_MAX;
use crate::error::ApiError;
use crate::extract::bearer;

/// Bearer tokens with this prefix are partner API keys.
pub const PARTNER_KEY_PREFIX: &str = "allot_pk_";
/// Prefix of every Redis key the limiter writes.
pub const REDIS_KEY_PREFIX_DEFAULT: &str = "allot:rl:";
/// Buckets kept in memory at most, so a flood of distinct addresses cannot exhaust memory;
/// past it new keys share their tier's overflow bucket (see [`MemoryBuckets`]).
const MEMORY_KEYS_MAX: usize = 1_000_000;
/// The in-memory map is scanned for full (forgettable) buckets when it grows past this.
const MEMORY_PRUNE_KEYS_MIN: usize = 4096;
/// Shortest time between two scans of the in-memory map (µs).
const MEMORY_PRUNE_INTERVAL_US: i64 = MICROS_PER_SECOND;
/// Key prefix of the per-tier overflow buckets; no tier is named `overflow`, so no probe key
/// (`tier:identity`) can collide with one.
const MEMORY_OVERFLOW_KEY_PREFIX: &str = "overflow:";
/// Longest a request waits for Redis (connect + script) before falling back to memory.
const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);
/// After Redis failed, how long requests use memory only before Redis is tried again.
const REDIS_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// At most one "Redis unavailable" warning per this interval.
const REDIS_WARNING_INTERVAL: Duration = Duration::from_secs(10);
const MICROS_PER_SECOND: i64 = 1_000_000;

/// Health and metrics probes are never limited: a 429 there would take a node out of rotation.
const UNLIMITED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
const LOGIN_PATHS: [&str; 2] = ["/api/v1/auth/login", "/api/v1/auth/register"];
const HOLD_PATH: &str = "/api/v1/bookings";

/// One budget: `requests` per `period_seconds`, all usable in a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub requests: u32,
    pub period_seconds: u32,
}

impl Tier {
    pub const fn new(requests: u32, period_seconds: u32) -> Self {
        Self { requests, period_seconds }
    }
}

/// Rate-limit configuration. `Default` is SPEC §5, on, in memory; the config file's
/// `[rate_limits]` table may set any field except the Redis ones (which come from `redis_url`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Off for load tests and benchmarks (`--rate-limits off`).
    pub enabled: bool,
    /// Multiplies every tier's `requests` (`--rate-limit-scale`).
    pub scale: f64,
    /// Every request, by client IP (IPv6 by /64).
    pub ip: Tier,
    /// Requests with a user's valid access token, by user.
    pub user: Tier,
    /// Requests with a partner API key, by key.
    pub partner: Tier,
    /// `POST /auth/login` and `/auth/register`, by IP + e-mail.
    pub login: Tier,
    /// Holds (`POST /bookings`), by user.
    pub hold: Tier,
    /// Peers whose `X-Forwarded-For` names the client (load balancers), as addresses or
    /// CIDR blocks. Empty: the connection's peer is the client, whatever headers say.
    pub trusted_proxies: Vec<String>,
    /// Shared buckets for all nodes; memory when `None`.
    #[serde(skip)]
    pub redis_url: Option<String>,
    /// Prefix of the Redis keys (tests use a unique one per run).
    #[serde(skip)]
    pub redis_key_prefix: String,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            scale: 1.0,
            ip: Tier::new(500, 60),
            user: Tier::new(100, 60),
            partner: Tier::new(10_000, 60),
            login: Tier::new(10, 15 * 60),
            hold: Tier::new(10, 60),
            trusted_proxies: Vec::new(),
            redis_url: None,
            redis_key_prefix: REDIS_KEY_PREFIX_DEFAULT.to_owned(),
        }
    }
}

impl RateLimits {
    /// No limits at all (load tests, benchmarks, test suites that are not about limits).
    pub fn off() -> Self {
        Self { enabled: false, ..Self::default() }
    }

    /// Refuses settings that would make no sense at run time (checked at start-up).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(format!("rate limit scale must be a positive number, not {}", self.scale));
        }
        for name in TierName::ALL {
            let tier = self.tier(name);
            if tier.requests == 0 || tier.period_seconds == 0 {
                return Err(format!(
                    "rate limit tier {}: requests and period_seconds must be at least 1",
                    name.as_str()
                ));
            }
        }
        for proxy in &self.trusted_proxies {
            Cidr::parse(proxy)?;
        }
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str()).map_err(|e| format!("redis url: {e}"))?;
        }
        Ok(())
    }

    fn tier(&self, name: TierName) -> Tier {
        match name {
            TierName::Ip => self.ip,
            TierName::User => self.user,
            TierName::Partner => self.partner,
            TierName::Login => self.login,
            TierName::Hold => self.hold,
        }
    }

    fn rate(&self, name: TierName) -> Rate {
        let tier = self.tier(name);
        let scaled = (f64::from(tier.requests) * self.scale).round().clamp(1.0, f64::from(u32::MAX));
        // Whole and within u32 after the round and clamp above.
        Rate::new(scaled as u32, tier.period_seconds)
    }
}

impl crate::HttpOptions {
    pub fn with_rate_limits(mut self, rate_limits: RateLimits) -> Self {
        self.rate_limits = rate_limits;
        self
    }
}

/// An address block, `10.0.0.0/8` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    bits: u32,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("trusted proxy {text:?}: not an address or CIDR block");
        let (addr, bits) = text.trim().split_once('/').map_or((text.trim(), None), |(a, b)| (a, Some(b)));
        let net = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let width = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.map_or(Ok(width), |b| b.parse::<u32>().map_err(|_| bad()))?;
        if bits > width {
            return Err(bad());
        }
        Ok(Cidr { net, bits })
    }

    fn contains(self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The kinds of bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierName {
    Ip,
    User,
    Partner,
    Login,
    Hold,
}

impl TierName {
    pub const ALL: [TierName; 5] = [TierName::Ip, TierName::User, TierName::Partner, TierName::Login, TierName::Hold];

    pub fn as_str(self) -> &'static str {
        match self {
            TierName::Ip => "ip",
            TierName::User => "user",
            TierName::Partner => "partner",
            TierName::Login => "login",
            TierName::Hold => "hold",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GCRA: a bucket is its "theoretical arrival time" (TAT). A request at `now` moves it to
// max(TAT, now) + interval, and is allowed if that is at most `window` ahead of `now`.

/// A budget in microseconds: one request per `interval_us`, bursts of `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub period_seconds: u32,
    pub interval_us: i64,
}

impl Rate {
    pub fn new(limit: u32, period_seconds: u32) -> Self {
        let limit = limit.max(1);
        let interval_us = (i64::from(period_seconds) * MICROS_PER_SECOND / i64::from(limit)).max(1);
        Self { limit, period_seconds, interval_us }
    }

    /// `limit` whole intervals: with the interval rounded down this never lets more than
    /// `limit` requests through in a burst (the period itself might fit one more).
    pub fn window_us(self) -> i64 {
        self.interval_us.saturating_mul(i64::from(self.limit))
    }
}

/// One bucket's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Allowed; `tat` is the bucket's new TAT.
    Allowed { tat: i64 },
    /// Refused; the bucket keeps `tat`, and the request would be allowed from `allow_at`.
    Denied { tat: i64, allow_at: i64 },
}

/// GCRA for one bucket whose stored TAT is `stored` (`None`: full bucket).
pub fn gcra(rate: Rate, stored: Option<i64>, now: i64) -> Step {
    let base = stored.map_or(now, |tat| tat.max(now));
    let tat = base.saturating_add(rate.interval_us);
    let allow_at = tat.saturating_sub(rate.window_us());
    if allow_at <= now { Step::Allowed { tat } } else { Step::Denied { tat: base, allow_at } }
}

/// All of a request's buckets at once: allowed only if every bucket allows it (and then every
/// bucket advances; otherwise none does).
pub fn decide(rates: &[Rate], stored: &[Option<i64>], now: i64) -> (bool, Vec<Step>) {
    let steps: Vec<Step> = rates.iter().zip(stored).map(|(rate, tat)| gcra(*rate, *tat, now)).collect();
    let allowed = steps.iter().all(|s| matches!(s, Step::Allowed { .. }));
    (allowed, steps)
}

/// What the headers say about one bucket after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub tier: TierName,
    pub limit: u32,
    pub period_seconds: u32,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_seconds: u64,
    /// Set when refused: whole seconds until a retry can succeed, at least 1.
    pub retry_after_seconds: Option<u64>,
}

pub fn verdict(tier: TierName, rate: Rate, step: Step, now: i64) -> Verdict {
    let (tat, remaining, retry) = match step {
        Step::Allowed { tat } => {
            let room = now.saturating_add(rate.window_us()).saturating_sub(tat) / rate.interval_us;
            (tat, u64::try_from(room).unwrap_or(0), None)
        }
        Step::Denied { tat, allow_at } => (tat, 0, Some(ceil_seconds(allow_at - now).max(1))),
    };
    Verdict {
        tier,
        limit: rate.limit,
        period_seconds: rate.period_seconds,
        remaining,
        reset_seconds: ceil_seconds(tat - now),
        retry_after_seconds: retry,
    }
}

fn ceil_seconds(us: i64) -> u64 {
    u64::try_from(us.max(0)).unwrap_or(0).div_ceil(MICROS_PER_SECOND.unsigned_abs())
}

/// The verdict the headers report: the refusal that lasts longest, or else the bucket with
/// the fewest requests left.
fn tightest(verdicts: &[Verdict]) -> Option<&Verdict> {
    let refused = verdicts.iter().filter(|v| v.retry_after_seconds.is_some());
    refused.max_by_key(|v| v.retry_after_seconds).or_else(|| {
        verdicts.iter().min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset_seconds.cmp(&a.reset_seconds)))
    })
}

// ---------------------------------------------------------------------------------------------
// Where buckets are kept.

/// One bucket a request is checked against.
#[derive(Debug, Clone)]
struct Probe {
    tier: TierName,
    /// `tier:identity`: tiers keyed by the same identity (user, hold) are separate buckets.
    key: String,
    rate: Rate,
}

/// The in-memory buckets, at most `keys_max` of them plus one overflow bucket per tier.
///
/// When the map is full of live buckets, a new key is checked against its tier's shared
/// overflow bucket (`overflow:<tier>`) instead of a bucket of its own. Not tracking it would
/// make it unlimited (a flood of distinct keys would switch every limit off, the login limit
/// included); evicting a tracked bucket would hand a fresh budget to whoever can churn keys.
/// The overflow bucket keeps memory bounded and fails closed: while the map is full, new
/// clients share one budget per tier (credential stuffing gets one login budget in all), and
/// clients already tracked keep their own. Buckets expire within their period (15 min at most
/// by default) and pruning then makes room again.
#[derive(Debug)]
struct MemoryBuckets {
    tats: HashMap<String, i64>,
    /// Number of buckets at which the next prune is due, at most `keys_max`.
    prune_at_keys: usize,
    /// When the last prune ran (µs), `None` before the first.
    pruned_at_us: Option<i64>,
    keys_max: usize,
}

impl MemoryBuckets {
    fn new(keys_max: usize) -> Self {
        Self { tats: HashMap::new(), prune_at_keys: MEMORY_PRUNE_KEYS_MIN.min(keys_max), pruned_at_us: None, keys_max }
    }

    fn check(&mut self, probes: &[Probe], now: i64) -> Vec<Step> {
        self.prune(now);
        let keys = self.bucket_keys(probes);
        let stored: Vec<Option<i64>> = keys.iter().map(|key| self.tats.get(key).copied()).collect();
        let rates: Vec<Rate> = probes.iter().map(|p| p.rate).collect();
        let (allowed, steps) = decide(&rates, &stored, now);
        if allowed {
            for (key, step) in keys.into_iter().zip(&steps) {
                if let Step::Allowed { tat } = step {
                    self.tats.insert(key, *tat);
                }
            }
        }
        steps
    }

    /// The bucket each probe uses: its own when tracked or when there is room for it, else
    /// its tier's overflow bucket (see the type's comment).
    fn bucket_keys(&self, probes: &[Probe]) -> Vec<String> {
        let mut room = self.keys_max.saturating_sub(self.tats.len());
        let mut key_of = |probe: &Probe| {
            if self.tats.contains_key(&probe.key) {
                probe.key.clone()
            } else if room > 0 {
                room -= 1;
                probe.key.clone()
            } else {
                format!("{MEMORY_OVERFLOW_KEY_PREFIX}{}", probe.tier.as_str())
            }
        };
        probes.iter().map(&mut key_of).collect()
    }

    /// Forgets buckets that are full again (TAT passed): they behave exactly like absent ones.
    /// Due when the map reaches `prune_at_keys` (never above the cap, so a full map is always
    /// due), and at most once per `MEMORY_PRUNE_INTERVAL_US` so a full map of live buckets does
    /// not cost a scan per request.
    fn prune(&mut self, now: i64) {
        let recent =
            self.pruned_at_us.is_some_and(|at| (at..at.saturating_add(MEMORY_PRUNE_INTERVAL_US)).contains(&now));
        if self.tats.len() < self.prune_at_keys || recent {
            return;
        }
        self.tats.retain(|_, tat| *tat > now);
        self.pruned_at_us = Some(now);
        // Amortised: the next scan waits until the map has doubled, or filled up.
        self.prune_at_keys = (self.tats.len() * 2).max(MEMORY_PRUNE_KEYS_MIN).min(self.keys_max);
    }
}

/// GCRA over several keys at once, all or nothing; the same math as [`decide`].
/// KEYS: the buckets. ARGV[1]: now (µs); ARGV[2i], ARGV[2i+1]: bucket i's interval and window.
/// Returns each bucket's stored TAT before this request (-1: none). Numbers stay below 2^53,
/// so Lua's doubles hold them exactly; `%.0f` keeps them out of exponent notation.
const GCRA_LUA: &str = r"
local now = tonumber(ARGV[1])
local stored = {}
local next_tats = {}
local allowed = true
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key))
  stored[i] = tat or -1
  local base = now
  if tat and tat > now then base = tat end
  next_tats[i] = base + interval
  if next_tats[i] - window > now then allowed = false end
end
if allowed then
  for i, key in ipairs(KEYS) do
    local ttl_ms = math.ceil((next_tats[i] - now) / 1000)
    redis.call('SET', key, string.format('%.0f', next_tats[i]), 'PX', ttl_ms)
  end
end
return stored
";

struct RedisBuckets {
    client: redis::Client,
    /// Made on first use: building it needs the Tokio runtime. It reconnects by itself.
    manager: OnceLock<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    prefix: String,
    /// While set and in the future, Redis is skipped (it just failed).
    down_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

impl RedisBuckets {
    fn new(url: &str, prefix: &str) -> Option<Self> {
        match redis::Client::open(url) {
            Ok(client) => Some(Self {
                client,
                manager: OnceLock::new(),
                script: redis::Script::new(GCRA_LUA),
                prefix: prefix.to_owned(),
                down_until: Mutex::new(None),
                last_warning: Mutex::new(None),
            }),
            Err(e) => {
                tracing::error!(error = %e, "invalid redis url: rate limits stay per node");
                None
            }
        }
    }

    fn manager(&self) -> Option<redis::aio::ConnectionManager> {
        self.manager
            .get_or_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1);
                redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .map_err(|e| tracing::error!(error = %e, "redis connection manager: rate limits stay per node"))
                    .ok()
            })
            .clone()
    }

    fn skipping(&self) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, error: &str) {
        let now = Instant::now();
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(now + REDIS_RETRY_INTERVAL);
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| now.duration_since(at) >= REDIS_WARNING_INTERVAL) {
            *last = Some(now);
            tracing::warn!(error, "redis unavailable: rate limits fall back to this node's memory (fail open)");
        }
    }

    /// The stored TATs of `probes`, advanced in Redis if the request is allowed.
    async fn check(&self, probes: &[Probe], now: i64) -> Result<Vec<Option<i64>>, String> {
        let mut manager = self.manager().ok_or("no connection manager")?;
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(now);
        for probe in probes {
            invocation.key(format!("{}{}", self.prefix, probe.key));
            invocation.arg(probe.rate.interval_us).arg(probe.rate.window_us());
        }
        let call = invocation.invoke_async::<Vec<i64>>(&mut manager);
        let stored = tokio::time::timeout(REDIS_TIMEOUT, call)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if stored.len() != probes.len() {
            return Err(format!("script returned {} values for {} keys", stored.len(), probes.len()));
        }
        Ok(stored.into_iter().map(|tat| (tat >= 0).then_some(tat)).collect())
    }
}

/// The limiter one router uses.
pub struct Limiter {
    app: Arc<App>,
    config: RateLimits,
    memory: Mutex<MemoryBuckets>,
    redis: Option<RedisBuckets>,
    trusted_proxies: Vec<Cidr>,
}

impl Limiter {
    /// The app the limits belong to (refusals are audited; the idempotency key is kept in it).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    pub fn new(app: Arc<App>, config: RateLimits) -> Self {
        let redis = match (&config.redis_url, config.enabled) {
            (Some(url), true) => RedisBuckets::new(url, &config.redis_key_prefix),
            _ => None,
        };
        // Checked at start-up (`validate`); a bad entry here trusts nothing more.
        let trusted_proxies = config.trusted_proxies.iter().filter_map(|p| Cidr::parse(p).ok()).collect();
        Self { app, config, memory: Mutex::new(MemoryBuckets::new(MEMORY_KEYS_MAX)), redis, trusted_proxies }
    }

    fn now_us(&self) -> i64 {
        self.app.clock.now().as_microsecond()
    }

    async fn check(&self, probes: &[Probe]) -> Vec<Verdict> {
        let now = self.now_us();
        let steps = match self.check_redis(probes, now).await {
            Some(steps) => steps,
            None => self.memory.lock().unwrap_or_else(|e| e.into_inner()).check(probes, now),
        };
        probes.iter().zip(steps).map(|(p, step)| verdict(p.tier, p.rate, step, now)).collect()
    }

    /// `None`: no Redis, or it failed (then memory decides: fail open).
    async fn check_redis(&self, probes: &[Probe], now: i64) -> Option<Vec<Step>> {
        let redis = self.redis.as_ref().filter(|r| !r.skipping())?;
        match redis.check(probes, now).await {
            Ok(stored) => {
                let rates: Vec<Rate> = probes.iter().map(|p| p.rate).collect();
                Some(decide(&rates, &stored, now).1)
            }
            Err(e) => {
                redis.failed(&e);
                None
            }
        }
    }

    fn probe(&self, tier: TierName, identity: &str) -> Probe {
        Probe { tier, key: format!("{}:{identity}", tier.as_str()), rate: self.config.rate(tier) }
    }

    /// The buckets a request counts against. Login and register bodies are read for the
    /// e-mail and put back unchanged.
    async fn probes(&self, request: Request) -> Result<(Request, Vec<Probe>), Response> {
        let (parts, body) = request.into_parts();
        let ip = client_key(client_ip(&parts, &self.trusted_proxies));
        let mut probes = vec![self.probe(TierName::Ip, &ip)];
        let path = parts.uri.path();
        let is_post = parts.method == Method::POST;
        match bearer(&parts) {
            Some(token) if token.starts_with(PARTNER_KEY_PREFIX) => {
                probes.push(self.probe(TierName::Partner, &sha256_hex(token.as_bytes())));
            }
            Some(token) => {
                // An invalid or expired token is treated as anonymous: the handler answers 401.
                if let Some(user) = self.app.token_subject(token).map(|u| u.to_string()) {
                    probes.push(self.probe(TierName::User, &user));
                    if is_post && path == HOLD_PATH {
                        probes.push(self.probe(TierName::Hold, &user));
                    }
                }
            }
            None => {}
        }
        if !(is_post && LOGIN_PATHS.contains(&path)) {
            return Ok((Request::from_parts(parts, body), probes));
        }
        let Ok(bytes) = axum::body::to_bytes(body, BODY_BYTES_MAX).await else {
            return Err(
                ApiError::field(StatusCode::PAYLOAD_TOO_LARGE, "body", "request body too large").into_response()
            );
        };
        // Hashed: bounded key length, and no e-mail addresses kept in Redis.
        let key = sha256_hex(format!("{ip}\n{}", login_email(&bytes)).as_bytes());
        probes.push(self.probe(TierName::Login, &key));
        Ok((Request::from_parts(parts, Body::from(bytes)), probes))
    }
}

/// The e-mail of a login or register body, normalised; "" when there is none (such bodies
/// still count, against IP + "").
fn login_email(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    value.get("email").and_then(|e| e.as_str()).map(|e| e.trim().to_lowercase()).unwrap_or_default()
}

/// The client's address: the connection's peer, or, when the peer is a trusted proxy, the
/// nearest address in `X-Forwarded-For` that is not a trusted proxy (entries further left
/// could be made up by the client).
fn client_ip(parts: &Parts, trusted: &[Cidr]) -> Option<IpAddr> {
    let ConnectInfo(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>()?;
    let mut client = peer.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let forwarded = parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let mut hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).collect();
    while is_trusted(client) {
        let Some(hop) = hops.pop().and_then(|h| h.trim().parse::<IpAddr>().ok()) else { break };
        client = hop.to_canonical();
    }
    Some(client)
}

/// The IP tier's key. IPv6 clients are keyed by their /64, which one subscriber usually has
/// whole.
fn client_key(ip: Option<IpAddr>) -> String {
    let Some(ip) = ip else {
        return "unknown".to_owned();
    };
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(prefix))
        }
    }
}

/// Marks a response refused by a rate limit, for layers outside this one (audit, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub tier: TierName,
}

/// The middleware's rate-limit half: checks the request's buckets, refuses with 429 or runs
/// `inner` (the rest of the stack), and sets the `RateLimit-*` headers either way. It runs
/// inside [`crate::guard`], one `from_fn` layer with the idempotency key.
pub async fn limit<F, Fut>(limiter: &Limiter, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    // The client as the limits see it (behind a trusted proxy: from `X-Forwarded-For`), for
    // whatever else records who asked (the audit trail).
    let (mut parts, body) = request.into_parts();
    if let Some(ip) = client_ip(&parts, &limiter.trusted_proxies) {
        parts.extensions.insert(ClientAddr(ip));
    }
    let request = Request::from_parts(parts, body);
    if !limiter.config.enabled || UNLIMITED_PATHS.contains(&request.uri().path()) {
        return inner(request).await;
    }
    let (request, probes) = match limiter.probes(request).await {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    let verdicts = limiter.check(&probes).await;
    let Some(shown) = tightest(&verdicts).copied() else {
        return inner(request).await;
    };
    if let Some(retry_after) = shown.retry_after_seconds {
        let (parts, _) = request.into_parts();
        on_rejected(&limiter.app, &parts, &shown).await;
        return refusal(&shown, retry_after);
    }
    let mut response = inner(request).await;
    set_headers(response.headers_mut(), &shown);
    response
}

/// The client's address as the rate limits identify it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The one place a refused request is seen whole: counted for metrics, logged, and recorded
/// in the audit trail when it was a write.
async fn on_rejected(app: &App, parts: &Parts, verdict: &Verdict) {
    metrics::counter!("allot_rate_limited_requests_total", "tier" => verdict.tier.as_str()).increment(1);
    tracing::info!(tier = verdict.tier.as_str(), method = %parts.method, path = parts.uri.path(), "rate limited");
    crate::audit::record_refused(app, parts, "rate_limited", &[("tier", verdict.tier.as_str().to_owned())]).await;
}

fn refusal(verdict: &Verdict, retry_after: u64) -> Response {
    let details = json!({
        "tier": verdict.tier.as_str(),
        "limit": verdict.limit,
        "period_seconds": verdict.period_seconds,
        "retry_after_seconds": retry_after,
    });
    let mut response = ApiError::rate_limited(retry_after, details).into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    set_headers(headers, verdict);
    response.extensions_mut().insert(RateLimited { tier: verdict.tier });
    response
}

/// The draft IETF `RateLimit-*` fields (draft-ietf-httpapi-ratelimit-headers, separate fields).
fn set_headers(headers: &mut HeaderMap, verdict: &Verdict) {
    headers.insert("ratelimit-limit", HeaderValue::from(verdict.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(verdict.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(verdict.reset_seconds));
    let policy = format!("{};w={}", verdict.limit, verdict.period_seconds);
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.insert("ratelimit-policy", value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    const S: i64 = MICROS_PER_SECOND;

    /// Runs requests at `times` through one bucket; returns which were allowed.
    fn run(rate: Rate, times: &[i64]) -> Vec<bool> {
        let mut tat = None;
        times
            .iter()
            .map(|&now| match gcra(rate, tat, now) {
                Step::Allowed { tat: t } => {
                    tat = Some(t);
                    true
                }
                Step::Denied { .. } => false,
            })
            .collect()
    }

    #[test]
    fn a_full_bucket_allows_a_burst_of_its_limit_then_refuses() {
        let rate = Rate::new(10, 900);
        let allowed = run(rate, &[0; 11]);
        assert_eq!(allowed, [vec![true; 10], vec![false]].concat());
    }

    #[test]
    fn one_request_comes_back_per_interval() {
        let rate = Rate::new(10, 900);
        assert_eq!(rate.interval_us, 90 * S);
        let mut times = vec![0; 10];
        times.extend([89 * S, 90 * S, 90 * S, 180 * S]);
        assert_eq!(run(rate, &times), [vec![true; 10], vec![false, true, false, true]].concat());
    }

    #[test]
    fn verdicts_count_down_and_say_when_to_retry() {
        let rate = Rate::new(10, 900);
        let first = verdict(TierName::Login, rate, gcra(rate, None, 0), 0);
        assert_eq!((first.remaining, first.reset_seconds, first.retry_after_seconds), (9, 90, None));
        let full = Some(900 * S);
        let refused = verdict(TierName::Login, rate, gcra(rate, full, 0), 0);
        assert_eq!((refused.remaining, refused.reset_seconds, refused.retry_after_seconds), (0, 900, Some(90)));
        // Half a second before the retry time still says one whole second.
        let late = verdict(TierName::Login, rate, gcra(rate, full, 90 * S - S / 2), 90 * S - S / 2);
        assert_eq!(late.retry_after_seconds, Some(1));
    }

    #[test]
    fn a_refused_request_advances_no_bucket() {
        let (ip, login) = (Rate::new(500, 60), Rate::new(1, 900));
        let (allowed, steps) = decide(&[ip, login], &[None, Some(900 * S)], 0);
        assert!(!allowed);
        assert_eq!(steps[0], Step::Allowed { tat: ip.interval_us }, "would be allowed alone");
        let mut memory = MemoryBuckets::new(MEMORY_KEYS_MAX);
        let probes = |key: &str| {
            vec![
                Probe { tier: TierName::Ip, key: "a".into(), rate: Rate::new(2, 60) },
                Probe { tier: TierName::Login, key: key.into(), rate: Rate::new(1, 60) },
            ]
        };
        assert!(matches!(memory.check(&probes("x"), 0)[1], Step::Allowed { .. }));
        assert!(matches!(memory.check(&probes("x"), 0)[1], Step::Denied { .. }));
        // The refused request did not use the IP bucket's second request.
        assert!(memory.check(&probes("y"), 0).iter().all(|s| matches!(s, Step::Allowed { .. })));
    }

    #[test]
    fn scale_multiplies_every_budget_and_never_reaches_zero() {
        let limits = RateLimits { scale: 0.5, ..RateLimits::default() };
        assert_eq!(limits.rate(TierName::Ip).limit, 250);
        assert_eq!(RateLimits { scale: 0.001, ..RateLimits::default() }.rate(TierName::Login).limit, 1);
        assert_eq!(RateLimits { scale: 100.0, ..RateLimits::default() }.rate(TierName::Partner).limit, 1_000_000);
        assert!(RateLimits { scale: 0.0, ..RateLimits::default() }.validate().is_err());
        assert!(RateLimits { ip: Tier::new(0, 60), ..RateLimits::default() }.validate().is_err());
        assert!(RateLimits::default().validate().is_ok());
    }

    #[test]
    fn full_buckets_are_pruned_from_memory() {
        let mut memory = MemoryBuckets::new(MEMORY_KEYS_MAX);
        let rate = Rate::new(1, 1);
        for i in 0..MEMORY_PRUNE_KEYS_MIN {
            memory.check(&[Probe { tier: TierName::Ip, key: i.to_string(), rate }], 0);
        }
        memory.check(&[Probe { tier: TierName::Ip, key: "late".into(), rate }], 2 * S);
        assert_eq!(memory.tats.len(), 1);
    }

    fn ip_probe(key: &str) -> Probe {
        Probe { tier: TierName::Ip, key: format!("ip:{key}"), rate: Rate::new(1, 1) }
    }

    fn is_allowed(steps: &[Step]) -> bool {
        steps.iter().all(|s| matches!(s, Step::Allowed { .. }))
    }

    /// M6: a prune that left over half the cap live used to push the next prune past the cap,
    /// so it never ran again and, once full, no new key was ever stored (unlimited).
    #[test]
    fn pruning_runs_again_after_a_prune_that_left_the_map_over_half_full() {
        const KEYS_MAX: usize = 2 * MEMORY_PRUNE_KEYS_MIN;
        let mut memory = MemoryBuckets::new(KEYS_MAX);
        // All live at 0 s: the prunes at MEMORY_PRUNE_KEYS_MIN and at the cap keep every key.
        for i in 0..=KEYS_MAX {
            memory.check(&[ip_probe(&i.to_string())], 0);
        }
        assert!(memory.tats.len() <= KEYS_MAX + TierName::ALL.len());
        // All expired by 10 s: the next request prunes them, and the new key is tracked.
        assert!(is_allowed(&memory.check(&[ip_probe("new")], 10 * S)));
        assert_eq!(memory.tats.len(), 1, "expired buckets were pruned");
        assert!(!is_allowed(&memory.check(&[ip_probe("new")], 10 * S)), "the new key is limited");
    }

    #[test]
    fn with_the_map_full_of_live_buckets_a_new_login_key_is_still_limited() {
        const KEYS_MAX: usize = 8;
        let mut memory = MemoryBuckets::new(KEYS_MAX);
        let login = Rate::new(10, 900);
        let probe = |key: &str| Probe { tier: TierName::Login, key: format!("login:{key}"), rate: login };
        for i in 0..KEYS_MAX {
            memory.check(&[probe(&i.to_string())], 0);
        }
        let allowed = (0..20).filter(|_| is_allowed(&memory.check(&[probe("stuffer")], S))).count();
        assert_eq!(allowed, 10, "limited after `limit` attempts");
        // Other new keys share that spent budget; tracked keys keep their own.
        assert!(!is_allowed(&memory.check(&[probe("another")], S)));
        assert!(is_allowed(&memory.check(&[probe("0")], S)));
        assert!(memory.tats.len() <= KEYS_MAX + TierName::ALL.len(), "memory stays bounded");
    }

    #[test]
    fn trusted_proxies_name_the_client_and_others_do_not() {
        let request = |peer: &str, forwarded: &str| {
            let mut request = axum::http::Request::builder().header("x-forwarded-for", forwarded);
            let addr = SocketAddr::new(peer.parse().unwrap(), 1000);
            request = request.extension(ConnectInfo(addr));
            request.body(()).unwrap().into_parts().0
        };
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap(), Cidr::parse("::1").unwrap()];
        let ip = |peer, fwd| client_ip(&request(peer, fwd), &trusted).unwrap().to_string();
        assert_eq!(ip("192.0.2.1", "203.0.113.9"), "192.0.2.1", "an untrusted peer's header is ignored");
        assert_eq!(ip("10.1.2.3", "203.0.113.9"), "203.0.113.9");
        assert_eq!(ip("10.1.2.3", "1.1.1.1, 203.0.113.9, 10.0.0.7"), "203.0.113.9", "the client forged 1.1.1.1");
        assert_eq!(ip("::1", "garbage"), "::1");
        assert_eq!(client_key(Some("2001:db8:1:2:3:4:5:6".parse().unwrap())), "2001:db8:1:2::/64");
        assert_eq!(client_key(Some("::ffff:192.0.2.1".parse().unwrap())), "192.0.2.1");
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("nope").is_err());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn the_tightest_bucket_is_shown() {
        let v = |tier, remaining, retry| Verdict {
            tier,
            limit: 1,
            period_seconds: 1,
            remaining,
            reset_seconds: 1,
            retry_after_seconds: retry,
        };
        let all = [v(TierName::Ip, 400, None), v(TierName::User, 3, None)];
        assert_eq!(tightest(&all).unwrap().tier, TierName::User);
        let refused = [v(TierName::Ip, 0, Some(1)), v(TierName::Login, 0, Some(80)), v(TierName::User, 2, None)];
        assert_eq!(tightest(&refused).unwrap().tier, TierName::Login);
    }

    /// A token bucket in its naive form: credit (in µs of refill) up to `limit` intervals,
    /// one interval spent per request.
    fn reference(rate: Rate, times: &[i64]) -> Vec<bool> {
        let capacity = rate.window_us();
        let (mut credit, mut last) = (capacity, times.first().copied().unwrap_or(0));
        times
            .iter()
            .map(|&now| {
                credit = (credit + (now - last)).min(capacity);
                last = now;
                let ok = credit >= rate.interval_us;
                if ok {
                    credit -= rate.interval_us;
                }
                ok
            })
            .collect()
    }

    proptest! {
        #[test]
        fn gcra_is_a_token_bucket(
            limit in 1u32..20,
            period in 1u32..120,
            gaps in proptest::collection::vec(0i64..(30 * S), 1..200),
        ) {
            let rate = Rate::new(limit, period);
            let times: Vec<i64> = gaps.iter().scan(0i64, |t, g| { *t += g; Some(*t) }).collect();
            let allowed = run(rate, &times);
            prop_assert_eq!(&allowed, &reference(rate, &times));
            // Sliding-log bound: no span of time lets more through than a burst plus refills.
            let accepted: Vec<i64> = times.iter().zip(&allowed).filter(|(_, a)| **a).map(|(t, _)| *t).collect();
            for (i, start) in accepted.iter().enumerate() {
                for (j, end) in accepted.iter().enumerate().skip(i) {
                    let bound = i64::from(limit) + (end - start) / rate.interval_us;
                    prop_assert!(i64::try_from(j - i + 1).unwrap() <= bound);
                }
            }
        }
    }
}
