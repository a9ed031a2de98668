//! Settings: built-in defaults ← YAML file ← `ALERT_ROUTER__SECTION__KEY` environment, validated once at start.
//!
//! Every struct denies unknown keys so a typo (`amqp.prefech`) is an error that
//! names the key instead of a silently ignored line. Secrets never live here
//! in the clear: tokens come from the environment into [`Secrets`], and URLs
//! that may carry a password are [`SecretUrl`]s; both print redacted, in
//! `Debug`, `Display` and serialised settings alike.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The settings file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "config/alert-router.yaml";

/// Everything the worker and the command line can be told, minus secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub slack: SlackSettings,
    pub email: EmailSettings,
    pub rules: RulesSettings,
    pub delivery: DeliverySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

/// RabbitMQ connection and topology names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL; credentials in it are redacted whenever it is shown.
    pub url: SecretUrl,
    /// Topic exchange producers publish to.
    pub exchange: String,
    /// The worker's input queue, bound to `exchange` with `#`.
    pub queue: String,
    /// Fanout exchange in front of the dead-letter queue.
    pub dead_letter_exchange: String,
    /// Where undeliverable and poison messages wait for an operator.
    pub dead_letter_queue: String,
    /// Delayed-retry queues are named `<prefix>.<delay>`, e.g. `alerts.retry.30s`.
    pub retry_queue_prefix: String,
    /// Unacknowledged deliveries in flight per worker; also its concurrency.
    pub prefetch: u16,
    /// Broker-side redelivery limit (quorum queue `x-delivery-limit`): a message
    /// that keeps crashing workers is dead-lettered instead of looping forever.
    pub delivery_limit: u32,
    /// Largest accepted event body; bigger ones are dead-lettered as `too_large`.
    pub max_body_bytes: usize,
    /// Limit on opening a connection and on declaring the topology: a broker
    /// that accepts TCP but never answers must not hang the worker.
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// Limit on the broker's confirm of one republish (retry, deferral,
    /// dead letter). A republish not confirmed in time leaves its delivery
    /// unacked, to be redelivered; it is never acked on hope.
    #[serde(with = "human_duration")]
    pub confirm_timeout: Duration,
    /// How often the worker reads the dead-letter queue's depth for
    /// `/metrics` (one passive declare, and one Redis script for the oldest
    /// letter's age; no message is read).
    #[serde(with = "human_duration")]
    pub dead_letter_poll_interval: Duration,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "alerts".into(),
            queue: "alerts.router".into(),
            dead_letter_exchange: "alerts.dlx".into(),
            dead_letter_queue: "alerts.dead".into(),
            retry_queue_prefix: "alerts.retry".into(),
            // Measured against 100 and 300 (README, Performance): a wider window
            // keeps every stage busy and costs RabbitMQ less per event; 300
            // cost more memory and worker CPU than it gained.
            prefetch: 200,
            delivery_limit: 20,
            max_body_bytes: crate::event::DEFAULT_MAX_BODY_BYTES,
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(15),
            dead_letter_poll_interval: Duration::from_secs(15),
        }
    }
}

/// Redis: tokens, idempotency records and shared rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// May carry a password (`redis://:pw@host`) or a token as the user.
    pub url: SecretUrl,
    /// Every key the worker reads or writes starts with this, e.g.
    /// `alert-router:slack:token:T0AEXY01`.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "alert-router".into(),
        }
    }
}

/// Slack Web API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackSettings {
    /// Base URL of the Web API; methods are appended (`…/chat.postMessage`).
    pub api_url: String,
    /// Workspace used for events that name none (and for `SLACK_BOT_TOKEN`).
    pub default_workspace: Option<String>,
    /// Limit on one HTTP call to Slack.
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// Attempts of one Slack call for transient failures before the target
    /// counts as "Slack unavailable".
    pub max_attempts: u32,
    /// First backoff between attempts; doubles with full jitter.
    #[serde(with = "human_duration")]
    pub retry_base_delay: Duration,
    /// Most time spent waiting between attempts of one call (backoff and
    /// short `Retry-After`s); beyond it the event goes to a broker retry queue.
    #[serde(with = "human_duration")]
    pub retry_budget: Duration,
    /// How long a token read from Redis is reused before it is read again.
    #[serde(with = "human_duration")]
    pub token_cache_ttl: Duration,
    /// Most entries each in-process cache (tokens, user ids, channel ids)
    /// keeps; the least used go first. Bounds memory whatever workspaces and
    /// addresses producers name.
    pub cache_capacity: u64,
    /// Posts per second to one channel, across all replicas (Slack allows about 1).
    pub channel_rate_per_second: f64,
    /// Posts to one channel that may go out at once before the rate applies.
    pub channel_burst: u32,
    /// Posts per minute to one workspace, across all replicas.
    pub workspace_rate_per_minute: u32,
    /// Posts to one workspace that may go out at once before the rate applies.
    pub workspace_burst: u32,
    /// Longest wait for a rate-limit slot while holding a delivery; a longer
    /// wait sends the event to a delay queue without counting an attempt.
    #[serde(with = "human_duration")]
    pub max_rate_limit_wait: Duration,
    /// How long a listing of a workspace's channels (name → id) counts as
    /// fresh; a name missing from it lists again sooner.
    #[serde(with = "human_duration")]
    pub channel_cache_ttl: Duration,
    /// Workspaces an event may name; empty allows any. `default_workspace`
    /// is always allowed: the operator chose it.
    #[serde(with = "string_list")]
    pub allowed_workspaces: Vec<String>,
    /// Slack's consent page, where `GET /slack/install` sends the installer.
    pub oauth_authorize_url: String,
    /// Answer Slack locally instead of calling it (`run --dry-run`): the
    /// whole pipeline runs, each message is logged and shown at `/preview`.
    pub dry_run: bool,
    /// Bot scopes `GET /slack/install` asks for (comma-separated in the environment).
    #[serde(with = "string_list")]
    pub oauth_scopes: Vec<String>,
    /// How long an install link (its signed `state`) stays valid.
    #[serde(with = "human_duration")]
    pub oauth_state_ttl: Duration,
}

/// The bot scopes the worker's Web API calls need, asked for by `GET /slack/install`.
///
/// `chat:write` posts and DMs (`chat.postMessage`, `chat.update`);
/// `channels:join` joins a public channel on `not_in_channel`; `im:write`
/// opens the DM conversation the lost-post check reads; `users:read` and
/// `users:read.email` look `slack_email` targets up (Slack grants the
/// second only with the first); `channels:read` and `groups:read` map
/// channel names to ids (`conversations.list`); `channels:history`,
/// `groups:history` and `im:history` read a channel back after a crash.
/// Not `chat:write.public`: it would let the bot post in public channels
/// without joining them, and a bot outside a channel cannot read its
/// history, so the lost-post check would be lost there.
pub const DEFAULT_BOT_SCOPES: &[&str] = &[
    "chat:write",
    "channels:join",
    "im:write",
    "users:read",
    "users:read.email",
    "channels:read",
    "groups:read",
    "channels:history",
    "groups:history",
    "im:history",
];

impl Default for SlackSettings {
    fn default() -> Self {
        SlackSettings {
            api_url: "https://slack.com/api".into(),
            default_workspace: None,
            dry_run: false,
            request_timeout: Duration::from_secs(10),
            max_attempts: 3,
            retry_base_delay: Duration::from_millis(250),
            retry_budget: Duration::from_secs(10),
            token_cache_ttl: Duration::from_secs(30),
            cache_capacity: 10_000,
            channel_rate_per_second: 1.0,
            channel_burst: 3,
            workspace_rate_per_minute: 300,
            workspace_burst: 10,
            max_rate_limit_wait: Duration::from_secs(15),
            channel_cache_ttl: Duration::from_secs(600),
            allowed_workspaces: Vec::new(),
            oauth_authorize_url: "https://slack.com/oauth/v2/authorize".into(),
            oauth_scopes: DEFAULT_BOT_SCOPES.iter().map(|s| s.to_string()).collect(),
            oauth_state_ttl: Duration::from_secs(600),
        }
    }
}

/// SMTP fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailSettings {
    /// `smtp://host:port` (plain or STARTTLS) or `smtps://`; credentials in the URL.
    pub smtp_url: SecretUrl,
    pub from: String,
    /// Domains an address taken from an event may be in (exact,
    /// case-insensitive; subdomains are listed on their own); empty allows any.
    #[serde(with = "string_list")]
    pub allowed_domains: Vec<String>,
    /// SMTP connections open at once per worker; more emails wait their turn.
    pub max_connections: usize,
}

impl Default for EmailSettings {
    fn default() -> Self {
        EmailSettings {
            smtp_url: "smtp://127.0.0.1:1025".into(),
            from: "alert-router@localhost".into(),
            allowed_domains: Vec::new(),
            max_connections: 4,
        }
    }
}

/// Where the routing rules live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSettings {
    pub path: PathBuf,
}

impl Default for RulesSettings {
    fn default() -> Self {
        RulesSettings {
            path: PathBuf::from("config/rules.yaml"),
        }
    }
}

/// Delivery semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Broker-level retry delays; after the last one the event is dead-lettered.
    #[serde(with = "human_durations")]
    pub retry_delays: Vec<Duration>,
    /// How long "this target already got this event" is remembered.
    #[serde(with = "human_duration")]
    pub idempotency_ttl: Duration,
    /// On SIGTERM, how long in-flight events may take to settle before exit.
    #[serde(with = "human_duration")]
    pub drain_timeout: Duration,
    /// Lease of a claim on (event, target): its holder renews it every third
    /// of this while sending, and a crashed holder's claim frees after it.
    #[serde(with = "human_duration")]
    pub claim_lease: Duration,
    /// Longest an event waits for Slack's rate limits (deferred through the
    /// broker, no attempt spent); after it, a target Slack still has no room
    /// for counts as Slack unavailable and falls back to email.
    #[serde(with = "human_duration")]
    pub max_rate_limit_deferral: Duration,
    /// How long an incident (its first messages, state and escalation) is
    /// kept after its last event: later events of it thread under its first
    /// messages, and its Acknowledge button works, for this long.
    #[serde(with = "human_duration")]
    pub incident_ttl: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retry_delays: [5, 30, 120, 600, 1800]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
            claim_lease: Duration::from_secs(10),
            max_rate_limit_deferral: Duration::from_secs(30 * 60),
            incident_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Health and metrics endpoint, and the Slack install pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// `/healthz`, `/readyz`, `/metrics` and `/slack/…` listen here.
    pub listen: SocketAddr,
    /// The address people and Slack reach `http.listen` at, e.g.
    /// `https://alerts.example.com` (behind a proxy, with its path prefix).
    /// The OAuth redirect URL is this plus `/slack/oauth/callback`; without
    /// it `/slack/install` only says to set it.
    pub public_url: Option<String>,
}

impl HttpSettings {
    /// `public_url` if set and not blank (an empty variable means unset).
    pub fn public_url(&self) -> Option<&str> {
        self.public_url
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            public_url: None,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `alert_router=debug,info`;
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// Recipient addresses in full in logs and dead-letter headers; by
    /// default they are shown as `a***@example.com`.
    pub show_addresses: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
            show_addresses: false,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("settings file {path} does not exist (given with --config)")]
    MissingFile { path: PathBuf },
    #[error("cannot read settings: {0}")]
    Load(String),
    #[error("setting `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Settings {
    /// Loads defaults ← file ← environment. `path` is `--config`; without it
    /// [`DEFAULT_CONFIG_PATH`] is read if it exists.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// [`Settings::load`] with the environment given explicitly (for tests).
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        // No defaults layer: `#[serde(default)]` fills what the file and the
        // environment leave out (and serialised settings are redacted, so
        // they could not carry the default URLs' credentials anyway).
        let mut builder = config::Config::builder();
        match path {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::MissingFile {
                        path: path.to_path_buf(),
                    });
                }
                builder = builder.add_source(config::File::from(path).required(true));
            }
            None => {
                builder = builder.add_source(
                    config::File::with_name(DEFAULT_CONFIG_PATH)
                        .format(config::FileFormat::Yaml)
                        .required(false),
                );
            }
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ALERT_ROUTER__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ALERT_ROUTER")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("delivery.retry_delays")
                .with_list_parse_key("slack.allowed_workspaces")
                .with_list_parse_key("slack.oauth_scopes")
                .with_list_parse_key("email.allowed_domains")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot: URL schemes, ranges, non-empty names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("amqp.url", self.amqp.url.expose(), &["amqp", "amqps"])?;
        check_url(
            "redis.url",
            self.redis.url.expose(),
            &["redis", "rediss", "unix"],
        )?;
        check_url("slack.api_url", &self.slack.api_url, &["http", "https"])?;
        check_url(
            "email.smtp_url",
            self.email.smtp_url.expose(),
            &["smtp", "smtps"],
        )?;
        for (key, value) in [
            ("amqp.exchange", &self.amqp.exchange),
            ("amqp.queue", &self.amqp.queue),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.retry_queue_prefix", &self.amqp.retry_queue_prefix),
            ("redis.key_prefix", &self.redis.key_prefix),
            ("email.from", &self.email.from),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid(
                "amqp.prefetch",
                "must be at least 1 (100 to 300 suits most brokers)",
            ));
        }
        for (key, value) in [
            ("amqp.connect_timeout", self.amqp.connect_timeout),
            ("amqp.confirm_timeout", self.amqp.confirm_timeout),
            (
                "amqp.dead_letter_poll_interval",
                self.amqp.dead_letter_poll_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s, e.g. `10s`"));
            }
        }
        if self.amqp.max_body_bytes == 0 {
            return Err(invalid("amqp.max_body_bytes", "must be at least 1"));
        }
        if self.slack.max_attempts == 0 {
            return Err(invalid("slack.max_attempts", "must be at least 1"));
        }
        if self.email.max_connections == 0 {
            return Err(invalid(
                "email.max_connections",
                "must be at least 1 (a relay's limit per client is often 3 to 10)",
            ));
        }
        if self.slack.cache_capacity == 0 {
            return Err(invalid(
                "slack.cache_capacity",
                "must be at least 1 (10000 holds every workspace of a large install)",
            ));
        }
        if self.slack.request_timeout.is_zero() {
            return Err(invalid(
                "slack.request_timeout",
                "must be longer than 0s, e.g. `10s`",
            ));
        }
        if !(self.slack.channel_rate_per_second > 0.0
            && self.slack.channel_rate_per_second.is_finite())
        {
            return Err(invalid(
                "slack.channel_rate_per_second",
                "must be a positive number, e.g. `1` (Slack allows about one post a second per channel)",
            ));
        }
        if self.slack.channel_burst == 0 || self.slack.workspace_burst == 0 {
            return Err(invalid(
                "slack.channel_burst",
                "and slack.workspace_burst must be at least 1",
            ));
        }
        if self.slack.workspace_rate_per_minute == 0 {
            return Err(invalid(
                "slack.workspace_rate_per_minute",
                "must be at least 1, e.g. `300`",
            ));
        }
        if self.delivery.retry_delays.is_empty() {
            return Err(invalid(
                "delivery.retry_delays",
                "must list at least one delay, e.g. `5s,30s,2m,10m,30m`",
            ));
        }
        if self.delivery.retry_delays.iter().any(Duration::is_zero) {
            return Err(invalid(
                "delivery.retry_delays",
                "must not contain a zero delay, e.g. `5s,30s,2m`",
            ));
        }
        if self.delivery.claim_lease < Duration::from_millis(300) {
            return Err(invalid(
                "delivery.claim_lease",
                "must be at least 300ms (it is renewed every third of itself), e.g. `10s`",
            ));
        }
        if self.delivery.incident_ttl < Duration::from_secs(60) {
            return Err(invalid(
                "delivery.incident_ttl",
                "must be at least 1m (incidents must outlive their escalation steps), e.g. `7d`",
            ));
        }
        if matches!(&self.slack.default_workspace, Some(ws) if ws.trim().is_empty()) {
            return Err(invalid(
                "slack.default_workspace",
                "must be a workspace id such as `T0AEXY01`, or be left out",
            ));
        }
        for workspace in &self.slack.allowed_workspaces {
            if workspace.chars().any(char::is_whitespace) {
                return Err(invalid(
                    "slack.allowed_workspaces",
                    format!("holds {workspace:?}; list workspace ids such as `T0AEXY01`"),
                ));
            }
        }
        check_url(
            "slack.oauth_authorize_url",
            &self.slack.oauth_authorize_url,
            &["https", "http"],
        )?;
        if self.slack.oauth_scopes.is_empty()
            || self
                .slack
                .oauth_scopes
                .iter()
                .any(|scope| scope.contains(',') || scope.chars().any(char::is_whitespace))
        {
            return Err(invalid(
                "slack.oauth_scopes",
                "must list bot scopes such as `chat:write`, one per entry",
            ));
        }
        if self.slack.oauth_state_ttl.is_zero() {
            return Err(invalid(
                "slack.oauth_state_ttl",
                "must be longer than 0s, e.g. `10m`",
            ));
        }
        if let Some(public_url) = self.http.public_url() {
            check_url("http.public_url", public_url, &["https", "http"])?;
            if public_url.contains(['?', '#']) {
                return Err(invalid(
                    "http.public_url",
                    "must be a base address without `?` or `#`, e.g. `https://alerts.example.com`",
                ));
            }
        }
        for domain in &self.email.allowed_domains {
            if domain.contains('@') || domain.chars().any(char::is_whitespace) {
                return Err(invalid(
                    "email.allowed_domains",
                    format!("holds {domain:?}; list domains such as `example.com`, without `@`"),
                ));
            }
        }
        Ok(())
    }

    /// The settings as YAML with credentials in URLs replaced by `***`
    /// ([`SecretUrl`] serialises redacted).
    pub fn redacted_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot show settings: {e}\n"))
    }
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

fn check_url(key: &'static str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(value).map_err(|e| {
        invalid(
            key,
            format!("is not a URL ({e}); expected e.g. `{}://…`", schemes[0]),
        )
    })?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(invalid(
            key,
            format!(
                "has scheme `{}`; expected one of: {}",
                parsed.scheme(),
                schemes.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Replaces the password (and a lone user) in a URL with `***`.
pub fn redact_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            } else if !parsed.username().is_empty() {
                // A lone user part is often a token (`redis://TOKEN@host`).
                let _ = parsed.set_username("***");
            }
            // Without `//` (`smtp:user:pass@host`) there is no host, and the
            // URL standard reads the credentials as the path: they cannot be
            // told apart from the rest, so none of it is shown.
            if !parsed.has_host() && value.contains('@') {
                return format!("{}:***", parsed.scheme());
            }
            parsed.to_string()
        }
        Err(_) => "***".into(),
    }
}

/// Secrets, read from the environment only, never printed.
#[derive(Clone, Default)]
pub struct Secrets {
    /// `SLACK_BOT_TOKEN`: single-workspace installs without Redis tokens.
    pub slack_bot_token: Option<Secret>,
    /// `SLACK_CLIENT_ID`: token rotation.
    pub slack_client_id: Option<String>,
    /// `SLACK_CLIENT_SECRET`: token rotation.
    pub slack_client_secret: Option<Secret>,
    /// `SLACK_SIGNING_SECRET`: verifying interactive requests.
    pub slack_signing_secret: Option<Secret>,
}

impl Secrets {
    /// Reads the secrets from the process environment; empty values count as unset.
    pub fn from_env() -> Secrets {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty())
        }
        Secrets {
            slack_bot_token: var("SLACK_BOT_TOKEN").map(Secret::new),
            slack_client_id: var("SLACK_CLIENT_ID"),
            slack_client_secret: var("SLACK_CLIENT_SECRET").map(Secret::new),
            slack_signing_secret: var("SLACK_SIGNING_SECRET").map(Secret::new),
        }
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field(
                "slack_bot_token",
                &self.slack_bot_token.as_ref().map(|_| "***"),
            )
            .field("slack_client_id", &self.slack_client_id)
            .field(
                "slack_client_secret",
                &self.slack_client_secret.as_ref().map(|_| "***"),
            )
            .field(
                "slack_signing_secret",
                &self.slack_signing_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// A secret string whose `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A URL that may carry credentials (`amqp://user:password@host/…`).
///
/// `Debug`, `Display` and `Serialize` show it with the password (or a lone
/// user part, often a token) replaced by `***`, so settings can be logged
/// and printed whole; [`SecretUrl::expose`] gives the URL itself, for the
/// places that connect. It deserialises from the plain string, so settings
/// files and `ALERT_ROUTER__…` variables are written as before.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> SecretUrl {
        SecretUrl(value.into())
    }

    /// The URL with its credentials, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown: `amqp://guest:***@127.0.0.1:5672/%2f`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> SecretUrl {
        SecretUrl::new(value)
    }
}

impl From<String> for SecretUrl {
    fn from(value: String) -> SecretUrl {
        SecretUrl(value)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

/// A delay spelled the way people write it: `5s`, `2m`, `1h 30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. `5s`, `2m` or `250ms`"))
}

/// `Duration` ↔ `"30s"` in settings files.
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(secs) => Ok(Duration::from_secs(secs)),
            Raw::Text(text) => super::parse_duration(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// `Vec<Duration>` ↔ `["5s", "30s"]` (or `"5s,30s"` from the environment).
mod human_durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            value
                .iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Secs(u64),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<Item>),
            Text(String),
        }
        let items = match Raw::deserialize(d)? {
            Raw::List(items) => items,
            Raw::Text(text) if text.trim().is_empty() => Vec::new(),
            Raw::Text(text) => text.split(',').map(|t| Item::Text(t.to_string())).collect(),
        };
        items
            .into_iter()
            .map(|item| match item {
                Item::Secs(secs) => Ok(Duration::from_secs(secs)),
                Item::Text(text) => super::parse_duration(&text).map_err(serde::de::Error::custom),
            })
            .collect()
    }
}

/// `Vec<String>` ↔ `["a", "b"]` (or `"a,b"` from the environment); entries
/// are trimmed and empty ones dropped, so an empty variable means "none".
mod string_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Text(String),
        }
        let items = match Raw::deserialize(d)? {
            Raw::List(items) => items,
            Raw::Text(text) => text.split(',').map(str::to_string).collect(),
        };
        Ok(items
            .into_iter()
            .map(|item| item.trim().to_string())
            .filter(|item| !item.is_empty())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_file() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn load_with(yaml: Option<&str>, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = no_file();
        let path = dir.path().join("alert-router.yaml");
        std::fs::write(&path, yaml.unwrap_or("{}")).unwrap();
        Settings::load_from(Some(&path), env(vars))
    }

    /// Every leaf key of `value` as a dotted path (`slack.api_url`).
    fn leaf_keys(value: &serde_json::Value, prefix: &str, keys: &mut Vec<String>) {
        match value.as_object() {
            Some(map) => {
                for (name, inner) in map {
                    let path = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    leaf_keys(inner, &path, keys);
                }
            }
            None => keys.push(prefix.to_string()),
        }
    }

    #[test]
    fn the_shipped_settings_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let loaded = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(
            loaded,
            Settings::default(),
            "{DEFAULT_CONFIG_PATH} shows the defaults"
        );

        let file: serde_json::Value = config::Config::builder()
            .add_source(config::File::from(path.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let mut keys = Vec::new();
        leaf_keys(
            &serde_json::to_value(Settings::default()).unwrap(),
            "",
            &mut keys,
        );
        let missing: Vec<&String> = keys
            .iter()
            .filter(|key| {
                let mut node = &file;
                for part in key.split('.') {
                    match node.get(part) {
                        Some(inner) => node = inner,
                        None => return true,
                    }
                }
                false
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{DEFAULT_CONFIG_PATH} leaves out {missing:?}"
        );
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let s = load_with(None, &[]).unwrap();
        assert_eq!(s.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.queue, "alerts.router");
        assert_eq!(s.amqp.dead_letter_queue, "alerts.dead");
        assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6379");
        assert_eq!(s.slack.api_url, "https://slack.com/api");
        assert_eq!(s.email.smtp_url.expose(), "smtp://127.0.0.1:1025");
        assert_eq!(s.rules.path, PathBuf::from("config/rules.yaml"));
        assert_eq!(
            s.delivery.retry_delays,
            [5, 30, 120, 600, 1800].map(Duration::from_secs)
        );
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn the_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let s = load_with(
            Some("slack:\n  api_url: http://file.example/api\n  default_workspace: T1\namqp:\n  prefetch: 7\n"),
            &[
                ("ALERT_ROUTER__SLACK__API_URL", "http://env.example/api"),
                ("ALERT_ROUTER__DELIVERY__RETRY_DELAYS", "2s,5s,10s"),
            ],
        )
        .unwrap();
        assert_eq!(s.slack.api_url, "http://env.example/api");
        assert_eq!(s.slack.default_workspace.as_deref(), Some("T1"));
        assert_eq!(s.amqp.prefetch, 7);
        assert_eq!(s.delivery.retry_delays, [2, 5, 10].map(Duration::from_secs));
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = load_with(Some("amqp:\n  prefech: 10\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("prefech"), "{err}");
        let err = load_with(None, &[("ALERT_ROUTER__SLAK__API_URL", "http://x")]).unwrap_err();
        assert!(err.to_string().contains("slak"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let err = load_with(Some("amqp:\n  url: http://localhost\n"), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `amqp.url` has scheme `http`; expected one of: amqp, amqps"
        );
        let err = load_with(None, &[("ALERT_ROUTER__AMQP__PREFETCH", "0")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `amqp.prefetch` must be at least 1 (100 to 300 suits most brokers)"
        );
        let err =
            load_with(None, &[("ALERT_ROUTER__DELIVERY__RETRY_DELAYS", "5s,soon")]).unwrap_err();
        assert!(
            err.to_string().contains("`soon` is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn trust_lists_come_comma_separated_from_the_environment() {
        let s = load_with(
            Some("email:\n  allowed_domains: [example.com]\n"),
            &[
                ("ALERT_ROUTER__SLACK__ALLOWED_WORKSPACES", "T1, T2"),
                ("ALERT_ROUTER__LOG__SHOW_ADDRESSES", "true"),
            ],
        )
        .unwrap();
        assert_eq!(s.slack.allowed_workspaces, ["T1", "T2"]);
        assert_eq!(s.email.allowed_domains, ["example.com"]);
        assert!(s.log.show_addresses);
        let s = load_with(None, &[("ALERT_ROUTER__EMAIL__ALLOWED_DOMAINS", "")]).unwrap();
        assert!(s.email.allowed_domains.is_empty(), "empty means any");
        assert!(!s.log.show_addresses, "addresses are redacted by default");
        let err = load_with(
            None,
            &[("ALERT_ROUTER__EMAIL__ALLOWED_DOMAINS", "ops@example.com")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("email.allowed_domains"), "{err}");
    }

    #[test]
    fn install_settings_have_defaults_and_are_checked() {
        let s = load_with(None, &[]).unwrap();
        assert_eq!(
            s.slack.oauth_authorize_url,
            "https://slack.com/oauth/v2/authorize"
        );
        assert_eq!(s.slack.oauth_scopes, DEFAULT_BOT_SCOPES);
        assert_eq!(s.slack.oauth_state_ttl, Duration::from_secs(600));
        assert_eq!(s.http.public_url(), None);
        let s = load_with(
            None,
            &[
                ("ALERT_ROUTER__SLACK__OAUTH_SCOPES", "chat:write, im:write"),
                (
                    "ALERT_ROUTER__HTTP__PUBLIC_URL",
                    "https://alerts.example.com/",
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.slack.oauth_scopes, ["chat:write", "im:write"]);
        assert_eq!(s.http.public_url(), Some("https://alerts.example.com/"));
        let s = load_with(None, &[("ALERT_ROUTER__HTTP__PUBLIC_URL", "")]).unwrap();
        assert_eq!(s.http.public_url(), None, "empty means unset");
        let err = load_with(
            None,
            &[("ALERT_ROUTER__HTTP__PUBLIC_URL", "alerts.example.com")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("http.public_url"), "{err}");
        let err = load_with(None, &[("ALERT_ROUTER__SLACK__OAUTH_SCOPES", "")]).unwrap_err();
        assert!(err.to_string().contains("slack.oauth_scopes"), "{err}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let dir = no_file();
        let err = Settings::load_from(Some(&dir.path().join("nope.yaml")), env(&[])).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn redacted_settings_hide_passwords() {
        let s = load_with(
            Some("email:\n  smtp_url: smtp://mailer:hunter2@mail.example:587\n"),
            &[(
                "ALERT_ROUTER__AMQP__URL",
                "amqp://app:s3cret@rabbit:5672/%2f",
            )],
        )
        .unwrap();
        let shown = s.redacted_yaml();
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
    }

    #[test]
    fn a_url_missing_its_slashes_does_not_show_its_password() {
        // Found by the fuzz target `smtp_url`: with no `//` there is no host,
        // and the password was shown as part of the path.
        for url in [
            "smtp:mailer:hunter2@mail.example:587",
            "smtp:/mailer:hunter2@mail.example:587",
            "smtps:/z/u%40x:hunter2@mail.example.com",
            "amqp:app:hunter2@rabbit:5672/%2f",
        ] {
            let shown = SecretUrl::new(url).to_string();
            assert!(!shown.contains("hunter2"), "{url} shown as {shown}");
            assert!(shown.ends_with(":***"), "{shown}");
        }
        assert_eq!(
            SecretUrl::new("smtp://mailer:hunter2@mail.example:587").to_string(),
            "smtp://mailer:***@mail.example:587"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let secrets = Secrets {
            slack_bot_token: Some(Secret::new("xoxb-test-123")),
            ..Secrets::default()
        };
        assert!(!format!("{secrets:?}").contains("xoxb"));
        assert_eq!(Secret::new("x").to_string(), "***");
    }
}
