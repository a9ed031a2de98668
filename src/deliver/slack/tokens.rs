//! Workspace bot tokens: read from Redis (`<prefix>:slack:token:<workspace>`), else `SLACK_BOT_TOKEN`.
//!
//! Other systems (an OAuth install flow) write the Redis record, so it is read
//! again after a short in-process cache. Tokens are held as [`Secret`]s and
//! never reach a log line or an error message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::SlackClient;
use crate::config::Secret;

/// The Redis record for one workspace; other systems (an OAuth install flow) write it too, so its shape is fixed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub access_token: String,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix seconds; `None` for tokens that do not expire.
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub team_id: String,
    #[serde(default)]
    pub bot_user_id: Option<String>,
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
    },
}

impl TokenError {
    /// Redis trouble passes; a malformed record needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TokenError::Redis { .. }
                | TokenError::Refresh {
                    transient: true,
                    ..
                }
        )
    }
}

/// Finds the token for a workspace.
pub struct TokenStore {
    redis: ConnectionManager,
    key_prefix: String,
    env_token: Option<Secret>,
    default_workspace: Option<String>,
    cache_ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<WorkspaceToken>)>>,
    /// Set when token rotation is configured (`SLACK_CLIENT_ID`/`SECRET`).
    rotation: Option<Rotation>,
}

/// What refreshing a rotating token needs.
pub struct Rotation {
    pub slack: SlackClient,
    pub client_id: String,
    pub client_secret: Secret,
}

/// Refresh this long before `expires_at`, as Slack's SDKs do.
const REFRESH_AHEAD_SECS: i64 = 2 * 3600;
/// A refresh lock outlives one `oauth.v2.access` call with its retries.
const REFRESH_LOCK: Duration = Duration::from_secs(60);
/// How long a replica waits for another one's refresh before giving up for now.
const REFRESH_WAIT: Duration = Duration::from_secs(15);

/// Writes the new record only if the stored one still holds the refresh
/// token we exchanged (the fencing check): the new pair is then the only
/// valid one, and it must be stored even if our lock lapsed meanwhile.
const WRITE_IF_UNCHANGED: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if ok and record['refresh_token'] == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
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
    ) -> TokenStore {
        TokenStore {
            redis,
            key_prefix: key_prefix.to_string(),
            env_token,
            default_workspace,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            rotation: None,
        }
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
        if let Ok(cache) = self.cache.lock()
            && let Some((at, token)) = cache.get(workspace)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(token.clone());
        }
        let mut token = self.read(workspace).await?;
        if let Some(current) = &token
            && current.rotating
            && self.rotation.is_some()
            && current
                .expires_at
                .is_some_and(|at| at - chrono::Utc::now().timestamp() < REFRESH_AHEAD_SECS)
        {
            match self.refresh(current).await {
                Ok(fresh) => token = Some(fresh),
                // Still valid for a while: use it, and try again on the next read.
                Err(e)
                    if current
                        .expires_at
                        .is_some_and(|at| at > chrono::Utc::now().timestamp()) =>
                {
                    tracing::warn!(workspace, error = %e, "token refresh failed; using the current token until it expires");
                }
                Err(e) => return Err(e),
            }
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(workspace.to_string(), (Instant::now(), token.clone()));
        }
        Ok(token)
    }

    /// Forgets the cached token of a workspace (after Slack rejected it).
    pub fn invalidate(&self, workspace: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(workspace);
        }
    }

    async fn read(&self, workspace: &str) -> Result<Option<WorkspaceToken>, TokenError> {
        let mut redis = self.redis.clone();
        let raw: Option<String> = redis
            .get(Self::key(&self.key_prefix, workspace))
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
            return Ok(Some(WorkspaceToken {
                workspace: workspace.to_string(),
                access_token: Secret::new(record.access_token),
                expires_at: record.expires_at,
                source: "redis",
                rotating: record.refresh_token.is_some(),
            }));
        }
        // SLACK_BOT_TOKEN serves the default workspace, or every workspace when no default is set.
        let env_serves_it = match &self.default_workspace {
            Some(default) => default == workspace,
            None => true,
        };
        Ok(self
            .env_token
            .clone()
            .filter(|_| env_serves_it)
            .map(|token| WorkspaceToken {
                workspace: workspace.to_string(),
                access_token: token,
                expires_at: None,
                source: "env",
                rotating: false,
            }))
    }

    /// Replaces `stale` (expired, or about to) with a fresh token. One replica
    /// refreshes at a time under a Redis lock; the others wait and read what
    /// it wrote. Every refresh returns a new refresh token and revokes the
    /// old one, so the new pair is written back before anything else.
    pub async fn refresh(&self, stale: &WorkspaceToken) -> Result<WorkspaceToken, TokenError> {
        let workspace = stale.workspace.as_str();
        let refresh_error = |reason: String, transient: bool| TokenError::Refresh {
            workspace: workspace.to_string(),
            reason,
            transient,
        };
        let Some(rotation) = &self.rotation else {
            return Err(refresh_error(
                "token rotation is not configured (set SLACK_CLIENT_ID and SLACK_CLIENT_SECRET)"
                    .into(),
                false,
            ));
        };
        let lock_key = format!("{}:slack:token-lock:{workspace}", self.key_prefix);
        let record_key = Self::key(&self.key_prefix, workspace);
        let lock_value = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut redis = self.redis.clone();
        let redis_error = |source| TokenError::Redis {
            workspace: workspace.to_string(),
            source,
        };
        loop {
            let locked: Option<String> = redis::cmd("SET")
                .arg(&lock_key)
                .arg(&lock_value)
                .arg("NX")
                .arg("PX")
                .arg(REFRESH_LOCK.as_millis() as u64)
                .query_async(&mut redis)
                .await
                .map_err(redis_error)?;
            if locked.is_some() {
                break;
            }
            // Another replica is refreshing: its result is what we want.
            if let Some(fresh) = self.fresher_than(stale).await? {
                return Ok(fresh);
            }
            if started.elapsed() > REFRESH_WAIT {
                return Err(refresh_error(
                    "another replica has been refreshing it for too long".into(),
                    true,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let result = async {
            if let Some(fresh) = self.fresher_than(stale).await? {
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
                ("refresh_token", refresh_token.as_str()),
                ("client_id", rotation.client_id.as_str()),
                ("client_secret", rotation.client_secret.expose()),
            ];
            // Once only: a retry after a lost answer would send a refresh
            // token Slack has already exchanged (and revoked).
            let reply = rotation
                .slack
                .call_once("oauth.v2.access", None, &super::Body::Form(&form))
                .await
                .map_err(|e| refresh_error(e.to_string(), e.is_transient()))?;
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
            let expires_at = reply
                .get("expires_in")
                .and_then(serde_json::Value::as_i64)
                .map(|secs| chrono::Utc::now().timestamp() + secs);
            let fresh_record = TokenRecord {
                access_token,
                refresh_token: Some(new_refresh),
                expires_at,
                team_id: reply
                    .pointer("/team/id")
                    .and_then(serde_json::Value::as_str)
                    .map_or(record.team_id.clone(), str::to_string),
                bot_user_id: text("bot_user_id").or(record.bot_user_id.clone()),
            };
            let json = serde_json::to_string(&fresh_record)
                .map_err(|e| refresh_error(format!("cannot encode the new record: {e}"), false))?;
            let written: i64 = redis::Script::new(WRITE_IF_UNCHANGED)
                .key(&record_key)
                .arg(&refresh_token)
                .arg(json)
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
            Ok(WorkspaceToken {
                workspace: workspace.to_string(),
                access_token: Secret::new(fresh_record.access_token),
                expires_at: fresh_record.expires_at,
                source: "redis",
                rotating: true,
            })
        }
        .await;
        let _: Result<i64, _> = redis::Script::new(RELEASE_LOCK)
            .key(&lock_key)
            .arg(&lock_value)
            .invoke_async(&mut redis)
            .await;
        self.invalidate(workspace);
        if let Err(e) = &result {
            tracing::error!(workspace, error = %e, "token refresh failed; Slack is unavailable for this workspace until it works");
        }
        result
    }

    /// The stored token, if it is no longer `stale` and not about to expire.
    async fn fresher_than(
        &self,
        stale: &WorkspaceToken,
    ) -> Result<Option<WorkspaceToken>, TokenError> {
        let current = self.read(&stale.workspace).await?;
        Ok(current.filter(|t| {
            t.access_token != stale.access_token
                && t.expires_at
                    .is_none_or(|at| at - chrono::Utc::now().timestamp() >= REFRESH_AHEAD_SECS)
        }))
    }
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
    if record.access_token.trim().is_empty() {
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
        Ok(removed > 0)
    }
}
