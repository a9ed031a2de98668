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

impl ClaimTicket {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn value(&self) -> &str {
        &self.value
    }
}

/// Idempotency records in Redis.
#[derive(Clone)]
pub struct Idempotency {
    redis: ConnectionManager,
    key_prefix: String,
    done_ttl: Duration,
    lease: Duration,
    /// Built once: a script hashes its source when created.
    scripts: Scripts,
}

#[derive(Clone)]
struct Scripts {
    claim: redis::Script,
    extend: redis::Script,
    release: redis::Script,
}

const DONE: &str = "done";

/// The claim, as a Lua function other scripts can start with (the rate
/// limiter takes the claim and the first slot in one round trip): 0 when the
/// claim is ours, -1 when the record says done, -2 when another holds it.
pub(super) fn claim_lua() -> String {
    format!(
        "local function claim(key, value, lease_ms)
  if redis.call('SET', key, value, 'NX', 'PX', lease_ms) then return 0 end
  if redis.call('GET', key) == '{DONE}' then return -1 end
  return -2
end
"
    )
}

impl Claim {
    /// What [`claim_lua`]'s `claim` answered.
    pub(super) fn from_script(answer: i64, ticket: ClaimTicket) -> Claim {
        match answer {
            0 => Claim::Acquired(ticket),
            -1 => Claim::AlreadyDone,
            _ => Claim::HeldElsewhere,
        }
    }
}

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
            scripts: Scripts {
                // One round trip whether or not the claim is free.
                claim: redis::Script::new(&format!(
                    "{}return claim(KEYS[1], ARGV[1], ARGV[2])",
                    claim_lua()
                )),
                extend: redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
                ),
                release: redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
                ),
            },
        }
    }

    /// The Redis key for one event and target.
    pub fn key(&self, event_id: &str, target_key: &str) -> String {
        format!("{}:sent:{}:{}", self.key_prefix, event_id, target_key)
    }

    /// A claim on one event and target, not yet taken: take it with
    /// [`Idempotency::claim`] or together with a rate-limit slot
    /// ([`super::limit::RateLimiter::claim_and_acquire`]).
    pub fn ticket(&self, event_id: &str, target_key: &str) -> ClaimTicket {
        ClaimTicket {
            key: self.key(event_id, target_key),
            value: claim_value(),
            taken_at: std::time::Instant::now(),
        }
    }

    /// The lease in whole milliseconds, as the claim scripts take it.
    pub fn lease_ms(&self) -> u64 {
        millis(self.lease)
    }

    pub async fn claim(
        &self,
        event_id: &str,
        target_key: &str,
    ) -> Result<Claim, redis::RedisError> {
        let ticket = self.ticket(event_id, target_key);
        let mut redis = self.redis.clone();
        let answer: i64 = self
            .scripts
            .claim
            .key(&ticket.key)
            .arg(&ticket.value)
            .arg(millis(self.lease))
            .invoke_async(&mut redis)
            .await?;
        Ok(Claim::from_script(answer, ticket))
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
        let mut redis = self.redis.clone();
        self.scripts
            .extend
            .key(&ticket.key)
            .arg(&ticket.value)
            .arg(millis(self.lease))
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }

    /// Gives the claim back (only if still ours), so a later attempt may send.
    pub async fn release(&self, ticket: &ClaimTicket) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        self.scripts
            .release
            .key(&ticket.key)
            .arg(&ticket.value)
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }
}

/// A value no other claim holds: this process's random id and a counter
/// (a fresh UUID per claim cost a `getrandom` call per post).
fn claim_value() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PROCESS: OnceLock<uuid::Uuid> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(uuid::Uuid::new_v4);
    format!(
        "claim:{}:{}",
        process.simple(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
