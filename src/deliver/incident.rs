//! Incidents in Redis: each destination's first message, the state (open, acknowledged, resolved) and who acknowledged it.
//!
//! Events with the same `dedup_key` (else ticket number) in one workspace are
//! one incident. The first notification of an incident at a destination is a
//! new message; later ones reply in its thread, and `*.acknowledged` /
//! `*.resolved` events update every first message. That needs, shared by
//! every replica and kept across restarts, where each first message is
//! (channel id and `ts`) and how the incident stands: one Redis hash per
//! incident, written only by the Lua scripts below so that two replicas
//! handling two events of one incident at once agree on what came first.
//!
//! Hash fields: `state`, `severity` (the most severe so far), `level` (the
//! highest), `event` (the first event's JSON, re-rendered by updates),
//! `first_at` (ms), `ack_by`, `ack_at`, `resolved_at`, `msg:<destination>`
//! (`<channel> <ts>`, or `pending <ms> <event id>` while a first post is under way),
//! `seen:<event id>` (what the incident was before that event, so a
//! redelivered event is judged as it was the first time) and
//! `emailed:<destination>` (when Slack could not take it and email did).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::idempotency::{Claim, ClaimTicket, NOW_MS_LUA, claim_lua};
use super::limit::{Slot, SlotRequest, TAKE_SLOT_LUA};
use crate::event::{Event, IncidentState, Severity};

/// A first message: where it is, to thread replies under it and update it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstMessage {
    /// The channel id Slack answered with (a `D…` id for a DM).
    pub channel: String,
    pub ts: String,
}

/// One incident as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incident {
    pub state: IncidentState,
    /// The most severe severity any of its events had.
    pub severity: Option<Severity>,
    /// The highest escalation level any of its events had.
    pub level: Option<u64>,
    /// The first event's JSON, from which updates re-render the first messages.
    pub first_event: Option<String>,
    /// When the incident was first seen (Unix ms, Redis's clock).
    pub first_at_ms: u64,
    /// The Slack user who acknowledged it (`U…`), or a name.
    pub acknowledged_by: Option<String>,
    pub acknowledged_at_ms: Option<u64>,
    pub resolved_at_ms: Option<u64>,
    /// First messages by destination (a resolved target's identity, e.g. `slack:T1:C0PAY`).
    pub messages: BTreeMap<String, FirstMessage>,
    /// Destinations whose notifications went to email, and when (Unix ms).
    pub emailed: BTreeMap<String, u64>,
}

/// What an event found when it joined its incident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The event started the incident (or a new one after a resolved one).
    pub is_first: bool,
    /// The event is more severe, or at a higher level, than any before it:
    /// its thread replies are also broadcast to the channel.
    pub rose: bool,
    /// The incident after the event: whole for an event that acknowledges
    /// or resolves it (it updates every first message); otherwise its state
    /// and what concerns the event's own destinations.
    pub incident: Incident,
    /// Per destination asked about, in the order asked.
    pub first_posts: Vec<FirstPost>,
}

impl Observed {
    /// An incident `event` has just started, at `first_at_ms`: its first
    /// message (at the one destination) is the caller's to post.
    fn started(event: &Event, first_at_ms: u64) -> Observed {
        Observed {
            is_first: true,
            rose: false,
            incident: Incident {
                severity: Some(event.severity),
                // As the record keeps it: a level past i64 is none.
                level: event.level.filter(|level| i64::try_from(*level).is_ok()),
                first_at_ms,
                ..Incident::default()
            },
            first_posts: vec![FirstPost::Ours],
        }
    }

    /// What the observation scripts answered, for `destinations` in order.
    fn from_script(
        first: i64,
        rose: i64,
        fields: Vec<String>,
        posts: Vec<i64>,
        destinations: &[&str],
    ) -> Observed {
        let incident = Incident::from_fields(fields);
        let first_posts = destinations
            .iter()
            .zip(posts)
            .map(|(destination, code)| match code {
                1 => incident
                    .messages
                    .get(*destination)
                    .cloned()
                    .map_or(FirstPost::Ours, FirstPost::Exists),
                2 => FirstPost::InFlight,
                _ => FirstPost::Ours,
            })
            .collect();
        Observed {
            is_first: first == 1,
            rose: rose == 1,
            incident,
            first_posts,
        }
    }
}

/// What [`OBSERVE_AND_CLAIM`] answers: the compact string for an incident
/// this event starts, else the whole observation; each with the claim's
/// `(code, ms, where, wait)`.
enum Preclaimed {
    Started {
        first_at_ms: u64,
        claimed: (i64, i64, String, i64),
    },
    Joined {
        first: i64,
        rose: i64,
        fields: Vec<String>,
        posts: Vec<i64>,
        claimed: (i64, i64, String, i64),
    },
}

impl redis::FromRedisValue for Preclaimed {
    fn from_redis_value(value: redis::Value) -> Result<Preclaimed, redis::ParsingError> {
        let redis::Value::BulkString(bytes) = value else {
            let (first, rose, fields, posts, claimed) = redis::from_redis_value(value)?;
            return Ok(Preclaimed::Joined {
                first,
                rose,
                fields,
                posts,
                claimed,
            });
        };
        let unreadable = || redis::ParsingError::from("an unreadable answer for a new incident");
        let text = std::str::from_utf8(&bytes).map_err(|_| unreadable())?;
        // `claim claim_ms wait first_at where`; `where` (last) may hold spaces.
        let mut parts = text.splitn(5, ' ');
        let mut number = || -> Result<i64, redis::ParsingError> {
            parts
                .next()
                .and_then(|part| part.parse().ok())
                .ok_or_else(unreadable)
        };
        let (code, ms, wait) = (number()?, number()?, number()?);
        let first_at_ms = number()?.max(0).unsigned_abs();
        let rerouted_to = parts.next().ok_or_else(unreadable)?.to_string();
        Ok(Preclaimed::Started {
            first_at_ms,
            claimed: (code, ms, rerouted_to, wait),
        })
    }
}

/// Where a destination's first message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPost {
    /// None yet, and this caller now posts it: record it with
    /// [`Incidents::record_first`], or [`Incidents::abandon_first`] on failure.
    Ours,
    /// Reply in this message's thread.
    Exists(FirstMessage),
    /// Another delivery is posting it now: ask again shortly.
    InFlight,
}

/// Why an acknowledgement from a click did or did not change the incident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acknowledgement {
    /// It was open; it is acknowledged by the clicker now.
    Acknowledged(Incident),
    /// It was already acknowledged or resolved: nothing changed.
    Already(Incident),
    /// No incident by that key is kept (expired, or never seen).
    NotTracked,
}

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("cannot reach the incident store in Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The incident store; cheap to clone.
#[derive(Clone)]
pub struct Incidents {
    redis: ConnectionManager,
    key_prefix: String,
    ttl: Duration,
    observe: redis::Script,
    observe_and_claim: redis::Script,
    first_post: redis::Script,
    record_first: redis::Script,
    abandon_first: redis::Script,
    acknowledge: redis::Script,
    reopen: redis::Script,
}

/// A first post marked in flight longer than this is taken to have died
/// with its worker: the next event posts the first message itself.
const FIRST_POST_STALE_MS: u64 = 60_000;

/// What [`OBSERVE_AND_CLAIM`] answers for a target it did not claim.
const NOT_CLAIMED: i64 = 9;

/// The claim [`Incidents::observe_and_claim`] takes with the observation.
pub struct Preclaim<'a> {
    pub ticket: ClaimTicket,
    pub lease_ms: u64,
    /// The post's first rate-limit slot, unless posts already wait for the
    /// channel (then the post queues behind them and asks in its turn).
    pub slot: Option<SlotRequest>,
    /// Where the post goes: the claim is taken only if a first message
    /// already there is in this channel.
    pub channel: &'a str,
}

/// The observation as a Lua function, for [`OBSERVE`] and [`OBSERVE_AND_CLAIM`]:
/// it updates and reads the incident in one go, and answers `first, rose,
/// fields, posts` (the four elements of the scripts' answer), then the
/// incident's fields after the event (`h`) and the field names it read
/// (`names`: destination i's first message is `names[7 + 2i]`).
/// Lua work is most of what this costs Redis (see `NOW_MS_LUA` in
/// `idempotency.rs`), so the usual paths make few strings, tables and
/// number conversions.
const OBSERVE_FN: &str = r#"
local function observe(key, state, severity_s, level_s, event, ttl, event_id, ack_by, destinations, now, now_s)
local stale_ms = STALE_MS
-- Numbers are compared as numbers but written as the strings they came as:
-- Redis 7.0 formats every number argument with snprintf, a cost per call.
-- Each field name is built once: every new string costs the script a hash
-- and an allocation.
local seen_field = 'seen:' .. event_id
-- One read of everything this event needs, one write of what it changes:
-- `h` is the incident's fields as they are after this event.
local names = {seen_field, 'state', 'severity', 'level', 'first_at', 'ack_by', 'ack_at', 'resolved_at'}
for i, destination in ipairs(destinations) do
  names[7 + 2 * i] = 'msg:' .. destination
  names[8 + 2 * i] = 'emailed:' .. destination
end
local values = redis.call('HMGET', key, unpack(names))
local h, found = {}, false
for i = 2, #names do
  if values[i] then h[names[i]], found = values[i], true end
end
local seen = values[1]
local writes = {}
local function set(field, value)
  h[field] = value
  writes[#writes + 1] = field
  writes[#writes + 1] = value
end
local first, rose, fresh
if seen then
  first = string.byte(seen, 1) == 49
  rose = string.byte(seen, 2) == 49
else
  if h['state'] == 'resolved' and state == 'open' then
    -- A new problem after the last one was resolved: a new incident.
    redis.call('DEL', key)
    h, found = {}, false
  end
  if not h['state'] then
    -- A new incident: its fields in one go (the event is written, but
    -- kept out of `h`: the answer has no use for it).
    first, rose = true, false
    if found then
      -- What a key without an incident can hold (an email note).
      h['state'], h['severity'], h['level'], h['first_at'] = 'open', severity_s, level_s, now_s
    else
      h = {state = 'open', severity = severity_s, level = level_s, first_at = now_s}
      -- The usual case: the answer is these four fields (any first
      -- message is now this event's to post, so pending: left out).
      fresh = state == 'open'
    end
    writes = {'state', 'open', 'severity', severity_s, 'level', level_s, 'first_at', now_s, 'event', event,
      seen_field, '10'}
  else
    first = false
    local severity, level = tonumber(severity_s), tonumber(level_s)
    local was_severity = tonumber(h['severity'] or '99')
    local was_level = tonumber(h['level'] or '-1')
    rose = severity < was_severity or level > was_level
    if severity < was_severity then set('severity', severity_s) end
    if level > was_level then set('level', level_s) end
    -- Written, but kept out of `h`: the answer has no use for it.
    writes[#writes + 1] = seen_field
    writes[#writes + 1] = rose and '01' or '00'
  end
  if state == 'acknowledged' and h['state'] == 'open' then
    set('state', 'acknowledged')
    set('ack_at', now_s)
    if ack_by ~= '' then set('ack_by', ack_by) end
  elseif state == 'resolved' and h['state'] ~= 'resolved' then
    set('state', 'resolved')
    set('resolved_at', now_s)
  end
end
-- Each destination's first message: there, being posted, or ours to post.
local posts = {}
for i = 1, #destinations do
  local field = names[7 + 2 * i]
  local current = h[field]
  local since, owner
  if current and string.find(current, 'pending ', 1, true) == 1 then
    since, owner = string.match(current, '^pending (%d+) ?(.*)$')
  end
  if current and not since then
    posts[i] = 1
  elseif since and owner ~= event_id and now - tonumber(since) < stale_ms then
    posts[i] = 2
  else
    -- Free, stale, or this very event's (a redelivery after a crash: its
    -- idempotency claim keeps two copies from both posting).
    set(field, 'pending ' .. now_s .. ' ' .. event_id)
    posts[i] = 0
  end
end
if #writes > 0 then redis.call('HSET', key, unpack(writes)) end
redis.call('PEXPIRE', key, ttl)
-- Everything (the first event and every first message) only when this
-- event updates the first messages; otherwise what its posts need.
local fields = {}
if state ~= 'open' then
  fields = redis.call('HGETALL', key)
elseif fresh then
  fields = {'state', 'open', 'severity', severity_s, 'level', level_s, 'first_at', now_s}
else
  -- Every field `h` can hold is in `names`; a first message still being
  -- posted reads as none: left out, as every element answered costs the
  -- worker a parse. Only a first message can be pending.
  local n = 0
  for i = 2, #names do
    local name = names[i]
    local value = h[name]
    if value and (i < 9 or i % 2 == 0 or string.find(value, 'pending ', 1, true) ~= 1) then
      fields[n + 1] = name
      fields[n + 2] = value
      n = n + 2
    end
  end
end
return first and 1 or 0, rose and 1 or 0, fields, posts, h, names, fresh
end
"#;

/// One event joins its incident (see [`Incidents::observe`]).
const OBSERVE: &str = r#"
local now, now_s = now_ms()
local destinations = {}
for i = 8, #ARGV do destinations[#destinations + 1] = ARGV[i] end
local first, rose, fields, posts = observe(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6], ARGV[7], destinations, now, now_s)
return {first, rose, fields, posts}
"#;

/// [`OBSERVE`] for an event with one Slack destination, then, unless
/// another delivery is posting the incident's first message there or that
/// message is in another channel than the post's (a DM's `D…`), the
/// target's claim and, when ARGV[14] is `1`, the post's first rate-limit
/// slot: one round trip where there were two. KEYS: incident, channel
/// bucket, workspace bucket, pause, claim, attempt marker. ARGV[8..9]: the
/// claim's value and lease; ARGV[10..13]: the buckets; ARGV[15]: the post's
/// channel; ARGV[16]: the destination. Answers what [`OBSERVE`] does, plus
/// `{claim, claim_ms, where, wait}`: `claim` 9 when not claimed, `wait` -1
/// when no slot was asked for. The usual answer, an incident this event
/// starts (claimed: its first message is free), is the string
/// `claim claim_ms wait first_at where` instead: everything else in it
/// is the event's own, and each element of an answer costs the worker a
/// parse ([`Preclaimed`]).
const OBSERVE_AND_CLAIM: &str = r#"
local now, now_s = now_ms()
local first, rose, fields, posts, h, names, fresh = observe(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[6], ARGV[7], {ARGV[16]}, now, now_s)
local claimed = {9, 0, '', -1}
local post = posts[1]
local there = h[names[9]]
if post == 0 or (post == 1 and there and string.match(there, '^(%S+)') == ARGV[15]) then
  local code, ms, where = claim(KEYS[5], KEYS[6], ARGV[8], ARGV[9], now_s)
  local wait = -1
  if code >= 0 and ARGV[14] == '1' then
    wait = take_slot(now, KEYS[2], KEYS[3], KEYS[4], ARGV[10], ARGV[11], ARGV[12], ARGV[13])
  end
  if fresh then
    return string.format('%d %d %d %s %s', code, ms, wait, now_s, where)
  end
  claimed = {code, ms, where, wait}
end
return {first, rose, fields, posts, claimed}
"#;

/// `{0, ''}` ours to post; `{1, 'C… ts'}` exists; `{2, ''}` in flight elsewhere.
/// A stale mark is taken over (its owner is marked as unknown: `-`).
const FIRST_POST: &str = r#"
local key, field, stale = KEYS[1], ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', key) == 0 then return {0, ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = redis.call('HGET', key, field)
if current then
  local since = string.match(current, '^pending (%d+)')
  if not since then return {1, current} end
  if now - tonumber(since) < stale then return {2, ''} end
end
redis.call('HSET', key, field, 'pending ' .. now .. ' -')
return {0, ''}
"#;

const RECORD_FIRST: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and not string.match(current, '^pending ') then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

const ABANDON_FIRST: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and string.match(current, '^pending ') then redis.call('HDEL', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then
  local t = redis.call('TIME')
  redis.call('HSETNX', KEYS[1], 'emailed:' .. ARGV[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return 0
"#;

/// `{0, hash}` acknowledged now; `{1, hash}` already; `{2, {}}` not tracked
/// (gone, or another incident under the key than the one begun at ARGV[2]).
const ACKNOWLEDGE: &str = r#"
local key, by, since = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', key) == 0 then return {2, {}} end
if since ~= '' and tonumber(redis.call('HGET', key, 'first_at')) ~= tonumber(since) then return {2, {}} end
if redis.call('HGET', key, 'state') ~= 'open' then return {1, redis.call('HGETALL', key)} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', key, 'state', 'acknowledged', 'ack_by', by, 'ack_at', now)
return {0, redis.call('HGETALL', key)}
"#;

/// Undoes a click's acknowledgement whose event could not be published.
const REOPEN: &str = r#"
if redis.call('HGET', KEYS[1], 'state') == 'acknowledged' and redis.call('HGET', KEYS[1], 'ack_by') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'open')
  redis.call('HDEL', KEYS[1], 'ack_by', 'ack_at')
  return 1
end
return 0
"#;

impl Incidents {
    pub fn new(redis: ConnectionManager, key_prefix: &str, ttl: Duration) -> Incidents {
        Incidents {
            redis,
            key_prefix: key_prefix.to_string(),
            ttl,
            observe: redis::Script::new(
                &format!("{NOW_MS_LUA}{OBSERVE_FN}{OBSERVE}")
                    .replace("STALE_MS", &FIRST_POST_STALE_MS.to_string()),
            ),
            observe_and_claim: redis::Script::new(
                &format!(
                    "{}{TAKE_SLOT_LUA}{OBSERVE_FN}{OBSERVE_AND_CLAIM}",
                    claim_lua()
                )
                .replace("STALE_MS", &FIRST_POST_STALE_MS.to_string()),
            ),
            first_post: redis::Script::new(FIRST_POST),
            record_first: redis::Script::new(RECORD_FIRST),
            abandon_first: redis::Script::new(ABANDON_FIRST),
            acknowledge: redis::Script::new(ACKNOWLEDGE),
            reopen: redis::Script::new(REOPEN),
        }
    }

    fn key(&self, workspace: &str, incident: &str) -> String {
        [&self.key_prefix, ":incident:", workspace, ":", incident].concat()
    }

    /// The hash field of a destination's first message.
    fn message_field(destination: &str) -> String {
        ["msg:", destination].concat()
    }

    /// Joins `event` to its incident (starting it if it is the first),
    /// applies what the event says (acknowledged, resolved) and answers the
    /// incident as it is now, and where each of `destinations` has its
    /// first message (see [`FirstPost`]). Idempotent per event id.
    pub async fn observe(
        &self,
        workspace: &str,
        incident: &str,
        event: &Event,
        destinations: &[&str],
    ) -> Result<Observed, IncidentError> {
        let mut call = self.observe.key(self.key(workspace, incident));
        Self::observation_args(&mut call, event, self.ttl);
        for destination in destinations {
            call.arg(*destination);
        }
        let (first, rose, fields, posts): (i64, i64, Vec<String>, Vec<i64>) =
            call.invoke_async(&mut self.redis.clone()).await?;
        Ok(Observed::from_script(
            first,
            rose,
            fields,
            posts,
            destinations,
        ))
    }

    /// [`Incidents::observe`] for an event with one Slack destination, with
    /// the target's claim (and the post's first slot, when `slot` is given)
    /// in the same round trip. The claim is taken unless another delivery
    /// is posting the incident's first message there, or that message is
    /// in another channel than `channel` (where the post would go): then
    /// `None`, and the caller claims as usual.
    pub async fn observe_and_claim(
        &self,
        workspace: &str,
        incident: &str,
        event: &Event,
        destination: &str,
        claim: Preclaim<'_>,
    ) -> Result<(Observed, Option<(Claim, Slot)>), IncidentError> {
        let (slot_keys, slot_args, take_slot) = match claim.slot {
            Some(SlotRequest { keys, args }) => (keys, args, "1"),
            None => (Default::default(), [0; 4], "0"),
        };
        let mut call = self.observe_and_claim.key(self.key(workspace, incident));
        for key in &slot_keys {
            call.key(key);
        }
        call.key(claim.ticket.key()).key(claim.ticket.marker());
        Self::observation_args(&mut call, event, self.ttl);
        call.arg(claim.ticket.value()).arg(claim.lease_ms);
        for arg in slot_args {
            call.arg(arg);
        }
        call.arg(take_slot).arg(claim.channel).arg(destination);
        let (observed, (code, claim_ms, rerouted_to, wait_ms)) =
            match call.invoke_async(&mut self.redis.clone()).await? {
                Preclaimed::Started {
                    first_at_ms,
                    claimed,
                } => (Observed::started(event, first_at_ms), claimed),
                Preclaimed::Joined {
                    first,
                    rose,
                    fields,
                    posts,
                    claimed,
                } => (
                    Observed::from_script(first, rose, fields, posts, &[destination]),
                    claimed,
                ),
            };
        let claimed = (code != NOT_CLAIMED).then(|| {
            let slot = match wait_ms {
                ..0 => Slot::Ask,
                0 => Slot::Taken,
                ms => Slot::WaitFor(Duration::from_millis(ms.unsigned_abs())),
            };
            (
                Claim::from_script((code, claim_ms, rerouted_to), claim.ticket),
                slot,
            )
        });
        Ok((observed, claimed))
    }

    /// ARGV[1..7] of both observation scripts.
    fn observation_args(call: &mut redis::ScriptInvocation<'_>, event: &Event, ttl: Duration) {
        // As received, else encoded: a reader decodes either as the same event.
        let event_json = match event.received.as_str() {
            Some(text) => std::borrow::Cow::Borrowed(text),
            None => std::borrow::Cow::Owned(serde_json::to_string(event).unwrap_or_default()),
        };
        let level = event
            .level
            .and_then(|l| i64::try_from(l).ok())
            .unwrap_or(-1);
        let acknowledged_by = event
            .acknowledged_by
            .as_ref()
            .and_then(|who| {
                who.slack_user
                    .as_deref()
                    .or(who.name.as_deref())
                    .or(who.email.as_deref())
            })
            .unwrap_or_default();
        call.arg(event.incident_state().as_str())
            .arg(severity_rank(event.severity))
            .arg(level)
            .arg(event_json.as_ref())
            .arg(millis(ttl))
            .arg(&event.id)
            .arg(acknowledged_by);
    }

    /// Whether the first message to `destination` exists, is being posted,
    /// or is this caller's to post.
    pub async fn first_post(
        &self,
        workspace: &str,
        incident: &str,
        destination: &str,
    ) -> Result<FirstPost, IncidentError> {
        let mut redis = self.redis.clone();
        let (code, found): (i64, String) = self
            .first_post
            .key(self.key(workspace, incident))
            .arg(Self::message_field(destination))
            .arg(FIRST_POST_STALE_MS)
            .invoke_async(&mut redis)
            .await?;
        Ok(match code {
            0 => FirstPost::Ours,
            1 => match parse_message(&found) {
                Some(message) => FirstPost::Exists(message),
                None => FirstPost::Ours,
            },
            _ => FirstPost::InFlight,
        })
    }

    /// Records where the first message to `destination` landed.
    pub async fn record_first(
        &self,
        workspace: &str,
        incident: &str,
        destination: &str,
        message: &FirstMessage,
    ) -> Result<(), IncidentError> {
        let mut redis = self.redis.clone();
        self.record_first
            .key(self.key(workspace, incident))
            .arg(Self::message_field(destination))
            .arg(format!("{} {}", message.channel, message.ts))
            .invoke_async::<i64>(&mut redis)
            .await?;
        Ok(())
    }

    /// The commands that record a post to `destination` (see
    /// [`super::idempotency::Idempotency::complete_and`]): where the first
    /// message landed, when `first` is it, and that Slack takes the
    /// incident again (the catch-up note has been said).
    pub fn posted_commands(
        &self,
        workspace: &str,
        incident: &str,
        destination: &str,
        first: Option<&FirstMessage>,
        clear_emailed: bool,
    ) -> Vec<redis::Cmd> {
        let key = self.key(workspace, incident);
        let mut commands = Vec::with_capacity(3);
        if let Some(message) = first {
            // Only the delivery that marked the first post pending gets
            // here, so it writes without comparing.
            let mut hset = redis::cmd("HSET");
            hset.arg(&key)
                .arg(Self::message_field(destination))
                .arg([&message.channel, " ", &message.ts].concat());
            commands.push(hset);
            // Never a hash without a lifetime, should the incident have gone meanwhile.
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(&key).arg(millis(self.ttl));
            commands.push(expire);
        }
        if clear_emailed {
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(&key).arg(["emailed:", destination].concat());
            commands.push(hdel);
        }
        commands
    }

    /// Gives up this caller's first post to `destination`; `emailed` notes
    /// that the notification went to email instead (for the catch-up note
    /// when Slack takes the incident again).
    pub async fn abandon_first(
        &self,
        workspace: &str,
        incident: &str,
        destination: &str,
        emailed: bool,
    ) -> Result<(), IncidentError> {
        let mut redis = self.redis.clone();
        self.abandon_first
            .key(self.key(workspace, incident))
            .arg(Self::message_field(destination))
            .arg(if emailed { destination } else { "" })
            .invoke_async::<i64>(&mut redis)
            .await?;
        Ok(())
    }

    /// Acknowledges an open incident for a click on its button.
    pub async fn acknowledge(
        &self,
        workspace: &str,
        incident: &str,
        since_ms: Option<u64>,
        by: &str,
    ) -> Result<Acknowledgement, IncidentError> {
        let mut redis = self.redis.clone();
        let (code, fields): (i64, Vec<String>) = self
            .acknowledge
            .key(self.key(workspace, incident))
            .arg(by)
            .arg(since_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .invoke_async(&mut redis)
            .await?;
        Ok(match code {
            0 => Acknowledgement::Acknowledged(Incident::from_fields(fields)),
            1 => Acknowledgement::Already(Incident::from_fields(fields)),
            _ => Acknowledgement::NotTracked,
        })
    }

    /// Takes back a click's acknowledgement by `by` (its event could not be published).
    pub async fn reopen(
        &self,
        workspace: &str,
        incident: &str,
        by: &str,
    ) -> Result<(), IncidentError> {
        let mut redis = self.redis.clone();
        self.reopen
            .key(self.key(workspace, incident))
            .arg(by)
            .invoke_async::<i64>(&mut redis)
            .await?;
        Ok(())
    }

    /// Whether a signed request (by its signature) is seen for the first
    /// time within `window`: Slack signs each request anew, so a second
    /// sight is a replay.
    pub async fn first_sight_of_request(
        &self,
        signature: &str,
        window: Duration,
    ) -> Result<bool, IncidentError> {
        let mut redis = self.redis.clone();
        let fresh: Option<String> = redis::cmd("SET")
            .arg(format!("{}:slack:request:{signature}", self.key_prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(window))
            .query_async(&mut redis)
            .await?;
        Ok(fresh.is_some())
    }

    /// The incident as stored, if it is kept.
    pub async fn get(
        &self,
        workspace: &str,
        incident: &str,
    ) -> Result<Option<Incident>, IncidentError> {
        let mut redis = self.redis.clone();
        let fields: Vec<String> = redis::cmd("HGETALL")
            .arg(self.key(workspace, incident))
            .query_async(&mut redis)
            .await?;
        Ok((!fields.is_empty()).then(|| Incident::from_fields(fields)))
    }
}

impl Incident {
    fn from_fields(fields: Vec<String>) -> Incident {
        let mut incident = Incident::default();
        let mut pairs = fields.into_iter();
        while let (Some(name), Some(value)) = (pairs.next(), pairs.next()) {
            match name.as_str() {
                "state" => {
                    incident.state = IncidentState::parse(&value).unwrap_or(IncidentState::Open);
                }
                "severity" => incident.severity = value.parse().ok().and_then(severity_of_rank),
                "level" => {
                    incident.level = value.parse::<i64>().ok().and_then(|l| l.try_into().ok())
                }
                "event" => incident.first_event = Some(value),
                "first_at" => incident.first_at_ms = value.parse().unwrap_or(0),
                "ack_by" => incident.acknowledged_by = Some(value),
                "ack_at" => incident.acknowledged_at_ms = value.parse().ok(),
                "resolved_at" => incident.resolved_at_ms = value.parse().ok(),
                other => {
                    if let Some(destination) = other.strip_prefix("msg:") {
                        if let Some(message) = parse_message(&value) {
                            incident.messages.insert(destination.to_string(), message);
                        }
                    } else if let Some(destination) = other.strip_prefix("emailed:")
                        && let Ok(at) = value.parse()
                    {
                        incident.emailed.insert(destination.to_string(), at);
                    }
                }
            }
        }
        incident
    }
}

/// `C… ts` as a first message; `pending …` is none yet.
fn parse_message(text: &str) -> Option<FirstMessage> {
    let (channel, ts) = text.split_once(' ')?;
    (channel != "pending" && !channel.is_empty() && !ts.is_empty()).then(|| FirstMessage {
        channel: channel.to_string(),
        ts: ts.to_string(),
    })
}

/// Critical is 0: a lower rank is more severe.
fn severity_rank(severity: Severity) -> u8 {
    match severity {
        Severity::Critical => 0,
        Severity::High => 1,
        Severity::Medium => 2,
        Severity::Low => 3,
        Severity::Info => 4,
    }
}

fn severity_of_rank(rank: u8) -> Option<Severity> {
    Some(match rank {
        0 => Severity::Critical,
        1 => Severity::High,
        2 => Severity::Medium,
        3 => Severity::Low,
        4 => Severity::Info,
        _ => return None,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<String> {
        pairs
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()])
            .collect()
    }

    #[test]
    fn a_stored_incident_reads_back_with_its_messages_and_skips_first_posts_in_flight() {
        let incident = Incident::from_fields(fields(&[
            ("state", "acknowledged"),
            ("severity", "1"),
            ("level", "-1"),
            ("first_at", "1700000000000"),
            ("ack_by", "U0LEAD"),
            ("ack_at", "1700000060000"),
            ("msg:slack:T1:C0PAY", "C0PAY 1700000000.000100"),
            ("msg:slack:T1:U0LEAD", "pending 1700000000000"),
            ("emailed:slack:T1:C0OPS", "1700000001000"),
            ("seen:e1", "10"),
        ]));
        assert_eq!(incident.state, IncidentState::Acknowledged);
        assert_eq!(incident.severity, Some(Severity::High));
        assert_eq!(incident.level, None);
        assert_eq!(incident.acknowledged_by.as_deref(), Some("U0LEAD"));
        assert_eq!(
            incident.messages.get("slack:T1:C0PAY"),
            Some(&FirstMessage {
                channel: "C0PAY".into(),
                ts: "1700000000.000100".into()
            })
        );
        assert_eq!(incident.messages.len(), 1);
        assert_eq!(incident.emailed.get("slack:T1:C0OPS"), Some(&1700000001000));
    }
}
