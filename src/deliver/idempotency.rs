//! "At most once to a person": a Redis record per (event id, target), claimed before sending.
//!
//! A claim is a short lease (`SET NX PX`, `delivery.claim_lease`) renewed by
//! its holder while it sends, so two replicas handling copies of one event
//! never both send, and a crashed holder's claim frees within seconds. A
//! successful send turns it into a long-lived `done` record; a send that
//! certainly did not happen releases it so a retry may try again.
//!
//! Beside each claim sits an *attempt marker*: set with the claim, removed
//! when the outcome is recorded (done, or released after a send that did not
//! happen). A claim taken while a marker remains means an earlier holder
//! vanished between claiming and recording, possibly after Slack accepted
//! its post: [`Claim::AcquiredAfterCrash`] tells the caller to look for that
//! post before sending again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours to send; pass it back to [`Idempotency::complete`] or [`Idempotency::release`].
    Acquired(ClaimTicket),
    /// Ours, but an earlier holder claimed it at `since_ms` (Unix
    /// milliseconds, Redis's clock) and never recorded how it ended: its send
    /// may have landed, in the target's own channel or, when the holder had
    /// rerouted it, in `rerouted_to`.
    AcquiredAfterCrash {
        ticket: ClaimTicket,
        since_ms: u64,
        rerouted_to: Option<String>,
    },
    /// This target already got this event.
    AlreadyDone,
    /// Another live worker is sending it; its lease runs `remaining` more
    /// (it renews the lease while it works).
    HeldElsewhere { remaining: Duration },
}

/// Proof of a claim: the key and the random value only its holder knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimTicket {
    key: String,
    /// The attempt marker beside the claim.
    marker: String,
    value: String,
}

impl ClaimTicket {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn marker(&self) -> &str {
        &self.marker
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
    /// Claims held by this process, renewed by one task.
    renewals: Arc<Renewals>,
    /// Keys of email targets hold the address; this is how logs show it.
    addresses: crate::redact::Addresses,
}

#[derive(Clone)]
struct Scripts {
    claim: redis::Script,
    extend: redis::Script,
    release: redis::Script,
    note_reroute: redis::Script,
}

const DONE: &str = "done";
/// How long an orphaned attempt marker is kept: longer than the longest
/// broker retry delay, so the redelivery that follows a crash still sees it.
const MARKER_TTL: Duration = Duration::from_secs(24 * 3600);

/// The claim, as a Lua function other scripts can start with (the rate
/// limiter takes the claim and the first slot in one round trip). Answers
/// three values (not a table: one allocation fewer in Redis's Lua):
/// `0, 0, ''` the claim is ours; `1, since, where` ours, but an earlier
/// holder's attempt marker from `since` remains (and `where` names the
/// channel it had rerouted to, if it had); `-1, 0, ''` the record says done;
/// `-2, pttl, ''` another holder's lease runs `pttl` more. The marker holds
/// `<since>` or `<since>:<channel>`; `now_s` is the caller's `now_ms()` as
/// a string ([`NOW_MS_LUA`] says why), asked once per script.
pub(super) fn claim_lua() -> String {
    format!(
        "{NOW_MS_LUA}local function claim(key, marker, value, lease_ms, now_s)
  if redis.call('SET', key, value, 'NX', 'PX', lease_ms) then
    -- Our marker goes in unless an earlier one is there: one call in the
    -- usual case (no earlier attempt), a second only to read an earlier one.
    if redis.call('SET', marker, now_s, 'NX', 'PX', '{marker_ttl}') then
      return 0, 0, ''
    end
    local earlier = redis.call('GET', marker) or ''
    local since, where = string.match(earlier, '^(%d+):?(.*)$')
    return 1, tonumber(since) or 0, where or ''
  end
  if redis.call('GET', key) == '{DONE}' then return -1, 0, '' end
  return -2, math.max(redis.call('PTTL', key), 0), ''
end
",
        marker_ttl = MARKER_TTL.as_millis()
    )
}

/// Redis's clock in milliseconds, as a number and as the string scripts
/// write. Lua work is most of what a script costs Redis: every string
/// converted to a number (`tonumber`, a `strtod`) and every number written
/// out through `redis.call` or `..` (an `snprintf` of a double) costs one
/// to two thousand instructions, so scripts convert each once, and write
/// integers with `%d`.
pub(super) const NOW_MS_LUA: &str = "local function now_ms()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return now, string.format('%d', now)
end
";

/// Notes on the attempt marker where the post is about to go instead of
/// the target's own channel, keeping when the attempt started.
const NOTE_REROUTE: &str = "local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local since = string.match(v, '^(%d+)')
redis.call('SET', KEYS[1], since .. ':' .. ARGV[1], 'KEEPTTL')
return 1";

impl Claim {
    /// What [`claim_lua`]'s `claim` answered.
    pub(super) fn from_script(
        (code, ms, rerouted_to): (i64, i64, String),
        ticket: ClaimTicket,
    ) -> Claim {
        let ms = ms.max(0).unsigned_abs();
        match code {
            0 => Claim::Acquired(ticket),
            1 => Claim::AcquiredAfterCrash {
                ticket,
                since_ms: ms,
                rerouted_to: (!rerouted_to.is_empty()).then_some(rerouted_to),
            },
            -1 => Claim::AlreadyDone,
            _ => Claim::HeldElsewhere {
                remaining: Duration::from_millis(ms),
            },
        }
    }
}

impl Idempotency {
    /// `lease` is renewed every third of itself while a send runs
    /// ([`Idempotency::keep_alive`]), so it only has to outlast a pause of
    /// the holder; a crashed holder's claim frees after it.
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
            addresses: crate::redact::Addresses::default(),
            renewals: Arc::default(),
            scripts: Scripts {
                // One round trip whether or not the claim is free.
                claim: redis::Script::new(&format!(
                    "{}local _, now_s = now_ms()\nreturn {{claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], now_s)}}",
                    claim_lua()
                )),
                extend: redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
                ),
                // ARGV[2] = 1 keeps the attempt marker: the send may have landed.
                note_reroute: redis::Script::new(NOTE_REROUTE),
                release: redis::Script::new(
                    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '1' then redis.call('DEL', KEYS[2]) end
return 1",
                ),
            },
        }
    }

    /// The Redis key for one event and target.
    pub fn key(&self, event_id: &str, target_key: &str) -> String {
        [&self.key_prefix, ":sent:", event_id, ":", target_key].concat()
    }

    /// A claim on one event and target, not yet taken: take it with
    /// [`Idempotency::claim`] or together with a rate-limit slot
    /// ([`super::limit::RateLimiter::claim_and_acquire`]).
    pub fn ticket(&self, event_id: &str, target_key: &str) -> ClaimTicket {
        let key = self.key(event_id, target_key);
        ClaimTicket {
            marker: [&key, ":attempt"].concat(),
            key,
            value: claim_value(),
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
        let answer: (i64, i64, String) = self
            .scripts
            .claim
            .key(&ticket.key)
            .key(&ticket.marker)
            .arg(&ticket.value)
            .arg(millis(self.lease))
            .invoke_async(&mut redis)
            .await?;
        Ok(Claim::from_script(answer, ticket))
    }

    /// Records the send as done for the configured retention.
    pub async fn complete(&self, ticket: &ClaimTicket) -> Result<(), redis::RedisError> {
        self.complete_and(ticket, &[]).await
    }

    /// [`Idempotency::complete`], with `also` (what else the send changed,
    /// such as where an incident's first message landed) in the same round trip.
    pub async fn complete_and(
        &self,
        ticket: &ClaimTicket,
        also: &[redis::Cmd],
    ) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        // Not atomic, and need not be: a marker outliving its `done` record
        // is never read (the claim finds the record first).
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&ticket.key)
            .arg(DONE)
            .arg("PX")
            .arg(millis(self.done_ttl))
            .ignore()
            .del(&ticket.marker)
            .ignore();
        for cmd in also {
            pipe.add_command(cmd.clone()).ignore();
        }
        pipe.query_async::<()>(&mut redis).await
    }

    /// Records on the claim's attempt marker that the post now goes to
    /// `channel` (the default channel standing in for the target's), so a
    /// worker taking over after a crash looks for it there.
    pub async fn note_reroute(
        &self,
        ticket: &ClaimTicket,
        channel: &str,
    ) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        self.scripts
            .note_reroute
            .key(&ticket.marker)
            .arg(channel)
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }

    /// Renews the lease of a claim that is still ours; false if it is not.
    pub async fn extend(&self, ticket: &ClaimTicket) -> Result<bool, redis::RedisError> {
        let mut redis = self.redis.clone();
        self.scripts
            .extend
            .key(&ticket.key)
            .arg(&ticket.value)
            .arg(millis(self.lease))
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|renewed| renewed == 1)
    }

    /// Shows addresses in log lines as `log.show_addresses` says (redacted by default).
    pub fn with_addresses(mut self, addresses: crate::redact::Addresses) -> Idempotency {
        self.addresses = addresses;
        self
    }

    /// Renews the claim every third of its lease until the returned guard
    /// is dropped: the holder keeps it however long the send takes, and a
    /// holder that dies stops renewing. One task per process renews every
    /// claim held longer than a third of the lease; most posts finish long
    /// before that, so holding a claim costs a map entry, not a task.
    pub fn keep_alive(&self, ticket: &ClaimTicket) -> LeaseKeeper {
        let id = self.renewals.next_id.fetch_add(1, Ordering::Relaxed);
        self.renewals.lock().insert(
            id,
            Held {
                ticket: ticket.clone(),
                since: tokio::time::Instant::now(),
            },
        );
        self.renewals.started.get_or_init(|| {
            tokio::spawn(renew_held_claims(
                self.clone_for_renewals(),
                Arc::downgrade(&self.renewals),
            ));
        });
        LeaseKeeper {
            renewals: Arc::clone(&self.renewals),
            id,
        }
    }

    /// A copy for the renewal task that does not keep the claims it renews alive.
    fn clone_for_renewals(&self) -> Idempotency {
        Idempotency {
            renewals: Arc::default(),
            ..self.clone()
        }
    }

    /// Gives the claim back (only if still ours), so a later attempt may
    /// send. `may_have_sent`: the send failed in a way that may still have
    /// delivered it (a timeout, a 5xx), so the attempt marker stays and the
    /// next holder looks for the message first.
    pub async fn release(
        &self,
        ticket: &ClaimTicket,
        may_have_sent: bool,
    ) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        self.scripts
            .release
            .key(&ticket.key)
            .key(&ticket.marker)
            .arg(&ticket.value)
            .arg(if may_have_sent { "1" } else { "0" })
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }
}

/// Keeps a claim renewed while it lives (see [`Idempotency::keep_alive`]).
pub struct LeaseKeeper {
    renewals: Arc<Renewals>,
    id: u64,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.renewals.lock().remove(&self.id);
    }
}

/// The claims this process holds, shared by every clone of an [`Idempotency`].
#[derive(Default)]
struct Renewals {
    held: Mutex<HashMap<u64, Held>>,
    next_id: AtomicU64,
    /// The renewal task is started with the first claim held.
    started: OnceLock<()>,
}

struct Held {
    ticket: ClaimTicket,
    since: tokio::time::Instant,
}

impl Renewals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every third of the lease, renews each claim held at least that long,
/// until the last [`Idempotency`] holding `renewals` is gone.
async fn renew_held_claims(idempotency: Idempotency, renewals: Weak<Renewals>) {
    let every = (idempotency.lease / 3).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(renewals) = renewals.upgrade() else {
            return;
        };
        let due: Vec<(u64, ClaimTicket)> = renewals
            .lock()
            .iter()
            .filter(|(_, held)| held.since.elapsed() >= every)
            .map(|(id, held)| (*id, held.ticket.clone()))
            .collect();
        for (id, ticket) in due {
            match idempotency.extend(&ticket).await {
                Ok(true) => {}
                Ok(false) => {
                    // Once lost, renewing it again cannot help.
                    if renewals.lock().remove(&id).is_some() {
                        tracing::warn!(
                            key = %idempotency.addresses.text(&ticket.key),
                            "lost an idempotency claim while sending (the worker stalled longer than delivery.claim_lease); another worker may send it too"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew an idempotency claim"),
            }
        }
    }
}

/// A value no other claim holds: this process's random id and a counter
/// (a fresh UUID per claim cost a `getrandom` call per post).
fn claim_value() -> String {
    static PROCESS: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| format!("claim:{}:", uuid::Uuid::new_v4().simple()));
    let mut value = process.clone();
    value.push_str(&NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    value
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
