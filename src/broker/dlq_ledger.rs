//! The dead-letter ledger: when each dead letter entered the queue, kept in
//! Redis, so every replica reports the oldest one's age without reading a
//! message.
//!
//! Reading the queue's head for its timestamp is not an option: RabbitMQ
//! 3.10's quorum queues put a message handed back with `basic.nack(requeue)`
//! at the tail, and RabbitMQ 4.x counts every return as a delivery towards
//! the queue's delivery limit, so a periodic peek would reorder the dead
//! letters or, in the end, drop them.
//!
//! So the ledger is a sorted set of entries scored by Redis' clock:
//! - the worker adds one once the broker has confirmed a dead letter, and
//!   puts the entry's id in the message's `x-alert-router-ledger-entry`
//!   header;
//! - `alert-router dlq replay` removes the entries of what it replayed, and
//!   `dlq purge` everything recorded before the purge;
//! - every poll compares the ledger with the queue's depth. A mismatch that
//!   outlasts [`settle_time`] is corrected as a FIFO queue implies: entries
//!   beyond the depth are the oldest ones, taken by some other tool; messages
//!   without an entry (the broker's own dead-lettering after the delivery
//!   limit, a lost write) are dated when first noticed; entries left when the
//!   queue reads empty are dropped. Waiting out the settle time keeps a
//!   dead letter between its confirm and its entry, or a `dlq list` holding
//!   messages for a moment, from being "corrected".
//!
//! The oldest entry is then the head of the queue, and its age is the same
//! on every replica.

use std::time::Duration;

use redis::aio::ConnectionManager;

/// The header carrying a dead letter's ledger entry id.
pub const HEADER_LEDGER_ENTRY: &str = "x-alert-router-ledger-entry";

/// Most entries one correction adds for messages the ledger never saw (a
/// queue that predates the ledger, say): bounds one script's run time.
const MAX_ADDED_PER_CORRECTION: u32 = 100_000;

const RECORD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
"#;

/// KEYS: ledger, pending mismatch. ARGV: depth, settle ms, max added.
/// Returns {now ms, oldest entry's score ms or -1}.
const RECONCILE: &str = r#"
local ledger, pending = KEYS[1], KEYS[2]
local depth = tonumber(ARGV[1])
local settle = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local card = redis.call('ZCARD', ledger)
local kind, size = 'none', 0
if depth == 0 then
  if card > 0 then kind, size = 'empty', card end
elseif card > depth then kind, size = 'excess', card - depth
elseif card < depth then kind, size = 'deficit', depth - card
end
if kind == 'none' then
  redis.call('DEL', pending)
else
  local seen = redis.call('HMGET', pending, 'kind', 'since', 'size')
  if seen[1] ~= kind then
    redis.call('HSET', pending, 'kind', kind, 'since', now, 'size', size)
    redis.call('PEXPIRE', pending, settle * 4 + 60000)
  elseif now - tonumber(seen[2]) >= settle then
    local since = tonumber(seen[2])
    local n = math.min(size, tonumber(seen[3]))
    if kind == 'empty' then
      redis.call('ZREMRANGEBYSCORE', ledger, '-inf', '(' .. since)
    elseif kind == 'excess' then
      redis.call('ZREMRANGEBYRANK', ledger, 0, n - 1)
    else
      n = math.min(n, tonumber(ARGV[3]))
      local batch = {}
      for i = 1, n do
        batch[#batch + 1] = since
        batch[#batch + 1] = 'untracked:' .. since .. ':' .. i
        if #batch >= 1000 or i == n then
          redis.call('ZADD', ledger, unpack(batch))
          batch = {}
        end
      end
    end
    redis.call('DEL', pending)
  elseif size < tonumber(seen[3]) then
    redis.call('HSET', pending, 'size', size)
  end
end
if depth == 0 then return {now, -1} end
local head = redis.call('ZRANGE', ledger, 0, 0, 'WITHSCORES')
if head[2] == nil then return {now, -1} end
return {now, tonumber(head[2])}
"#;

/// How long a mismatch between the ledger and the queue must last before a
/// poll corrects it: longer than a dead letter can sit between the broker
/// taking it and its confirm (`amqp.confirm_timeout`), and than two polls.
pub fn settle_time(confirm_timeout: Duration, poll_interval: Duration) -> Duration {
    (confirm_timeout * 2).max(poll_interval * 2)
}

/// One dead-letter queue's ledger.
#[derive(Clone)]
pub struct DeadLetterLedger {
    redis: ConnectionManager,
    key: String,
    pending_key: String,
    record: redis::Script,
    reconcile: redis::Script,
}

impl DeadLetterLedger {
    pub fn new(redis: ConnectionManager, key_prefix: &str, queue: &str) -> DeadLetterLedger {
        let key = format!("{key_prefix}:dead-letters:{queue}");
        DeadLetterLedger {
            redis,
            pending_key: format!("{key}:mismatch"),
            key,
            record: redis::Script::new(RECORD),
            reconcile: redis::Script::new(RECONCILE),
        }
    }

    /// A fresh entry id, to put in the dead letter's header before it is published.
    pub fn new_entry_id() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Records a dead letter the broker has confirmed, dated by Redis'
    /// clock; returns that date (Unix milliseconds).
    pub async fn record(&self, entry: &str) -> Result<u64, redis::RedisError> {
        let mut redis = self.redis.clone();
        self.record
            .key(&self.key)
            .arg(entry)
            .invoke_async(&mut redis)
            .await
    }

    /// Forgets the entries of dead letters that left the queue (replayed).
    pub async fn forget(&self, entries: &[String]) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        for chunk in entries.chunks(1000) {
            redis::cmd("ZREM")
                .arg(&self.key)
                .arg(chunk)
                .query_async::<()>(&mut redis)
                .await?;
        }
        Ok(())
    }

    /// Redis' clock in milliseconds: taken before a purge, so that
    /// [`DeadLetterLedger::forget_before`] keeps what arrived during it.
    pub async fn now_ms(&self) -> Result<u64, redis::RedisError> {
        let mut redis = self.redis.clone();
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis).await?;
        Ok(seconds * 1000 + micros / 1000)
    }

    /// Forgets every entry recorded before `ms` (after a purge).
    pub async fn forget_before(&self, ms: u64) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        redis::cmd("ZREMRANGEBYSCORE")
            .arg(&self.key)
            .arg("-inf")
            .arg(format!("({ms}"))
            .query_async::<()>(&mut redis)
            .await
    }

    /// Squares the ledger with the queue's `depth` (see the module doc) and
    /// returns the oldest dead letter's age: zero for an empty queue, `None`
    /// when the ledger knows none of the messages yet.
    pub async fn oldest_age(
        &self,
        depth: u32,
        settle: Duration,
    ) -> Result<Option<Duration>, redis::RedisError> {
        let head = self.head(depth, settle).await?;
        Ok(if depth == 0 {
            Some(Duration::ZERO)
        } else {
            head.oldest_ms
                .map(|oldest| Duration::from_millis(head.now_ms.saturating_sub(oldest)))
        })
    }

    /// As [`DeadLetterLedger::oldest_age`], with the dates themselves.
    pub async fn head(&self, depth: u32, settle: Duration) -> Result<Head, redis::RedisError> {
        let mut redis = self.redis.clone();
        let (now, oldest): (i64, i64) = self
            .reconcile
            .key(&self.key)
            .key(&self.pending_key)
            .arg(depth)
            .arg(u64::try_from(settle.as_millis()).unwrap_or(u64::MAX))
            .arg(MAX_ADDED_PER_CORRECTION)
            .invoke_async(&mut redis)
            .await?;
        Ok(Head {
            now_ms: u64::try_from(now).unwrap_or(0),
            oldest_ms: u64::try_from(oldest).ok(),
        })
    }
}

/// What one poll of the ledger found, in Unix milliseconds by Redis' clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub now_ms: u64,
    /// The entry taken as the queue's head; `None` for an empty queue or
    /// when the ledger knows none of its messages.
    pub oldest_ms: Option<u64>,
}
