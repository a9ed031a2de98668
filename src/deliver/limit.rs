//! Slack rate limits shared by every replica: GCRA buckets per channel and per workspace, in Redis.
//!
//! A per-process limiter (such as `governor`) cannot keep three replicas under
//! one channel's one-message-a-second limit, so the state lives in Redis and
//! one Lua script checks both buckets (and any `Retry-After` pause) and takes
//! a slot from both atomically, on Redis's clock. A 429's `Retry-After` is
//! written as a pause that every replica honours.

use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::Value;

use super::slack::{SlackError, SlackFailure, honoured_retry_after};

use super::idempotency::{Claim, ClaimTicket, claim_lua};
use crate::config::SlackSettings;

/// Sending slightly under the configured rate keeps network jitter (two posts
/// granted 1 s apart arriving 995 ms apart) from tripping Slack's own limiter.
const SAFETY_MARGIN: f64 = 0.95;
/// The last post of a burst goes this much later than the first. Slack counts
/// from when posts *arrive*: a burst's first post that reaches Slack late (a
/// new connection, a busy process) makes the post one interval after the
/// burst look early, and the 5 % margin alone covers only 50 ms of that.
const BURST_JITTER_ALLOWANCE_MS: u64 = 250;

/// Checks both buckets and the pause; takes a slot from both only if all allow.
/// Both buckets of a post and the channel's pause, as a Lua function other
/// scripts start with ([`super::incident`] takes the incident record, the
/// claim and the first slot in one call). `take_slot` answers 0 when a slot
/// was taken, else the milliseconds to wait before asking again.
pub(super) const TAKE_SLOT_LUA: &str = r#"
local function take_slot(now, rate_key, workspace_key, pause_key, c_interval, c_tolerance, w_interval, w_tolerance)
  local state = redis.call('MGET', rate_key, workspace_key, pause_key)
  -- A missing key reads as now; only what is there is converted (each
  -- conversion is a strtod; see NOW_MS_LUA).
  if state[3] then
    local paused_until = tonumber(state[3])
    if paused_until > now then return paused_until - now end
  end
  local c_tat = state[1] and math.max(tonumber(state[1]), now) or now
  local w_tat = state[2] and math.max(tonumber(state[2]), now) or now
  c_tolerance, w_tolerance = tonumber(c_tolerance), tonumber(w_tolerance)
  local wait = math.max(c_tat - c_tolerance - now, w_tat - w_tolerance - now)
  if wait > 0 then return wait end
  c_tat, w_tat = c_tat + tonumber(c_interval), w_tat + tonumber(w_interval)
  redis.call('SET', rate_key, string.format('%d', c_tat), 'PX', string.format('%d', c_tat - now + c_tolerance + 1000))
  redis.call('SET', workspace_key, string.format('%d', w_tat), 'PX', string.format('%d', w_tat - now + w_tolerance + 1000))
  return 0
end
"#;

/// Answers `{claim, claim_ms, wait, where}`: `wait` is 0 when granted, else
/// the milliseconds to wait before asking again; `claim`, `claim_ms` and
/// `where` are the claim's answer (`{0, 0, ''}` without a claim).
///
/// With a fourth and fifth key it first claims that idempotency record
/// (and its attempt marker; [`claim_lua`]; ARGV[5] the claim's value, ARGV[6]
/// its lease), so the first attempt of a post costs one round trip instead
/// of two. A negative `claim` is the claim's whole answer (done, or held
/// elsewhere); otherwise the claim is ours, whatever the buckets say.
const GCRA: &str = r#"
local code, ms, where = 0, 0, ''
local now, now_s = now_ms()
if KEYS[4] then
  code, ms, where = claim(KEYS[4], KEYS[5], ARGV[5], ARGV[6], now_s)
  if code < 0 then return {code, ms, 0, where} end
end
local wait = take_slot(now, KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return {code, ms, wait, where}
"#;

/// One bucket and its pause, for the per-workspace limits of the Web API's
/// tiers. Answers 0 when a slot was taken, else the milliseconds to wait.
const METHOD_GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused_until > now then return paused_until - now end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - tolerance > now then return tat - tolerance - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now + tolerance + 1000)
return 0
"#;

/// Slack's per-workspace limit of a Web API method other than
/// `chat.postMessage`, by its documented tier: Tier 2 is "20+ per minute",
/// Tier 3 "50+ per minute", both with occasional bursts.
fn tier_of(method: &str) -> Option<Bucket> {
    match method {
        "conversations.list" => Some(Bucket::new(20.0 / 60.0, 4)),
        "users.lookupByEmail"
        | "conversations.join"
        | "conversations.open"
        | "conversations.history"
        | "conversations.replies"
        | "chat.update" => Some(Bucket::new(50.0 / 60.0, 10)),
        _ => None,
    }
}

/// Records a `Retry-After` pause, never shortening a longer one.
const PAUSE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 0
"#;

/// One GCRA bucket: a slot every `interval`, up to `burst` at once.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    interval_ms: u64,
    tolerance_ms: u64,
}

impl Bucket {
    fn new(per_second: f64, burst: u32) -> Bucket {
        let interval_ms = (1000.0 / (per_second * SAFETY_MARGIN)).ceil().max(1.0) as u64;
        let burst_span = interval_ms * u64::from(burst.max(1) - 1);
        Bucket {
            interval_ms,
            tolerance_ms: burst_span.saturating_sub(BURST_JITTER_ALLOWANCE_MS.min(burst_span / 2)),
        }
    }
}

/// Whether a post attempt still has to ask for a rate-limit slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Ask,
    /// Taken together with the claim.
    Taken,
    /// Asked together with the claim: none free for this long.
    WaitFor(Duration),
}

/// A post's slot, to be taken by another script: its channel bucket,
/// workspace bucket and pause keys, and both buckets' interval and tolerance (ms).
pub struct SlotRequest {
    pub keys: [String; 3],
    pub args: [u64; 4],
}

/// Shared rate limits for `chat.postMessage`.
#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    key_prefix: String,
    channel: Bucket,
    channel_burst: u32,
    workspace: Bucket,
    gcra: redis::Script,
    method_gcra: redis::Script,
    pause: redis::Script,
}

impl RateLimiter {
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        settings: &SlackSettings,
    ) -> RateLimiter {
        RateLimiter {
            redis,
            key_prefix: key_prefix.to_string(),
            channel: Bucket::new(settings.channel_rate_per_second, settings.channel_burst),
            channel_burst: settings.channel_burst.max(1),
            workspace: Bucket::new(
                f64::from(settings.workspace_rate_per_minute) / 60.0,
                settings.workspace_burst,
            ),
            gcra: redis::Script::new(&format!("{}{TAKE_SLOT_LUA}{GCRA}", claim_lua())),
            method_gcra: redis::Script::new(METHOD_GCRA),
            pause: redis::Script::new(PAUSE),
        }
    }

    /// The time between two posts to one channel once its burst is spent.
    pub fn channel_interval(&self) -> Duration {
        Duration::from_millis(self.channel.interval_ms)
    }

    /// How many posts to one channel may go out at once.
    pub fn channel_burst(&self) -> u32 {
        self.channel_burst
    }

    /// Takes a slot to post to `channel`, or says how long to wait before asking again.
    pub async fn try_acquire(
        &self,
        workspace: &str,
        channel: &str,
    ) -> Result<Option<Duration>, redis::RedisError> {
        let mut redis = self.redis.clone();
        let (_, _, wait_ms, _): (i64, i64, u64, String) = self
            .gcra
            .key(self.key(workspace, Some(channel), "rate"))
            .key(self.key(workspace, None, "rate"))
            .key(self.key(workspace, Some(channel), "pause"))
            .arg(self.channel.interval_ms)
            .arg(self.channel.tolerance_ms)
            .arg(self.workspace.interval_ms)
            .arg(self.workspace.tolerance_ms)
            .invoke_async(&mut redis)
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
    }

    /// The keys and bucket sizes of a slot to post to `channel`, for a
    /// script that takes it together with other work ([`TAKE_SLOT_LUA`]).
    pub fn slot_request(&self, workspace: &str, channel: &str) -> SlotRequest {
        SlotRequest {
            keys: [
                self.key(workspace, Some(channel), "rate"),
                self.key(workspace, None, "rate"),
                self.key(workspace, Some(channel), "pause"),
            ],
            args: [
                self.channel.interval_ms,
                self.channel.tolerance_ms,
                self.workspace.interval_ms,
                self.workspace.tolerance_ms,
            ],
        }
    }

    /// Claims `ticket` (from [`super::idempotency::Idempotency::ticket`]) and,
    /// if that succeeds, tries to take a slot to post to `channel`, in one
    /// round trip. The wait is that of [`RateLimiter::try_acquire`]; it is
    /// `None` unless the claim was acquired.
    pub async fn claim_and_acquire(
        &self,
        workspace: &str,
        channel: &str,
        ticket: ClaimTicket,
        lease_ms: u64,
    ) -> Result<(Claim, Option<Duration>), redis::RedisError> {
        let mut redis = self.redis.clone();
        let (claim, claim_ms, wait_ms, rerouted_to): (i64, i64, i64, String) = self
            .gcra
            .key(self.key(workspace, Some(channel), "rate"))
            .key(self.key(workspace, None, "rate"))
            .key(self.key(workspace, Some(channel), "pause"))
            .key(ticket.key())
            .key(ticket.marker())
            .arg(self.channel.interval_ms)
            .arg(self.channel.tolerance_ms)
            .arg(self.workspace.interval_ms)
            .arg(self.workspace.tolerance_ms)
            .arg(ticket.value())
            .arg(lease_ms)
            .invoke_async(&mut redis)
            .await?;
        // The wait only counts when the claim is ours.
        let wait =
            (claim >= 0 && wait_ms > 0).then(|| Duration::from_millis(wait_ms.unsigned_abs()));
        Ok((
            Claim::from_script((claim, claim_ms, rerouted_to), ticket),
            wait,
        ))
    }

    /// Takes a slot of `method`'s bucket in `workspace` (its Web API tier,
    /// shared by every replica), or says how long to wait. Methods without a
    /// tier here always get one.
    pub async fn try_acquire_method(
        &self,
        workspace: &str,
        method: &str,
    ) -> Result<Option<Duration>, redis::RedisError> {
        let Some(bucket) = tier_of(method) else {
            return Ok(None);
        };
        let mut redis = self.redis.clone();
        let wait_ms: u64 = self
            .method_gcra
            .key(self.key(workspace, Some(method), "method-rate"))
            .key(self.key(workspace, Some(method), "method-pause"))
            .arg(bucket.interval_ms)
            .arg(bucket.tolerance_ms)
            .invoke_async(&mut redis)
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
    }

    /// Runs `call` (one call of `method` with a workspace's token) within the
    /// method's tier: waits for a slot up to `max_wait` in all, and answers
    /// a longer wait as Slack would, `ratelimited` with the wait as its
    /// Retry-After, so the caller's policy defers the event. A 429 from Slack
    /// pauses the method in the workspace for every replica.
    pub async fn call_within_tier<F, Fut>(
        &self,
        workspace: &str,
        method: &'static str,
        max_wait: Duration,
        call: F,
    ) -> Result<Value, SlackError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Value, SlackError>>,
    {
        let mut waited = Duration::ZERO;
        loop {
            match self.try_acquire_method(workspace, method).await {
                Ok(None) => {}
                Ok(Some(wait)) if waited + wait <= max_wait => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    continue;
                }
                Ok(Some(wait)) => {
                    return Err(SlackError::new(
                        method,
                        "ratelimited",
                        SlackFailure::Transient {
                            retry_after: Some(wait),
                        },
                    )
                    .with_detail(format!("the workspace's {method} budget is spent")));
                }
                // Slack's own 429 still protects the method; do not stall on Redis.
                Err(e) => {
                    tracing::warn!(error = %e, method, "cannot check the shared rate limit; calling anyway")
                }
            }
            let result = call().await;
            match &result {
                Err(e) if e.is_rate_limited() => {
                    let key = self.key(workspace, Some(method), "method-pause");
                    if self
                        .wait_out_429(key, e, &mut waited, max_wait)
                        .await
                        .is_err()
                    {
                        return result;
                    }
                }
                _ => return result,
            }
        }
    }

    /// After Slack's 429 (`error`): holds off what `pause_key` names for every
    /// replica, for the `Retry-After` asked (1 s when none), and waits it out
    /// here too (the shared pause may not have been recorded) when that fits
    /// in what is left of `max_wait`; else answers the pause, for a deferral.
    pub async fn wait_out_429(
        &self,
        pause_key: String,
        error: &SlackError,
        waited: &mut Duration,
        max_wait: Duration,
    ) -> Result<(), Duration> {
        let pause = error
            .retry_after()
            .unwrap_or_else(|| honoured_retry_after(Duration::from_secs(1)));
        tracing::warn!(
            method = error.method,
            key = %pause_key,
            ?pause,
            "slack rate-limited it; pausing it for every replica"
        );
        if let Err(e) = self.pause_key(pause_key, pause).await {
            tracing::warn!(error = %e, "cannot record the pause in Redis");
        }
        if *waited + pause > max_wait {
            return Err(pause);
        }
        tokio::time::sleep(pause).await;
        *waited += pause;
        Ok(())
    }

    /// The key of the pause a 429 puts on posts to `channel`.
    pub fn channel_pause_key(&self, workspace: &str, channel: &str) -> String {
        self.key(workspace, Some(channel), "pause")
    }

    async fn pause_key(&self, key: String, retry_after: Duration) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        self.pause
            .key(key)
            .arg(
                u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .invoke_async::<i64>(&mut redis)
            .await
            .map(|_| ())
    }

    fn key(&self, workspace: &str, channel: Option<&str>, kind: &str) -> String {
        match channel {
            Some(channel) => [
                &self.key_prefix,
                ":slack:",
                kind,
                ":",
                workspace,
                ":",
                channel,
            ]
            .concat(),
            None => [&self.key_prefix, ":slack:", kind, ":", workspace].concat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_run_a_little_under_the_configured_rate() {
        let one_per_second = Bucket::new(1.0, 3);
        assert_eq!(one_per_second.interval_ms, 1053);
        // Three at once, the third 250 ms after the first.
        assert_eq!(one_per_second.tolerance_ms, 2 * 1053 - 250);
        let per_minute = Bucket::new(300.0 / 60.0, 1);
        assert_eq!(per_minute.interval_ms, 211);
        assert_eq!(per_minute.tolerance_ms, 0);
    }
}
