//! "At most once to a person": a Redis record per (event id, target), claimed before sending.
//!
//! A claim is a short lease (`SET NX PX`) so two replicas handling copies of
//! one event never both send; a successful send turns it into a long-lived
//! `done` record; a failed send releases it so a retry may try again.

use std::time::Duration;

use redis::aio::ConnectionManager;

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours to send; pass it back to [`Idempotency::complete`] or [`Idempotency::release`].
    Acquired(ClaimTicket),
    /// This target already got this event.
    AlreadyDone,
    /// Another worker is sending it right now.
    HeldElsewhere,
}

/// Proof of a claim: the key and the random value only its holder knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimTicket {
    key: String,
    value: String,
    /// When the claim was taken: a fresh claim needs no renewal.
    taken_at: std::time::Instant,
}

/// Idempotency records in Redis.
#[derive(Clone)]
pub struct Idempotency {
    redis: ConnectionManager,
    key_prefix: String,
    done_ttl: Duration,
    lease: Duration,
}

const DONE: &str = "done";

impl Idempotency {
    /// `lease` must outlast one send with its retries, so it is not stolen mid-send.
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        done_ttl: Duration,
        lease: Duration,
    ) -> Idempotency {
        Idempotency {
            redis,
            key_prefix: key_prefix.to_string(),
            done_ttl,
            lease,
        }
    }

    /// The Redis key for one event and target.
    pub fn key(&self, event_id: &str, target_key: &str) -> String {
        format!("{}:sent:{}:{}", self.key_prefix, event_id, target_key)
    }

    pub async fn claim(
        &self,
        event_id: &str,
        target_key: &str,
    ) -> Result<Claim, redis::RedisError> {
        let key = self.key(event_id, target_key);
        let value = format!("claim:{}", uuid::Uuid::new_v4());
        let mut redis = self.redis.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lease))
            .query_async(&mut redis)
            .await?;
        if set.is_some() {
            return Ok(Claim::Acquired(ClaimTicket {
                key,
                value,
                taken_at: std::time::Instant::now(),
            }));
        }
        let current: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await?;
        Ok(match current.as_deref() {
            Some(DONE) => Claim::AlreadyDone,
            _ => Claim::HeldElsewhere,
        })
    }

    /// Records the send as done for the configured retention.
    pub async fn complete(&self, ticket: &ClaimTicket) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        redis::cmd("SET")
            .arg(&ticket.key)
            .arg(DONE)
            .arg("PX")
            .arg(millis(self.done_ttl))
            .query_async::<()>(&mut redis)
            .await
    }

    /// Renews the lease of a claim that is still ours, before a step that may take long.
    pub async fn extend(&self, ticket: &ClaimTicket) -> Result<(), redis::RedisError> {
        // The lease covers one whole send plus 2 s, so a step that starts
        // within a second of the claim cannot outlive it: skip the round trip.
        if ticket.taken_at.elapsed() < std::time::Duration::from_secs(1) {
            return Ok(());
        }
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
        );
        let mut redis = self.redis.clone();
        script
            .key(&ticket.key)
            .arg(&ticket.value)
            .arg(millis(self.lease))
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }

    /// Gives the claim back (only if still ours), so a later attempt may send.
    pub async fn release(&self, ticket: &ClaimTicket) -> Result<(), redis::RedisError> {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        );
        let mut redis = self.redis.clone();
        script
            .key(&ticket.key)
            .arg(&ticket.value)
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
