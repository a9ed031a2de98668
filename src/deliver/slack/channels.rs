//! Channel names to ids: `conversations.list`, cached in Redis for every replica.
//!
//! Slack keys what matters by channel **id**: `conversations.join`,
//! `conversations.history` and `chat.update` refuse names, and a channel's
//! rate limit is the same whether a post names it `#payments` or `C0PAY`. So
//! a `#name` is resolved before anything is keyed by channel.
//!
//! One listing serves every replica: the name → id map of a workspace lives
//! in a Redis hash, stamped with when it was listed. `conversations.list` is
//! Tier 2 (about 20 calls a minute), so a workspace is listed again only when
//! a name is missing or the map is older than `slack.channel_cache_ttl`, by
//! one task in one replica at a time (an in-process lock, then a Redis lock;
//! the others wait for its result), and never twice within [`MIN_RELIST`]: a
//! name missing from a fresh listing is a channel that does not exist or that
//! the bot cannot see. A stale map still answers while Slack cannot be asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{ConstantBuilder, Retryable};
use moka::sync::Cache;
use redis::aio::ConnectionManager;
use serde_json::Value;

use super::client::{Body, SlackClient, SlackError, SlackFailure};
use super::tokens::WorkspaceToken;
use crate::deliver::limit::RateLimiter;
use crate::deliver::policy::refuses_the_listing_alone;

/// Never list a workspace twice within this: a name a fresh listing lacks
/// does not exist (for us), and Tier 2 allows about 20 listings a minute.
pub const MIN_RELIST: Duration = Duration::from_secs(15);
/// A `channel_not_found` on a cached id lists again unless a listing is
/// younger than this: a rename just before the last listing must not send
/// posts to the default channel for [`MIN_RELIST`].
pub const RELIST_AFTER_NOT_FOUND: Duration = Duration::from_secs(2);
/// How long the map itself is kept: stale entries still answer during an
/// outage; a gone one is corrected by `channel_not_found`, a renamed one by the next listing.
const MAP_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// A listing lock outlives one paginated listing with its retries.
const LIST_LOCK: Duration = Duration::from_secs(30);
/// How long a replica waits for another one's listing.
const LIST_WAIT: Duration = Duration::from_secs(15);
/// After a refusal of the listing itself (`missing_scope`,
/// `missing_argument`, …), post by name for this long before asking again.
const LISTING_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// Marks a listing without private channels (no `groups:read`).
const PUBLIC_ONLY: &str = "public_only";
/// Longest wait for one page's slot in the workspace's Tier 2 budget; well
/// under [`LIST_WAIT`], so replicas waiting for this listing do not give up.
const PAGE_WAIT: Duration = Duration::from_secs(10);
/// Largest page Slack serves.
const PAGE_LIMIT: &str = "1000";
/// How long the in-process cache answers without asking Redis.
const LOCAL_TTL: Duration = Duration::from_secs(5);

/// What a `slack_channel` target names, by its form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A conversation id (`C…`, `G…`, `D…`): used as it is.
    ChannelId(String),
    /// A user id (`U…`, `W…`): a direct message.
    User(String),
    /// A channel name, without `#`, lower-cased as Slack stores names.
    Name(String),
}

impl Destination {
    /// Sorts a target string: ids are upper-case letters and digits with a
    /// known prefix; Slack channel names are always lower-case.
    pub fn parse(target: &str) -> Destination {
        let target = target.trim();
        if let Some(name) = target.strip_prefix('#') {
            return Destination::Name(name.to_lowercase());
        }
        let looks_like_id = target.len() >= 3
            && target
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        match target.chars().next() {
            Some('C' | 'G' | 'D') if looks_like_id => Destination::ChannelId(target.to_string()),
            Some('U' | 'W') if looks_like_id => Destination::User(target.to_string()),
            _ => Destination::Name(target.to_lowercase()),
        }
    }
}

/// Where a channel name led.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The channel's id.
    Id(String),
    /// The app may not list channels (`channels:read`/`groups:read`
    /// missing): post by `#name`, which `chat.postMessage` accepts.
    ByName(String),
    /// No channel of that name that the bot can see.
    NotFound,
}

/// Why a name could not be resolved now.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Slack(#[from] SlackError),
    #[error("cannot read the channel map from Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl ResolveError {
    /// The Slack error behind it, as the delivery policy sees it; Redis
    /// trouble counts as a transient failure of `conversations.list`.
    pub fn into_slack_error(self) -> SlackError {
        match self {
            ResolveError::Slack(e) => e,
            ResolveError::Redis(e) => SlackError::new(
                "conversations.list",
                "redis_unavailable",
                SlackFailure::Transient { retry_after: None },
            )
            .with_detail(format!("cannot read the channel map from Redis: {e}")),
        }
    }
}

/// Channel name → id, shared by replicas through Redis.
pub struct ChannelDirectory {
    redis: ConnectionManager,
    key_prefix: String,
    slack: SlackClient,
    /// `conversations.list` is Tier 2: about 20 pages a minute per workspace.
    limiter: RateLimiter,
    /// How long a listing counts as fresh.
    fresh_for: Duration,
    /// One listing per workspace per process at a time.
    listing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// (workspace, name) → resolution, for a few seconds: most events name
    /// the same few channels, and this saves a Redis round trip each.
    /// Bounded: producers choose the names.
    local: Cache<(String, String), Resolution>,
    /// Idle listing gates are dropped beyond this many workspaces.
    capacity: usize,
}

/// What Redis holds for one name.
struct Cached {
    id: Option<String>,
    /// Milliseconds since the epoch of the last listing, if still fresh;
    /// `None` when stale or never listed.
    listed_at_ms: Option<u64>,
    /// Set when Slack refused the last listing itself (`missing_scope`
    /// with the scopes it needs, or another code): names go by `#name`.
    listing_refused: Option<String>,
    /// False when private channels could not be listed (no `groups:read`):
    /// a name missing from the map may still be one the bot can post to.
    complete: bool,
}

impl Cached {
    /// What a name missing from this map is.
    fn missing(&self, name: &str) -> Resolution {
        if self.complete {
            Resolution::NotFound
        } else {
            Resolution::ByName(name.to_string())
        }
    }
}

impl ChannelDirectory {
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        slack: SlackClient,
        limiter: RateLimiter,
        fresh_for: Duration,
        capacity: u64,
    ) -> ChannelDirectory {
        ChannelDirectory {
            redis,
            key_prefix: key_prefix.to_string(),
            slack,
            limiter,
            fresh_for,
            listing: Mutex::new(HashMap::new()),
            local: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(LOCAL_TTL)
                .support_invalidation_closures()
                .build(),
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
        }
    }

    /// The id of channel `name` (no `#`, lower case) in the token's workspace.
    pub async fn resolve(
        &self,
        token: &WorkspaceToken,
        name: &str,
    ) -> Result<Resolution, ResolveError> {
        if let Some(hit) = self.local_get(&token.workspace, name) {
            return Ok(hit);
        }
        // Taken before reading the map: a listing stored after this moment
        // answers this miss (taking it later races a peer's listing).
        let asked_at = now_ms();
        let cached = self.read(&token.workspace, name).await?;
        if let Some(why) = &cached.listing_refused {
            tracing::debug!(
                why,
                "posting by channel name: Slack refused to list channels"
            );
            return Ok(Resolution::ByName(name.to_string()));
        }
        if let (Some(id), Some(_)) = (&cached.id, cached.listed_at_ms) {
            let found = Resolution::Id(id.clone());
            self.local_put(&token.workspace, name, &found);
            return Ok(found);
        }
        if cached.id.is_none() && cached.listed_at_ms.is_some_and(listed_within_min_relist) {
            return Ok(cached.missing(name));
        }
        match self.relist(token, name, None, asked_at).await {
            Ok(found) => Ok(found),
            // A stale map still knows the channel while Slack cannot be asked.
            Err(e) => match (cached.id, &e) {
                (Some(id), ResolveError::Slack(slack)) if slack.is_transient() => {
                    tracing::warn!(error = %slack, "cannot list channels; using the last known id");
                    Ok(Resolution::Id(id))
                }
                _ => Err(e),
            },
        }
    }

    /// Resolves `name` again after Slack said its cached id `failed_id` is
    /// gone (`channel_not_found`): the channel may have been renamed or
    /// re-created. Lists again unless a listing is younger than
    /// [`RELIST_AFTER_NOT_FOUND`] (another task just did it for the same
    /// reason; concurrent ones share one listing).
    pub async fn resolve_again(
        &self,
        token: &WorkspaceToken,
        name: &str,
        failed_id: &str,
    ) -> Result<Resolution, ResolveError> {
        self.local_forget(&token.workspace, name);
        let asked_at = now_ms();
        let cached = self.read(&token.workspace, name).await?;
        let just_listed = cached
            .listed_at_ms
            .is_some_and(|at| now_ms().saturating_sub(at) < millis(RELIST_AFTER_NOT_FOUND));
        let found = if just_listed {
            match &cached.id {
                Some(id) => Resolution::Id(id.clone()),
                None => cached.missing(name),
            }
        } else {
            self.relist(token, name, Some(failed_id), asked_at).await?
        };
        Ok(match found {
            Resolution::Id(id) if id == failed_id => Resolution::NotFound,
            other => other,
        })
    }

    /// The cached id of `name`, without asking Slack (for keys when Slack
    /// cannot be used at all).
    pub async fn cached_id(&self, workspace: &str, name: &str) -> Option<String> {
        self.read(workspace, name).await.ok().and_then(|c| c.id)
    }

    /// Lists the workspace (unless another task or replica just did) and
    /// answers from the new map.
    async fn relist(
        &self,
        token: &WorkspaceToken,
        name: &str,
        failed_id: Option<&str>,
        asked_at: u64,
    ) -> Result<Resolution, ResolveError> {
        let workspace = token.workspace.as_str();
        let gate = self.gate(workspace);
        let _one_per_process = gate.lock().await;

        // Someone listed while we waited for the gate: use theirs.
        let cached = self.read(workspace, name).await?;
        if let Some(found) = answer_if_listed_since(&cached, asked_at, failed_id, name) {
            self.local_put(workspace, name, &found);
            return Ok(found);
        }

        let mut redis = self.redis.clone();
        let lock_key = self.key("channels-lock", workspace);
        let lock_value = uuid::Uuid::new_v4().simple().to_string();
        let locked: Option<String> = redis::cmd("SET")
            .arg(&lock_key)
            .arg(&lock_value)
            .arg("NX")
            .arg("PX")
            .arg(millis(LIST_LOCK))
            .query_async(&mut redis)
            .await?;
        if locked.is_none() {
            // Another replica is listing: wait for its stamp.
            let wait = ConstantBuilder::default()
                .with_delay(Duration::from_millis(200))
                .with_max_times((LIST_WAIT.as_millis() / 200) as usize);
            let found = (|| async {
                let cached = self
                    .read(workspace, name)
                    .await
                    .map_err(|e| Some(ResolveError::from(e)))?;
                answer_if_listed_since(&cached, asked_at, failed_id, name).ok_or(None)
            })
            .retry(wait)
            .when(|e: &Option<ResolveError>| e.is_none())
            .await;
            return match found {
                Ok(found) => {
                    self.local_put(workspace, name, &found);
                    Ok(found)
                }
                Err(Some(e)) => Err(e),
                Err(None) => Err(ResolveError::Slack(
                    SlackError::new(
                        "conversations.list",
                        "listing_in_progress",
                        SlackFailure::Transient { retry_after: None },
                    )
                    .with_detail("another replica has been listing channels for too long".into()),
                )),
            };
        }

        // A peer may have listed and let go of the lock between our read
        // above and taking it: its listing answers us too.
        let cached = match self.read(workspace, name).await {
            Ok(cached) => cached,
            Err(e) => {
                self.unlock(&lock_key, &lock_value).await;
                return Err(e.into());
            }
        };
        if let Some(found) = answer_if_listed_since(&cached, asked_at, failed_id, name) {
            self.unlock(&lock_key, &lock_value).await;
            self.local_put(workspace, name, &found);
            return Ok(found);
        }

        let listed = self.list_all(token).await;
        let result = match listed {
            Ok((map, complete)) => {
                self.store(workspace, &map, complete).await?;
                tracing::info!(
                    workspace,
                    channels = map.len(),
                    "listed the workspace's channels"
                );
                let found = match map.get(name) {
                    Some(id) => Resolution::Id(id.clone()),
                    None if complete => Resolution::NotFound,
                    None => Resolution::ByName(name.to_string()),
                };
                self.local_put(workspace, name, &found);
                Ok(found)
            }
            Err(e) if e.code == "missing_scope" => {
                let needed = e.detail.clone().unwrap_or_default();
                tracing::error!(
                    workspace,
                    needed = %needed,
                    "cannot resolve channel names to ids: the Slack app lacks the channels:read \
                     and groups:read scopes; posting by #name instead, which cannot join channels \
                     or share one rate limit with the channel's id. Add the scopes and reinstall the app"
                );
                self.stamp_refusal(workspace, &format!("missing_scope:{needed}"))
                    .await?;
                Ok(Resolution::ByName(name.to_string()))
            }
            // Remembered like a missing scope: every name would otherwise
            // ask again, each spending a call of the Tier 2 allowance.
            Err(e) if refuses_the_listing_alone(&e) => {
                tracing::warn!(
                    workspace,
                    error = %e,
                    "Slack refuses to list channels; posting by #name instead for the next {} s",
                    LISTING_REFUSED_BACKOFF.as_secs()
                );
                self.stamp_refusal(workspace, &format!("refused:{}", e.code))
                    .await?;
                Ok(Resolution::ByName(name.to_string()))
            }
            Err(e) => Err(ResolveError::Slack(e)),
        };
        self.unlock(&lock_key, &lock_value).await;
        result
    }

    /// Records that Slack refused the workspace's listing (`why`), for
    /// [`LISTING_REFUSED_BACKOFF`], in place of a listing's stamp.
    async fn stamp_refusal(&self, workspace: &str, why: &str) -> Result<(), redis::RedisError> {
        let mut redis = self.redis.clone();
        redis::cmd("SET")
            .arg(self.key("channels-listed", workspace))
            .arg(why)
            .arg("PX")
            .arg(millis(LISTING_REFUSED_BACKOFF))
            .query_async(&mut redis)
            .await
    }

    /// Lets go of the listing lock if it is still ours; a failure leaves it
    /// to expire after [`LIST_LOCK`].
    async fn unlock(&self, lock_key: &str, lock_value: &str) {
        let mut redis = self.redis.clone();
        let _: Result<i64, _> = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(lock_key)
        .arg(lock_value)
        .invoke_async(&mut redis)
        .await;
    }

    /// Every channel the bot can see, following `next_cursor`, and whether
    /// that is all of them. Private channels need `groups:read`; without it,
    /// public ones are listed alone.
    async fn list_all(
        &self,
        token: &WorkspaceToken,
    ) -> Result<(HashMap<String, String>, bool), SlackError> {
        match self
            .list_types(token, "public_channel,private_channel")
            .await
        {
            Ok(map) => Ok((map, true)),
            Err(e)
                if e.code == "missing_scope"
                    && e.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("groups:read")) =>
            {
                tracing::warn!(
                    workspace = %token.workspace,
                    "the Slack app lacks groups:read: private channels are posted to by name"
                );
                Ok((self.list_types(token, "public_channel").await?, false))
            }
            Err(e) => Err(e),
        }
    }

    async fn list_types(
        &self,
        token: &WorkspaceToken,
        types: &str,
    ) -> Result<HashMap<String, String>, SlackError> {
        let mut map = HashMap::new();
        let mut cursor = String::new();
        // Named only when Slack asks for it: an org-wide app's token must
        // say which of the org's workspaces to list (`missing_argument`
        // without it); a workspace's own token needs none.
        let mut team_id: Option<&str> = None;
        let mut started_over = false;
        // A cursor that never ends would be a Slack bug; 200 pages is 200k channels.
        for _ in 0..200 {
            let mut form = vec![
                ("types", types),
                ("exclude_archived", "true"),
                ("limit", PAGE_LIMIT),
            ];
            if !cursor.is_empty() {
                form.push(("cursor", cursor.as_str()));
            }
            if let Some(team_id) = team_id {
                form.push(("team_id", team_id));
            }
            let body = Body::Form(&form);
            let answer = self
                .limiter
                .call_within_tier(&token.workspace, "conversations.list", PAGE_WAIT, || {
                    self.slack.call_leaving_rate_limits(
                        "conversations.list",
                        Some(&token.access_token),
                        &body,
                    )
                })
                .await;
            let page = match answer {
                Err(e) if e.code == "missing_argument" && team_id.is_none() => {
                    team_id = Some(&token.workspace);
                    continue;
                }
                // Cursors expire (a long listing paced at Tier 2 takes a
                // while): list again from the start, once.
                Err(e) if e.code == "invalid_cursor" && !cursor.is_empty() && !started_over => {
                    tracing::info!(workspace = %token.workspace, "Slack no longer takes the listing's cursor; listing again from the first page");
                    started_over = true;
                    cursor.clear();
                    map.clear();
                    continue;
                }
                answer => answer?,
            };
            for channel in page
                .get("channels")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(id), Some(name)) = (
                    channel.get("id").and_then(Value::as_str),
                    channel.get("name").and_then(Value::as_str),
                ) {
                    map.insert(name.to_lowercase(), id.to_string());
                }
            }
            cursor = page
                .pointer("/response_metadata/next_cursor")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if cursor.is_empty() {
                break;
            }
        }
        Ok(map)
    }

    /// Replaces the workspace's map and stamps it, atomically.
    async fn store(
        &self,
        workspace: &str,
        map: &HashMap<String, String>,
        complete: bool,
    ) -> Result<(), redis::RedisError> {
        let map_key = self.key("channels", workspace);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&map_key).ignore();
        if !map.is_empty() {
            let pairs: Vec<(&String, &String)> = map.iter().collect();
            pipe.hset_multiple(&map_key, &pairs)
                .ignore()
                .pexpire(&map_key, millis(MAP_RETENTION) as i64)
                .ignore();
        }
        pipe.cmd("SET")
            .arg(self.key("channels-listed", workspace))
            .arg(if complete {
                now_ms().to_string()
            } else {
                format!("{}:{PUBLIC_ONLY}", now_ms())
            })
            .arg("PX")
            .arg(millis(self.fresh_for.max(MIN_RELIST)))
            .ignore();
        let mut redis = self.redis.clone();
        pipe.query_async::<()>(&mut redis).await?;
        let workspace = workspace.to_string();
        // Fails only without `support_invalidation_closures`, which is set;
        // entries then live out their few seconds anyway.
        let _ = self
            .local
            .invalidate_entries_if(move |(ws, _), _| *ws == workspace);
        Ok(())
    }

    async fn read(&self, workspace: &str, name: &str) -> Result<Cached, redis::RedisError> {
        let mut redis = self.redis.clone();
        let (id, stamp): (Option<String>, Option<String>) = redis::pipe()
            .hget(self.key("channels", workspace), name)
            .get(self.key("channels-listed", workspace))
            .query_async(&mut redis)
            .await?;
        // The stamp: `<ms>`, `<ms>:public_only`, `missing_scope:<detail>`
        // or `refused:<code>`.
        let mut cached = Cached {
            id,
            listed_at_ms: None,
            listing_refused: None,
            complete: true,
        };
        if let Some(stamp) = stamp {
            if stamp.starts_with("missing_scope:") || stamp.starts_with("refused:") {
                cached.listing_refused = Some(stamp);
            } else {
                let (ms, partial) = match stamp.split_once(':') {
                    Some((ms, _)) => (ms, true),
                    None => (stamp.as_str(), false),
                };
                cached.listed_at_ms = ms.parse().ok();
                cached.complete = !partial;
            }
        }
        Ok(cached)
    }

    fn gate(&self, workspace: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if gates.len() > self.capacity {
            gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        }
        gates.entry(workspace.to_string()).or_default().clone()
    }

    fn local_get(&self, workspace: &str, name: &str) -> Option<Resolution> {
        self.local.get(&(workspace.to_string(), name.to_string()))
    }

    fn local_put(&self, workspace: &str, name: &str, found: &Resolution) {
        self.local
            .insert((workspace.to_string(), name.to_string()), found.clone());
    }

    fn local_forget(&self, workspace: &str, name: &str) {
        self.local
            .invalidate(&(workspace.to_string(), name.to_string()));
    }

    fn key(&self, kind: &str, workspace: &str) -> String {
        format!("{}:slack:{kind}:{workspace}", self.key_prefix)
    }
}

/// The answer from a map listed after `asked_at`, if there is one (for a
/// re-resolution, the failed id does not count as found).
fn answer_if_listed_since(
    cached: &Cached,
    asked_at: u64,
    failed_id: Option<&str>,
    name: &str,
) -> Option<Resolution> {
    // A refusal stamped meanwhile answers too: the name goes by `#name`.
    if cached.listing_refused.is_some() {
        return Some(Resolution::ByName(name.to_string()));
    }
    let listed_at = cached.listed_at_ms?;
    if listed_at < asked_at {
        return None;
    }
    Some(match &cached.id {
        Some(id) if Some(id.as_str()) != failed_id => Resolution::Id(id.clone()),
        Some(_) => Resolution::NotFound,
        None => cached.missing(name),
    })
}

fn listed_within_min_relist(listed_at_ms: u64) -> bool {
    now_ms().saturating_sub(listed_at_ms) < millis(MIN_RELIST)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_sorted_by_their_form() {
        let cases = [
            ("C0PAYMENTS", Destination::ChannelId("C0PAYMENTS".into())),
            ("G0PRIVATE", Destination::ChannelId("G0PRIVATE".into())),
            ("D0DM12345", Destination::ChannelId("D0DM12345".into())),
            ("U0LEAD", Destination::User("U0LEAD".into())),
            ("W0ENTERPRISE", Destination::User("W0ENTERPRISE".into())),
            ("#payments", Destination::Name("payments".into())),
            ("#Payments", Destination::Name("payments".into())),
            ("payments", Destination::Name("payments".into())),
            ("#C0PAYMENTS", Destination::Name("c0payments".into())),
            ("ceo-office", Destination::Name("ceo-office".into())),
            ("Cx", Destination::Name("cx".into())),
        ];
        for (given, want) in cases {
            assert_eq!(Destination::parse(given), want, "{given}");
        }
    }

    /// A replica waiting for a peer's listing takes a refusal the peer
    /// stamped as its answer (the name goes by `#name`) instead of waiting
    /// for a listing that never comes.
    #[test]
    fn a_refusal_stamped_by_a_peer_answers_a_waiting_replica() {
        for why in [
            "missing_scope:channels:read,groups:read",
            "refused:missing_argument",
        ] {
            let cached = Cached {
                id: None,
                listed_at_ms: None,
                listing_refused: Some(why.to_string()),
                complete: true,
            };
            assert_eq!(
                answer_if_listed_since(&cached, now_ms(), None, "payments"),
                Some(Resolution::ByName("payments".into())),
                "{why}"
            );
        }
        let listed_before = Cached {
            id: Some("C0PAYMENTS".into()),
            listed_at_ms: Some(now_ms() - 1_000),
            listing_refused: None,
            complete: true,
        };
        assert_eq!(
            answer_if_listed_since(&listed_before, now_ms(), None, "payments"),
            None,
            "a listing older than the question does not answer it"
        );
    }
}
