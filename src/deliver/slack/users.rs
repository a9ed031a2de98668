//! Cache of `users.lookupByEmail` answers in Redis, shared by replicas: an email's Slack user id rarely changes.

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

/// How long an email → user id answer is reused.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Email → Slack user id, per workspace.
#[derive(Clone)]
pub struct UserDirectory {
    redis: ConnectionManager,
    key_prefix: String,
    ttl: Duration,
}

impl UserDirectory {
    pub fn new(redis: ConnectionManager, key_prefix: &str, ttl: Duration) -> UserDirectory {
        UserDirectory {
            redis,
            key_prefix: key_prefix.to_string(),
            ttl,
        }
    }

    fn key(&self, workspace: &str, email: &str) -> String {
        format!(
            "{}:slack:user-by-email:{workspace}:{}",
            self.key_prefix,
            email.trim().to_lowercase()
        )
    }

    /// The cached user id; a Redis error counts as a miss (Slack is asked instead).
    pub async fn get(&self, workspace: &str, email: &str) -> Option<String> {
        let mut redis = self.redis.clone();
        redis.get(self.key(workspace, email)).await.ok().flatten()
    }

    /// Remembers an answer; failing to is harmless.
    pub async fn put(&self, workspace: &str, email: &str, user_id: &str) {
        let mut redis = self.redis.clone();
        let _: Result<(), _> = redis
            .set_ex(
                self.key(workspace, email),
                user_id,
                self.ttl.as_secs().max(1),
            )
            .await;
    }
}
