//! Cache of `users.lookupByEmail` answers: in Redis, shared by replicas (an email's Slack user id rarely changes), with a small bounded layer in process.

use std::time::Duration;

use moka::sync::Cache;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

/// How long an email → user id answer is reused.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long "no Slack user has this email" is reused: a flood of events for
/// an unknown address must not spend the workspace's Tier 3 lookup budget,
/// and a person who joins Slack is found within minutes.
pub const NO_USER_TTL: Duration = Duration::from_secs(5 * 60);

/// How long this process reuses an answer before reading Redis again.
const LOCAL_TTL: Duration = Duration::from_secs(60);

/// Stored in Redis for an address no Slack user has (not a user id's shape).
const NO_USER: &str = "!none";

/// What is known of an address in one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    User(String),
    /// Slack answered `users_not_found` a short while ago.
    NoUser,
}

/// Email → Slack user id, per workspace.
#[derive(Clone)]
pub struct UserDirectory {
    redis: ConnectionManager,
    key_prefix: String,
    ttl: Duration,
    /// Bounded: producers choose the addresses events name.
    local: Cache<String, Known>,
}

impl UserDirectory {
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        ttl: Duration,
        capacity: u64,
    ) -> UserDirectory {
        UserDirectory {
            redis,
            key_prefix: key_prefix.to_string(),
            ttl,
            local: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(LOCAL_TTL.min(ttl))
                .build(),
        }
    }

    fn key(&self, workspace: &str, email: &str) -> String {
        format!(
            "{}:slack:user-by-email:{workspace}:{}",
            self.key_prefix,
            email.trim().to_lowercase()
        )
    }

    /// What is cached for the address; a Redis error counts as a miss (Slack is asked instead).
    pub async fn get(&self, workspace: &str, email: &str) -> Option<Known> {
        let key = self.key(workspace, email);
        if let Some(known) = self.local.get(&key) {
            return Some(known);
        }
        let mut redis = self.redis.clone();
        let stored: Option<String> = redis.get(&key).await.ok().flatten();
        let known = match stored?.as_str() {
            NO_USER => Known::NoUser,
            "" => return None,
            user => Known::User(user.to_string()),
        };
        self.local.insert(key, known.clone());
        Some(known)
    }

    /// Remembers an answer; failing to is harmless.
    pub async fn put(&self, workspace: &str, email: &str, known: Known) {
        let key = self.key(workspace, email);
        let (value, ttl) = match &known {
            Known::User(user) => (user.as_str(), self.ttl),
            Known::NoUser => (NO_USER, NO_USER_TTL.min(self.ttl)),
        };
        let mut redis = self.redis.clone();
        let _: Result<(), _> = redis.set_ex(&key, value, ttl.as_secs().max(1)).await;
        self.local.insert(key, known);
    }
}
