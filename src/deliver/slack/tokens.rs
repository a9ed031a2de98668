//! Workspace bot tokens: read from Redis (`<prefix>:slack:token:<workspace>`), else `SLACK_BOT_TOKEN`.
//!
//! Other systems (an OAuth install flow) write the Redis record, so it is read
//! again after a short in-process cache. Tokens are held as [`Secret`]s and
//! never reach a log line or an error message.
//!
//! Rotating tokens are replaced once per expiry across all replicas: a Redis
//! lock lets one replica call `oauth.v2.access`, whoever finds a newer token
//! stored uses it instead of refreshing again, and concurrent callers in one
//! process share one refresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use backon::{ExponentialBuilder, Retryable};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::SlackClient;
use crate::config::Secret;

/// The Redis record for one workspace; other systems (an OAuth install flow) write it too, so its shape is fixed.
///
/// The tokens are [`Secret`]s: `Debug` shows `***`. Serialising writes them
/// in the clear, as the record in Redis must hold them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    #[serde(serialize_with = "stored::secret")]
    pub access_token: Secret,
    #[serde(default, serialize_with = "stored::optional_secret")]
    pub refresh_token: Option<Secret>,
    /// Unix seconds; `None` for tokens that do not expire.
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub team_id: String,
    #[serde(default)]
    pub bot_user_id: Option<String>,
}

/// How a record's secrets are written to Redis: as they are. [`Secret`] has
/// no `Serialize` of its own, so nothing else can serialise one by accident.
mod stored {
    use serde::Serializer;

    use crate::config::Secret;

    pub fn secret<S: Serializer>(value: &Secret, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.expose())
    }

    pub fn optional_secret<S: Serializer>(value: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => s.serialize_some(value.expose()),
            None => s.serialize_none(),
        }
    }
}

/// A usable token for one workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceToken {
    /// The workspace id the token is for (or `default` for an unnamed install).
    pub workspace: String,
    pub access_token: Secret,
    pub expires_at: Option<i64>,
    /// Where it came from, for logs: `redis` or `env`.
    pub source: &'static str,
    /// Whether a refresh token is stored with it (token rotation).
    pub rotating: bool,
}

/// Why a token could not be read. Never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token of workspace {workspace} from Redis: {source}")]
    Redis {
        workspace: String,
        #[source]
        source: redis::RedisError,
    },
    #[error(
        "the token record of workspace {workspace} in Redis is malformed ({problem}); write it again with `alert-router tokens set`"
    )]
    Malformed { workspace: String, problem: String },
    #[error("cannot refresh the token of workspace {workspace}: {reason}")]
    Refresh {
        workspace: String,
        reason: String,
        transient: bool,
        /// Slack rate-limited the exchange (HTTP 429): call again after this.
        retry_after: Option<Duration>,
    },
    /// The outcome of a refresh several callers waited on together.
    #[error(transparent)]
    Shared(Arc<TokenError>),
}

impl TokenError {
    /// Redis trouble passes; a malformed record needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::Redis { .. } => true,
            TokenError::Refresh { transient, .. } => *transient,
            TokenError::Malformed { .. } => false,
            TokenError::Shared(inner) => inner.is_transient(),
        }
    }

    /// Redis could not be read or written: nothing about Slack or the token.
    pub fn is_redis(&self) -> bool {
        match self {
            TokenError::Redis { .. } => true,
            TokenError::Shared(inner) => inner.is_redis(),
            _ => false,
        }
    }

    /// How long Slack asked to wait when it rate-limited the refresh: a
    /// rate limit, never a reason to give up on Slack.
    pub fn rate_limited(&self) -> Option<Duration> {
        match self {
            TokenError::Refresh { retry_after, .. } => *retry_after,
            TokenError::Shared(inner) => inner.rate_limited(),
            _ => None,
        }
    }
}

/// Finds the token for a workspace.
pub struct TokenStore {
    redis: ConnectionManager,
    key_prefix: String,
    env_token: Option<Secret>,
    default_workspace: Option<String>,
    /// Bounded: producers choose the workspace ids events name.
    cache: Cache<String, Cached>,
    /// Set when token rotation is configured (`SLACK_CLIENT_ID`/`SECRET`).
    rotation: Option<Rotation>,
    /// The env token serves every workspace without a stored one, even
    /// with a default workspace set: a dry run needs no real token anywhere.
    env_token_everywhere: bool,
    /// Refreshes in progress here, by workspace and the token they replace.
    flights: Mutex<HashMap<(String, String), Arc<Flight>>>,
}

/// A cached read; a rotating token leaves the cache when it is due for refresh.
#[derive(Clone)]
struct Cached {
    /// `None`: Redis has no record for the workspace (a miss, kept briefly).
    token: Option<WorkspaceToken>,
    /// Unix milliseconds after which the entry must not be served.
    until_ms: Option<i64>,
}

/// How long "no token for this workspace" is remembered: long enough that a
/// flood of events naming an unknown workspace costs Redis one read every few
/// seconds, short enough that a newly installed workspace is seen at once.
const MISS_TTL: Duration = Duration::from_secs(5);

/// Tokens live `token_cache_ttl`; misses [`MISS_TTL`] at most.
struct CacheLifetimes {
    hit: Duration,
}

impl CacheLifetimes {
    fn of(&self, cached: &Cached) -> Duration {
        match cached.token {
            Some(_) => self.hit,
            None => self.hit.min(MISS_TTL),
        }
    }
}

impl Expiry<String, Cached> for CacheLifetimes {
    fn expire_after_create(&self, _: &String, cached: &Cached, _: Instant) -> Option<Duration> {
        Some(self.of(cached))
    }

    /// A rewritten entry lives as long as a new one (moka would keep the old deadline).
    fn expire_after_update(
        &self,
        _: &String,
        cached: &Cached,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(cached))
    }
}

/// One refresh that every caller replacing the same token waits on.
type Flight = OnceCell<Result<Fresh, Arc<TokenError>>>;

/// A token together with what is known of its lifetime.
#[derive(Debug, Clone)]
struct Fresh {
    token: WorkspaceToken,
    /// `expires_in` of the refresh that minted it, when known.
    lifetime_secs: Option<i64>,
}

/// What the last refresh learnt about its token, kept beside the record (whose
/// shape is fixed). It only describes the token whose `expires_at` it names.
#[derive(Debug, Serialize, Deserialize)]
struct Lifetime {
    expires_at: i64,
    expires_in: i64,
}

/// What refreshing a rotating token needs.
pub struct Rotation {
    pub slack: SlackClient,
    pub client_id: String,
    pub client_secret: Secret,
}

/// Refresh at most this long before `expires_at`, as Slack's SDKs do for its 12-hour tokens.
const REFRESH_AHEAD_MAX_SECS: i64 = 2 * 3600;
/// ... and at most this part of the token's lifetime (2 h of 12 h), so that
/// a token living less than two hours is not refreshed as soon as it is minted.
const REFRESH_AHEAD_DIVISOR: i64 = 6;
/// A refresh lock outlives one `oauth.v2.access` call with its retries.
const REFRESH_LOCK: Duration = Duration::from_secs(60);
/// How long a replica waits for another one's refresh before giving up for now.
const REFRESH_WAIT: Duration = Duration::from_secs(15);
/// The lifetime note outlives its token by this much, then goes.
const LIFETIME_KEEP_SECS: i64 = 24 * 3600;

/// Writes the new record only if the stored one still holds the refresh
/// token we exchanged (the fencing check): the new pair is then the only
/// valid one, and it must be stored even if our lock lapsed meanwhile.
/// The lifetime note (KEYS[2]) is written with it, or removed.
const WRITE_IF_UNCHANGED: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if ok and record['refresh_token'] == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[2])
  else
    redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
  end
  return 1
end
return 0
"#;

const RELEASE_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

impl TokenStore {
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        env_token: Option<Secret>,
        default_workspace: Option<String>,
        cache_ttl: Duration,
        cache_capacity: u64,
    ) -> TokenStore {
        TokenStore {
            redis,
            key_prefix: key_prefix.to_string(),
            env_token,
            default_workspace,
            cache: Cache::builder()
                .max_capacity(cache_capacity)
                .expire_after(CacheLifetimes { hit: cache_ttl })
                .build(),
            rotation: None,
            env_token_everywhere: false,
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Lets the env token serve every workspace that has no stored token
    /// (`run --dry-run`, where Slack is a local stand-in).
    pub fn with_env_token_everywhere(mut self) -> TokenStore {
        self.env_token_everywhere = true;
        self
    }

    /// Enables token rotation: tokens near expiry (or reported expired) are
    /// refreshed through `oauth.v2.access`.
    pub fn with_rotation(mut self, rotation: Rotation) -> TokenStore {
        self.rotation = Some(rotation);
        self
    }

    /// The Redis key of a workspace's token.
    pub fn key(key_prefix: &str, workspace: &str) -> String {
        format!("{key_prefix}:slack:token:{workspace}")
    }

    /// The Redis key of what the last refresh learnt about the token's lifetime.
    fn lifetime_key(key_prefix: &str, workspace: &str) -> String {
        format!("{key_prefix}:slack:token-lifetime:{workspace}")
    }

    /// The workspace an event belongs to: its own, else the default.
    pub fn workspace_for<'a>(&'a self, event_workspace: Option<&'a str>) -> Option<&'a str> {
        event_workspace.or(self.default_workspace.as_deref())
    }

    /// The token to use for `workspace`, or `None` when there is none at all.
    pub async fn get(&self, workspace: Option<&str>) -> Result<Option<WorkspaceToken>, TokenError> {
        let Some(workspace) = workspace else {
            // No workspace named anywhere: only a single-workspace install can serve it.
            return Ok(self.env_token.clone().map(|token| WorkspaceToken {
                workspace: "default".into(),
                access_token: token,
                expires_at: None,
                source: "env",
                rotating: false,
            }));
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(cached) = self.cache.get(workspace)
            && cached.until_ms.is_none_or(|until| now_ms < until)
        {
            return Ok(cached.token);
        }
        let stored = self.read(workspace).await?;
        let refresh_at = stored.as_ref().and_then(|fresh| self.refresh_at_ms(fresh));
        if let (Some(current), Some(refresh_at)) = (&stored, refresh_at)
            && now_ms >= refresh_at
        {
            return match self.refresh(&current.token).await {
                Ok(fresh) => Ok(Some(fresh)),
                // Still valid for a while: use it, and try again after the cache time.
                Err(e)
                    if current
                        .token
                        .expires_at
                        .is_some_and(|at| at * 1000 > chrono::Utc::now().timestamp_millis()) =>
                {
                    tracing::warn!(workspace, error = %e, "token refresh failed; using the current token until it expires");
                    let until_ms = current.token.expires_at.map(|at| at * 1000);
                    self.remember(workspace, Some(current.token.clone()), until_ms);
                    Ok(Some(current.token.clone()))
                }
                Err(e) => Err(e),
            };
        }
        let token = stored.map(|fresh| fresh.token);
        self.remember(workspace, token.clone(), refresh_at);
        Ok(token)
    }

    /// Forgets the cached token of a workspace (after Slack rejected it).
    pub fn invalidate(&self, workspace: &str) {
        self.cache.invalidate(workspace);
    }

    fn remember(&self, workspace: &str, token: Option<WorkspaceToken>, until_ms: Option<i64>) {
        self.cache
            .insert(workspace.to_string(), Cached { token, until_ms });
    }

    /// When (Unix ms) a rotating token is due for refresh; `None` for tokens
    /// this store does not refresh.
    fn refresh_at_ms(&self, fresh: &Fresh) -> Option<i64> {
        if !fresh.token.rotating || self.rotation.is_none() {
            return None;
        }
        let expires_at = fresh.token.expires_at?;
        Some(expires_at * 1000 - refresh_ahead_ms(fresh.lifetime_secs))
    }

    async fn read(&self, workspace: &str) -> Result<Option<Fresh>, TokenError> {
        let mut redis = self.redis.clone();
        let (raw, lifetime): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(Self::key(&self.key_prefix, workspace))
            .arg(Self::lifetime_key(&self.key_prefix, workspace))
            .query_async(&mut redis)
            .await
            .map_err(|source| TokenError::Redis {
                workspace: workspace.to_string(),
                source,
            })?;
        if let Some(raw) = raw {
            let record = parse_record(&raw).map_err(|problem| TokenError::Malformed {
                workspace: workspace.to_string(),
                problem,
            })?;
            // A note about an earlier token (the record was rewritten since) says nothing.
            let lifetime_secs = lifetime
                .and_then(|raw| serde_json::from_str::<Lifetime>(&raw).ok())
                .filter(|l| Some(l.expires_at) == record.expires_at && l.expires_in > 0)
                .map(|l| l.expires_in);
            return Ok(Some(Fresh {
                token: WorkspaceToken {
                    workspace: workspace.to_string(),
                    access_token: record.access_token,
                    expires_at: record.expires_at,
                    source: "redis",
                    rotating: record.refresh_token.is_some(),
                },
                lifetime_secs,
            }));
        }
        // SLACK_BOT_TOKEN serves the default workspace, or every workspace when no default is set.
        let env_serves_it = self.env_token_everywhere
            || match &self.default_workspace {
                Some(default) => default == workspace,
                None => true,
            };
        Ok(self
            .env_token
            .clone()
            .filter(|_| env_serves_it)
            .map(|token| Fresh {
                token: WorkspaceToken {
                    workspace: workspace.to_string(),
                    access_token: token,
                    expires_at: None,
                    source: "env",
                    rotating: false,
                },
                lifetime_secs: None,
            }))
    }

    /// Replaces `stale` (expired, or about to) with a fresh token. Callers
    /// in this process replacing the same token share one refresh; across
    /// replicas one refreshes at a time under a Redis lock, and a token
    /// another one stored meanwhile is used instead of refreshing again
    /// (each refresh revokes the previous refresh token).
    pub async fn refresh(&self, stale: &WorkspaceToken) -> Result<WorkspaceToken, TokenError> {
        let workspace = stale.workspace.as_str();
        let key = (
            workspace.to_string(),
            stale.access_token.expose().to_string(),
        );
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            flights.entry(key.clone()).or_default().clone()
        };
        let outcome = flight
            .get_or_init(|| async {
                // Counted here, once per refresh, not once per caller sharing it.
                let refreshed = self.refresh_once(stale).await;
                crate::telemetry::record_token_refresh(match &refreshed {
                    Ok(_) => "ok",
                    Err(e) if e.is_transient() => "failed_transient",
                    Err(_) => "failed",
                });
                refreshed.map_err(Arc::new)
            })
            .await
            .clone();
        // Done: whoever comes later starts anew (and first looks at what is stored).
        {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(&key);
            }
        }
        match outcome {
            Ok(fresh) => {
                self.remember(
                    workspace,
                    Some(fresh.token.clone()),
                    self.refresh_at_ms(&fresh),
                );
                Ok(fresh.token)
            }
            Err(e) => {
                self.invalidate(workspace);
                Err(TokenError::Shared(e))
            }
        }
    }

    /// One refresh across replicas: use a newer stored token if there is
    /// one, else take the lock and exchange the stored refresh token.
    async fn refresh_once(&self, stale: &WorkspaceToken) -> Result<Fresh, TokenError> {
        let workspace = stale.workspace.as_str();
        let refresh_error = |reason: String, transient: bool| TokenError::Refresh {
            workspace: workspace.to_string(),
            reason,
            transient,
            retry_after: None,
        };
        let Some(rotation) = &self.rotation else {
            return Err(refresh_error(
                "token rotation is not configured (set SLACK_CLIENT_ID and SLACK_CLIENT_SECRET)"
                    .into(),
                false,
            ));
        };
        // Another replica may have replaced it already (we hold a cached token).
        if let Some(fresh) = self.newer_than(stale).await? {
            return Ok(fresh);
        }
        let lock_key = format!("{}:slack:token-lock:{workspace}", self.key_prefix);
        let record_key = Self::key(&self.key_prefix, workspace);
        let lifetime_key = Self::lifetime_key(&self.key_prefix, workspace);
        let lock_value = uuid::Uuid::new_v4().to_string();
        let redis_error = |source| TokenError::Redis {
            workspace: workspace.to_string(),
            source,
        };

        // Take the lock, or use what the replica holding it stores meanwhile.
        let take_lock = || async {
            let mut redis = self.redis.clone();
            let locked: Option<String> = redis::cmd("SET")
                .arg(&lock_key)
                .arg(&lock_value)
                .arg("NX")
                .arg("PX")
                .arg(REFRESH_LOCK.as_millis() as u64)
                .query_async(&mut redis)
                .await
                .map_err(|e| LockWait::Failed(redis_error(e)))?;
            if locked.is_some() {
                return Ok(None);
            }
            match self.newer_than(stale).await {
                Ok(Some(fresh)) => Ok(Some(fresh)),
                Ok(None) => Err(LockWait::Busy),
                Err(e) => Err(LockWait::Failed(e)),
            }
        };
        let waited = take_lock
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_millis(500))
                    .with_jitter()
                    .without_max_times()
                    .with_total_delay(Some(REFRESH_WAIT)),
            )
            .when(|e| matches!(e, LockWait::Busy))
            .await;
        match waited {
            Ok(None) => {}
            Ok(Some(fresh)) => return Ok(fresh),
            Err(LockWait::Failed(e)) => return Err(e),
            Err(LockWait::Busy) => {
                return Err(refresh_error(
                    "another replica has been refreshing it for too long".into(),
                    true,
                ));
            }
        }

        let mut redis = self.redis.clone();
        let result = async {
            // The replica that held the lock before us may have just replaced it.
            if let Some(fresh) = self.newer_than(stale).await? {
                return Ok(fresh);
            }
            let raw: Option<String> = redis.get(&record_key).await.map_err(redis_error)?;
            let record = raw
                .as_deref()
                .map(parse_record)
                .transpose()
                .map_err(|problem| TokenError::Malformed {
                    workspace: workspace.to_string(),
                    problem,
                })?
                .ok_or_else(|| refresh_error("its token record is gone".into(), false))?;
            let Some(refresh_token) = record.refresh_token.clone() else {
                return Err(refresh_error(
                    "its record has no refresh_token".into(),
                    false,
                ));
            };
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
                ("client_id", rotation.client_id.as_str()),
                ("client_secret", rotation.client_secret.expose()),
            ];
            // Once only: a retry after a lost answer would send a refresh
            // token Slack has already exchanged (and revoked).
            let reply = rotation
                .slack
                .call_once("oauth.v2.access", None, &super::Body::Form(&form))
                .await
                .map_err(|e| TokenError::Refresh {
                    workspace: workspace.to_string(),
                    reason: e.to_string(),
                    transient: e.is_transient(),
                    // Without a Retry-After, a second, as for any 429.
                    retry_after: e.is_rate_limited().then(|| {
                        e.retry_after().unwrap_or_else(|| {
                            super::client::honoured_retry_after(Duration::from_secs(1))
                        })
                    }),
                })?;
            let text = |name: &str| {
                reply
                    .get(name)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
            };
            let (Some(access_token), Some(new_refresh)) =
                (text("access_token"), text("refresh_token"))
            else {
                return Err(refresh_error(
                    "oauth.v2.access answered without a token pair".into(),
                    true,
                ));
            };
            let expires_in = reply
                .get("expires_in")
                .and_then(serde_json::Value::as_i64)
                .filter(|secs| *secs > 0);
            let expires_at = expires_in.map(|secs| chrono::Utc::now().timestamp() + secs);
            let fresh_record = TokenRecord {
                access_token: Secret::new(access_token),
                refresh_token: Some(Secret::new(new_refresh)),
                expires_at,
                team_id: reply
                    .pointer("/team/id")
                    .and_then(serde_json::Value::as_str)
                    .map_or(record.team_id.clone(), str::to_string),
                bot_user_id: text("bot_user_id").or(record.bot_user_id.clone()),
            };
            let json = serde_json::to_string(&fresh_record)
                .map_err(|e| refresh_error(format!("cannot encode the new record: {e}"), false))?;
            let lifetime = match (expires_at, expires_in) {
                (Some(expires_at), Some(expires_in)) => serde_json::to_string(&Lifetime {
                    expires_at,
                    expires_in,
                })
                .map_err(|e| refresh_error(format!("cannot encode the new record: {e}"), false))?,
                _ => String::new(),
            };
            let written: i64 = redis::Script::new(WRITE_IF_UNCHANGED)
                .key(&record_key)
                .key(&lifetime_key)
                .arg(refresh_token.expose())
                .arg(json)
                .arg(lifetime)
                .arg(expires_in.unwrap_or(0) + LIFETIME_KEEP_SECS)
                .invoke_async(&mut redis)
                .await
                .map_err(redis_error)?;
            if written == 0 {
                // Someone replaced the record meanwhile (a new install, an
                // operator): theirs wins; ours stays valid until it expires.
                tracing::warn!(
                    workspace,
                    "the token record changed during the refresh; keeping the new record"
                );
            }
            tracing::info!(workspace, expires_at, "token refreshed");
            Ok(Fresh {
                token: WorkspaceToken {
                    workspace: workspace.to_string(),
                    access_token: fresh_record.access_token,
                    expires_at: fresh_record.expires_at,
                    source: "redis",
                    rotating: true,
                },
                lifetime_secs: expires_in,
            })
        }
        .await;
        let _: Result<i64, _> = redis::Script::new(RELEASE_LOCK)
            .key(&lock_key)
            .arg(&lock_value)
            .invoke_async(&mut redis)
            .await;
        match &result {
            Err(e) if let Some(wait) = e.rate_limited() => {
                tracing::warn!(
                    workspace,
                    ?wait,
                    "Slack rate-limited the token refresh; waiting before the next try"
                );
            }
            Err(e) => {
                tracing::error!(workspace, error = %e, "token refresh failed; Slack is unavailable for this workspace until it works");
            }
            Ok(_) => {}
        }
        result
    }

    /// The stored token if it replaced `stale` and has not expired. Any
    /// other unexpired token is newer than one that failed or is due: it
    /// need not have long to live (a short-lived one is refreshed in turn).
    async fn newer_than(&self, stale: &WorkspaceToken) -> Result<Option<Fresh>, TokenError> {
        let current = self.read(&stale.workspace).await?;
        let now = chrono::Utc::now().timestamp();
        Ok(current.filter(|fresh| {
            fresh.token.access_token != stale.access_token
                && fresh.token.expires_at.is_none_or(|at| at > now)
        }))
    }
}

/// Why waiting for the refresh lock stopped.
enum LockWait {
    /// Another replica holds it and has stored nothing newer yet.
    Busy,
    Failed(TokenError),
}

/// How long before expiry a token is refreshed: Slack's SDKs' two hours, or
/// a sixth of the token's life if that is shorter (unknown: two hours).
fn refresh_ahead_ms(lifetime_secs: Option<i64>) -> i64 {
    let max = REFRESH_AHEAD_MAX_SECS * 1000;
    lifetime_secs.map_or(max, |secs| (secs * 1000 / REFRESH_AHEAD_DIVISOR).min(max))
}

/// Parses a token record; the error says where, never what (it may hold the token).
pub fn parse_record(raw: &str) -> Result<TokenRecord, String> {
    let record: TokenRecord = serde_json::from_str(raw).map_err(|e| {
        format!(
            "{} at line {} column {}",
            match e.classify() {
                serde_json::error::Category::Data => "wrong field or type",
                _ => "not JSON",
            },
            e.line(),
            e.column()
        )
    })?;
    if record.access_token.expose().trim().is_empty() {
        return Err("access_token is empty".into());
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_parses_and_a_bad_one_does_not_echo_its_content() {
        let ok = parse_record(
            r#"{"access_token":"xoxb-test-1","refresh_token":null,"expires_at":null,"team_id":"T1","bot_user_id":"U1"}"#,
        )
        .unwrap();
        assert_eq!(ok.team_id, "T1");
        let err = parse_record(r#"{"access_token":"xoxb-test-secret","team_id":7}"#).unwrap_err();
        assert!(!err.contains("xoxb"), "{err}");
        assert!(err.contains("wrong field or type"), "{err}");
    }

    #[test]
    fn tokens_are_refreshed_two_hours_ahead_or_a_sixth_of_their_life_if_shorter() {
        const HOUR_MS: i64 = 3_600_000;
        assert_eq!(refresh_ahead_ms(None), 2 * HOUR_MS, "lifetime unknown");
        assert_eq!(
            refresh_ahead_ms(Some(43_200)),
            2 * HOUR_MS,
            "Slack's 12 hours"
        );
        assert_eq!(refresh_ahead_ms(Some(86_400)), 2 * HOUR_MS);
        assert_eq!(
            refresh_ahead_ms(Some(3_600)),
            600_000,
            "one hour: ten minutes"
        );
        assert_eq!(refresh_ahead_ms(Some(6)), 1_000);
    }
}

/// Token records as the `tokens` command manages them.
pub mod admin {
    use redis::AsyncCommands;
    use redis::aio::ConnectionManager;

    use super::{TokenRecord, TokenStore, parse_record};

    /// Writes (or replaces) a workspace's token record.
    pub async fn store(
        redis: &mut ConnectionManager,
        key_prefix: &str,
        workspace: &str,
        record: &TokenRecord,
    ) -> Result<(), String> {
        let json = serde_json::to_string(record).map_err(|e| e.to_string())?;
        redis
            .set::<_, _, ()>(TokenStore::key(key_prefix, workspace), json)
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes a freshly installed workspace's record together with what is
    /// known of its lifetime (`expires_in` of `oauth.v2.access`), as a
    /// refresh does, so a short-lived rotating token is refreshed in time;
    /// a stale note of an earlier install goes. One transaction: a replica
    /// never reads the new record with the old note.
    pub async fn store_installed(
        redis: &mut ConnectionManager,
        key_prefix: &str,
        record: &TokenRecord,
        expires_in: Option<i64>,
    ) -> Result<(), redis::RedisError> {
        let workspace = record.team_id.as_str();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let json = serde_json::to_string(record).map_err(encode_error)?;
        pipe.set(TokenStore::key(key_prefix, workspace), json)
            .ignore();
        let lifetime_key = TokenStore::lifetime_key(key_prefix, workspace);
        match (record.expires_at, expires_in) {
            (Some(expires_at), Some(expires_in)) if expires_in > 0 => {
                let note = serde_json::to_string(&super::Lifetime {
                    expires_at,
                    expires_in,
                })
                .map_err(encode_error)?;
                let keep = u64::try_from(expires_in + super::LIFETIME_KEEP_SECS).unwrap_or(1);
                pipe.set_ex(lifetime_key, note, keep).ignore();
            }
            _ => {
                pipe.del(lifetime_key).ignore();
            }
        }
        pipe.query_async(redis).await
    }

    /// A record that cannot be encoded, as a Redis client error (it never
    /// happens for plain strings and numbers; the message holds no secret).
    fn encode_error(e: serde_json::Error) -> redis::RedisError {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "cannot encode the token record",
            e.to_string(),
        ))
    }

    /// Every stored workspace with its record (or why it cannot be read).
    pub async fn list(
        redis: &mut ConnectionManager,
        key_prefix: &str,
    ) -> Result<Vec<(String, Result<TokenRecord, String>)>, String> {
        let prefix = TokenStore::key(key_prefix, "");
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(500)
                .query_async(redis)
                .await
                .map_err(|e| e.to_string())?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let raw: Option<String> = redis.get(&key).await.map_err(|e| e.to_string())?;
            if let Some(raw) = raw {
                let workspace = key.trim_start_matches(&prefix).to_string();
                out.push((workspace, parse_record(&raw)));
            }
        }
        Ok(out)
    }

    /// Deletes a workspace's record; false when there was none.
    pub async fn delete(
        redis: &mut ConnectionManager,
        key_prefix: &str,
        workspace: &str,
    ) -> Result<bool, String> {
        let removed: i64 = redis
            .del(TokenStore::key(key_prefix, workspace))
            .await
            .map_err(|e| e.to_string())?;
        let _: i64 = redis
            .del(TokenStore::lifetime_key(key_prefix, workspace))
            .await
            .map_err(|e| e.to_string())?;
        Ok(removed > 0)
    }
}
