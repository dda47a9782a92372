//! `allot serve` configuration: flags, then `ALLOT_*` environment variables, then a TOML config
//! file, then defaults (SPEC §7).

use std::path::PathBuf;

use allot_http::ratelimit::RateLimits;
use clap::{Parser, Subcommand};
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/allot.db";

#[derive(Debug, Parser)]
#[command(name = "allot", version, about = "Allot: a booking engine that never sells the same capacity twice")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(Box<ServeArgs>),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Work with the refunds owed that the reconciler keeps (`refunds_due`).
    #[command(subcommand)]
    Refunds(RefundsCommand),
    /// Work with the payment provider's settings.
    #[command(subcommand)]
    Payments(PaymentsCommand),
}

#[derive(Debug, Subcommand)]
pub enum PaymentsCommand {
    /// Print the secret the provider signs its events with (`Stripe-Signature`), made at the
    /// server's first start unless `serve --payment-webhook-secret` set it; exits 1 when there
    /// is none yet.
    WebhookSecret {
        /// `sqlite://PATH` (default) or `postgres://…`.
        #[arg(long, env = "ALLOT_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RefundsCommand {
    /// List every refund owed and queued: due, waiting, or left to an operator.
    List {
        /// `sqlite://PATH` (default) or `postgres://…`.
        #[arg(long, env = "ALLOT_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Re-arm a refund left to an operator (or any queued one): its attempts start again, and
    /// the next sweep of a running server makes it. Check at the provider first that it was not
    /// made: past a day the provider no longer knows the refund's idempotency key. Exits 1 when
    /// none is queued for the payment.
    Retry {
        /// The payment reference the refund gives money back on.
        payment_reference: String,
        /// `sqlite://PATH` (default) or `postgres://…`.
        #[arg(long, env = "ALLOT_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit hash chain from the first event to the head; exits 1 at the first
    /// broken link, naming the event.
    Verify {
        /// `sqlite://PATH` (default) or `postgres://…`.
        #[arg(long, env = "ALLOT_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "ALLOT_LISTEN")]
    pub listen: Option<String>,
    /// `sqlite://PATH` (default) or `postgres://…`.
    #[arg(long, env = "ALLOT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Load the demo venues and accounts (once; a second start changes nothing).
    #[arg(long, env = "ALLOT_DEMO")]
    pub demo: bool,
    /// Redis for shared rate limits (multi-node).
    #[arg(long, env = "ALLOT_REDIS_URL")]
    pub redis_url: Option<String>,
    /// NATS JetStream for domain events.
    #[arg(long, env = "ALLOT_NATS_URL")]
    pub nats_url: Option<String>,
    /// Rate limits (SPEC §5): `off` for load tests and benchmarks.
    #[arg(long, env = "ALLOT_RATE_LIMITS", value_enum)]
    pub rate_limits: Option<Switch>,
    /// Multiplies every rate-limit budget (e.g. 100 for a load test from one address).
    #[arg(long, env = "ALLOT_RATE_LIMIT_SCALE")]
    pub rate_limit_scale: Option<f64>,
    /// Load balancers (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For`
    /// names the client for rate limits; by default only the connection's peer counts.
    #[arg(long, env = "ALLOT_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Seconds a request may take before it is answered 503 `timeout` (default 30).
    #[arg(long, env = "ALLOT_REQUEST_TIMEOUT_SECONDS")]
    pub request_timeout_seconds: Option<u64>,
    /// Origins allowed by CORS, comma-separated (`*` for any); default: no CORS headers.
    #[arg(long, env = "ALLOT_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Send `Strict-Transport-Security` with this max-age (only behind TLS); default: not sent.
    #[arg(long, env = "ALLOT_HSTS_MAX_AGE_SECONDS")]
    pub hsts_max_age_seconds: Option<u64>,
    /// The secret the payment provider signs its events with (Stripe's `whsec_…`), stored for
    /// every node; by default one is made at the first start (`allot payments webhook-secret`
    /// prints it). Not read from the config file: a secret belongs in the environment.
    #[arg(long, env = "ALLOT_PAYMENT_WEBHOOK_SECRET", hide_env_values = true)]
    pub payment_webhook_secret: Option<Secret>,
    /// Take payments through Stripe with this secret key (`sk_…`, or a restricted `rk_…`)
    /// instead of the built-in test provider. Not read from the config file.
    #[arg(long, env = "ALLOT_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<Secret>,
    /// Where Stripe's API is (a stand-in's address, for tests).
    #[arg(long, env = "ALLOT_STRIPE_API_BASE", default_value = allot_http::stripe::STRIPE_API_BASE)]
    pub stripe_api_base: String,
    /// TOML file with any of: listen, database_url, demo, redis_url, nats_url,
    /// request_timeout_seconds, cors_origins (a list), hsts_max_age_seconds, [rate_limits].
    #[arg(long, env = "ALLOT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A secret given on the command line or in the environment: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    database_url: Option<String>,
    demo: Option<bool>,
    redis_url: Option<String>,
    nats_url: Option<String>,
    /// `enabled`, `scale`, and tiers `ip`, `user`, `partner`, `login`, `hold` as
    /// `{ requests = N, period_seconds = S }`.
    rate_limits: Option<RateLimits>,
    request_timeout_seconds: Option<u64>,
    cors_origins: Option<Vec<String>>,
    hsts_max_age_seconds: Option<u64>,
}

/// The settings in force after every source has been applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: String,
    pub database_url: String,
    pub demo: bool,
    pub redis_url: Option<String>,
    pub nats_url: Option<String>,
    pub rate_limits: RateLimits,
    pub request_timeout_seconds: u64,
    pub cors_origins: Vec<String>,
    pub hsts_max_age_seconds: Option<u64>,
}

impl ServeArgs {
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut rate_limits = file.rate_limits.unwrap_or_default();
        if let Some(switch) = self.rate_limits {
            rate_limits.enabled = switch == Switch::On;
        }
        rate_limits.scale = self.rate_limit_scale.unwrap_or(rate_limits.scale);
        if let Some(proxies) = self.trusted_proxies {
            rate_limits.trusted_proxies = proxies;
        }
        let redis_url = self.redis_url.or(file.redis_url);
        rate_limits.redis_url.clone_from(&redis_url);
        rate_limits.validate().map_err(|e| anyhow::anyhow!(e))?;
        let request_timeout_seconds = self
            .request_timeout_seconds
            .or(file.request_timeout_seconds)
            .unwrap_or(allot_http::ops::REQUEST_TIMEOUT_SECONDS_DEFAULT);
        anyhow::ensure!(request_timeout_seconds > 0, "request_timeout_seconds must be at least 1");
        let cors_origins =
            if self.cors_origins.is_empty() { file.cors_origins.unwrap_or_default() } else { self.cors_origins };
        let cors_origins: Vec<String> =
            cors_origins.into_iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect();
        if let Some(bad) = cors_origins.iter().find(|o| !valid_origin(o)) {
            anyhow::bail!("cors origin {bad:?}: expected `*` or scheme://host[:port]");
        }
        Ok(Settings {
            listen: self.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
            database_url: self.database_url.or(file.database_url).unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            demo: self.demo || file.demo.unwrap_or(false),
            redis_url,
            nats_url: self.nats_url.or(file.nats_url),
            rate_limits,
            request_timeout_seconds,
            cors_origins,
            hsts_max_age_seconds: self.hsts_max_age_seconds.or(file.hsts_max_age_seconds),
        })
    }
}

impl Settings {
    // `..default()` keeps this compiling as `HttpOptions` gains fields set elsewhere.
    #[allow(clippy::needless_update)]
    pub fn http_options(&self) -> allot_http::HttpOptions {
        allot_http::HttpOptions {
            ops: allot_http::OpsOptions {
                request_timeout_seconds: self.request_timeout_seconds,
                cors_origins: self.cors_origins.clone(),
                hsts_max_age_seconds: self.hsts_max_age_seconds,
            },
            rate_limits: self.rate_limits.clone(),
        }
    }
}

/// `*`, or an origin as browsers send it: `scheme://host[:port]`, nothing after.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return origin == "*" };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && rest.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_flags() {
        let dir = std::env::temp_dir().join(format!("allot-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("allot.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\ndatabase_url = \"sqlite://x.db\"\n").expect("write");
        let none = ServeArgs::default().resolve().expect("defaults");
        assert_eq!(none.listen, DEFAULT_LISTEN);
        assert_eq!(none.database_url, DEFAULT_DATABASE_URL);
        let from_file = ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }.resolve().expect("file");
        assert_eq!(from_file.listen, "127.0.0.1:9000");
        let flag_wins = ServeArgs { config: Some(path), listen: Some("0.0.0.0:1".into()), ..ServeArgs::default() }
            .resolve()
            .expect("flags");
        assert_eq!(flag_wins.listen, "0.0.0.0:1");
        assert_eq!(flag_wins.database_url, "sqlite://x.db");
    }

    #[test]
    fn rate_limits_from_file_then_flags() {
        let dir = std::env::temp_dir().join(format!("allot-config-rl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("allot.toml");
        let text = "redis_url = \"redis://127.0.0.1:6379\"\n[rate_limits]\nscale = 2.0\nlogin = { requests = 5, period_seconds = 60 }\n";
        std::fs::write(&path, text).expect("write");
        let none = ServeArgs::default().resolve().expect("defaults");
        assert_eq!(none.rate_limits, RateLimits::default());
        let file = ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }.resolve().expect("file");
        assert!(file.rate_limits.enabled);
        assert_eq!((file.rate_limits.scale, file.rate_limits.login.requests), (2.0, 5));
        assert_eq!(file.rate_limits.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        let flags = ServeArgs {
            config: Some(path),
            rate_limits: Some(Switch::Off),
            rate_limit_scale: Some(10.0),
            ..ServeArgs::default()
        };
        let flags = flags.resolve().expect("flags");
        assert!(!flags.rate_limits.enabled);
        assert_eq!((flags.rate_limits.scale, flags.rate_limits.login.requests), (10.0, 5));
        let zero = ServeArgs { rate_limit_scale: Some(0.0), ..ServeArgs::default() };
        assert!(zero.resolve().is_err());
        let proxies = ServeArgs { trusted_proxies: Some(vec!["10.0.0.0/8".into()]), ..ServeArgs::default() };
        assert_eq!(proxies.resolve().expect("proxies").rate_limits.trusted_proxies, ["10.0.0.0/8"]);
        let bad = ServeArgs { trusted_proxies: Some(vec!["10.0.0.0/99".into()]), ..ServeArgs::default() };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn operations_settings_from_flags_file_and_defaults() {
        let none = ServeArgs::default().resolve().expect("defaults");
        assert_eq!(none.request_timeout_seconds, 30);
        assert!(none.cors_origins.is_empty(), "no CORS unless configured");
        assert_eq!(none.hsts_max_age_seconds, None);
        let dir = std::env::temp_dir().join(format!("allot-config-ops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("allot.toml");
        std::fs::write(
            &path,
            "request_timeout_seconds = 5\ncors_origins = [\"https://a.example\"]\nhsts_max_age_seconds = 600\n",
        )
        .expect("write");
        let from_file = ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }.resolve().expect("file");
        assert_eq!(from_file.request_timeout_seconds, 5);
        assert_eq!(from_file.cors_origins, ["https://a.example"]);
        assert_eq!(from_file.http_options().ops.hsts_max_age_seconds, Some(600));
        let cli = Cli::try_parse_from([
            "allot",
            "serve",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--request-timeout-seconds",
            "7",
            "--cors-origins",
            "https://b.example,http://localhost:3000",
        ])
        .expect("parse");
        let Command::Serve(args) = cli.command else { panic!("parsed as serve") };
        let flags = args.resolve().expect("flags");
        assert_eq!(flags.request_timeout_seconds, 7);
        assert_eq!(flags.cors_origins, ["https://b.example", "http://localhost:3000"]);
        let any = ServeArgs { cors_origins: vec!["*".into()], ..ServeArgs::default() }.resolve().expect("any");
        assert_eq!(any.cors_origins, ["*"]);
        let bad_origin = ServeArgs { cors_origins: vec!["https://a.example/path".into()], ..ServeArgs::default() };
        assert!(bad_origin.resolve().is_err());
        assert!(ServeArgs { request_timeout_seconds: Some(0), ..ServeArgs::default() }.resolve().is_err());
    }

    #[test]
    fn unknown_config_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("allot-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("allot.toml");
        std::fs::write(&path, "listn = \"x\"\n").expect("write");
        assert!(ServeArgs { config: Some(path), ..ServeArgs::default() }.resolve().is_err());
    }
}
