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
}

impl TokenError {
    /// Redis trouble passes; a malformed record needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, TokenError::Redis { .. })
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
}

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
        }
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
            }));
        };
        if let Ok(cache) = self.cache.lock()
            && let Some((at, token)) = cache.get(workspace)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(token.clone());
        }
        let token = self.read(workspace).await?;
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
