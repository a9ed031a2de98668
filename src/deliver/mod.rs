//! One event's delivery: resolve each routed target, skip what was already sent, send the rest, fall back to email.
//!
//! The order for a Slack target is: post → (destination error) reroute to the
//! default channel, or join the channel and post again → (payload error) post
//! once more as plain text → (Slack unavailable: no usable token, or still
//! failing after the short retry budget) email the target's own address, else
//! the rule's `email`, else `defaults.email`.
//!
//! The result is a [`DeliveryReport`] saying, per target, whether it is
//! settled. Nothing here touches the broker: [`crate::settle`] turns the
//! report into ack, delayed retry or dead-letter.

pub mod email;
pub mod idempotency;
pub mod limit;
pub mod slack;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;
use tracing::{info, warn};

use crate::event::{Event, Target};
use crate::rules::{RoutedTarget, Routing};
use email::EmailSender;
use idempotency::{Claim, ClaimTicket, Idempotency};
use limit::RateLimiter;
use slack::message::{RenderContext, render};
use slack::tokens::{TokenStore, WorkspaceToken};
use slack::users::UserDirectory;
use slack::{Body, SlackClient, SlackError, SlackFailure, honoured_retry_after};

/// The outcome of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetStatus {
    /// Sent now; `to` says where (e.g. `slack:C0PAY`, `email:oncall@example.com`).
    Delivered { to: String },
    /// An earlier attempt already sent it (redelivery, retry, another replica).
    AlreadyDelivered,
    /// Not sent. `retryable` is false when trying again cannot help.
    Failed { detail: String, retryable: bool },
    /// Not sent yet: the channel's rate limit has no slot for `wait`.
    Deferred { wait: Duration },
}

/// One target and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReport {
    /// The target as routed, e.g. `slack_channel:C0PAY`.
    pub target: String,
    /// The target's kind (`slack_channel`, `email`, …), for metrics.
    pub kind: &'static str,
    pub status: TargetStatus,
}

impl TargetReport {
    pub fn is_settled(&self) -> bool {
        !matches!(
            self.status,
            TargetStatus::Failed { .. } | TargetStatus::Deferred { .. }
        )
    }
}

/// Every target of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub targets: Vec<TargetReport>,
}

impl DeliveryReport {
    pub fn unsettled(&self) -> impl Iterator<Item = &TargetReport> {
        self.targets.iter().filter(|t| !t.is_settled())
    }

    pub fn all_settled(&self) -> bool {
        self.targets.iter().all(TargetReport::is_settled)
    }

    /// Whether some target failed (as opposed to only waiting for a rate-limit slot).
    pub fn any_failed(&self) -> bool {
        self.targets
            .iter()
            .any(|t| matches!(t.status, TargetStatus::Failed { .. }))
    }

    /// The longest rate-limit wait among deferred targets.
    pub fn longest_deferral(&self) -> Option<Duration> {
        self.targets
            .iter()
            .filter_map(|t| match t.status {
                TargetStatus::Deferred { wait } => Some(wait),
                _ => None,
            })
            .max()
    }
}

impl fmt::Display for DeliveryReport {
    /// `slack_channel:C1 failed: chat.postMessage: http_503; slack_user:U1 delivered to slack:D1`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .targets
            .iter()
            .map(|t| match &t.status {
                TargetStatus::Delivered { to } => format!("{} delivered to {to}", t.target),
                TargetStatus::AlreadyDelivered => format!("{} already delivered", t.target),
                TargetStatus::Failed { detail, .. } => format!("{} failed: {detail}", t.target),
                TargetStatus::Deferred { wait } => {
                    format!("{} waits {wait:?} for a rate-limit slot", t.target)
                }
            })
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Sends events to their targets.
pub struct Deliverer {
    slack: SlackClient,
    tokens: TokenStore,
    idempotency: Idempotency,
    email: EmailSender,
    limiter: RateLimiter,
    /// Longest inline wait for a rate-limit slot before deferring through the broker.
    max_rate_limit_wait: Duration,
    users: UserDirectory,
}

/// A target after lookups: what to do with it.
struct Resolved<'a> {
    routed: &'a RoutedTarget,
    /// Identity for idempotency, e.g. `slack:T1:C0PAY`.
    key: String,
    /// Who it reaches, for de-duplication within the event (a `slack_email`
    /// and a `slack_user` target can be the same person).
    dedupe: String,
    action: Action,
}

enum Action {
    /// Post with `chat.postMessage` to this `channel` (channel id, `#name` or user id).
    Slack { channel: String },
    /// Email these addresses; `reason` says why it is not Slack (None: routed to email).
    Email {
        addresses: Vec<String>,
        reason: Option<String>,
    },
    /// Cannot be sent now.
    Fail { detail: String, retryable: bool },
}

/// Why Slack could not take a target, and whether it may work later.
struct SlackUnavailable {
    reason: String,
    transient: bool,
}

/// Why a post did not go out.
enum PostFailure {
    /// Slack cannot take it: fall back to email.
    Unavailable(SlackUnavailable),
    /// The rate limit has no slot soon enough: try the event again later.
    Deferred(Duration),
}

/// A Slack target, claimed, ready to post.
struct TargetPost<'a> {
    channel: &'a str,
    token: &'a WorkspaceToken,
    /// Takes posts whose channel is gone or archived.
    default_channel: Option<&'a str>,
    ticket: &'a ClaimTicket,
    /// What the claim's rate-limit check said: `None` when it took a slot.
    first_wait: Option<Duration>,
}

/// Whether a post attempt still has to ask for a rate-limit slot.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Ask,
    /// Taken together with the claim.
    Taken,
    /// Asked together with the claim: none free for this long.
    WaitFor(Duration),
}

/// One post attempt's failure.
enum AttemptFailure {
    Slack(SlackError),
    Deferred(Duration),
}

/// A target waiting for the email phase.
struct PendingEmail<'a> {
    routed: &'a RoutedTarget,
    /// The target's own claim, held until the email is settled (None for email targets).
    ticket: Option<ClaimTicket>,
    addresses: Vec<String>,
    reason: Option<String>,
    /// Whether the Slack failure behind this fallback may pass by itself.
    transient: bool,
}

/// What the Slack phase did with one target.
enum SlackResult<'a> {
    Done(TargetReport),
    NeedsEmail(PendingEmail<'a>),
}

impl Deliverer {
    pub fn new(
        slack: SlackClient,
        tokens: TokenStore,
        idempotency: Idempotency,
        email: EmailSender,
        limiter: RateLimiter,
        max_rate_limit_wait: Duration,
        users: UserDirectory,
    ) -> Deliverer {
        Deliverer {
            slack,
            tokens,
            idempotency,
            email,
            limiter,
            max_rate_limit_wait,
            users,
        }
    }

    /// Delivers `event` to every target of `routing`; `default_channel` takes
    /// posts whose channel is gone or archived.
    pub async fn deliver(
        &self,
        event: &Event,
        routing: &Routing,
        default_channel: Option<&str>,
    ) -> DeliveryReport {
        let workspace = self.tokens.workspace_for(event.workspace.as_deref());
        let token = match self.tokens.get(workspace).await {
            Ok(Some(token)) => Ok(token),
            Ok(None) => Err(SlackUnavailable {
                reason: format!(
                    "no Slack token for workspace {}; store one with `alert-router tokens set` or set SLACK_BOT_TOKEN",
                    workspace.unwrap_or("(none named, and slack.default_workspace is unset)")
                ),
                // An operator may add the token: worth retrying if email fails too.
                transient: true,
            }),
            Err(e) if e.is_transient() => {
                // Without Redis there is no idempotency either: wait for it.
                let detail = e.to_string();
                let reports = routing
                    .targets
                    .iter()
                    .map(|r| failed(&r.target, detail.clone(), true))
                    .collect();
                return DeliveryReport { targets: reports };
            }
            Err(e) => Err(SlackUnavailable {
                reason: e.to_string(),
                transient: false,
            }),
        };

        let mut resolved = Vec::with_capacity(routing.targets.len());
        let mut seen = HashSet::new();
        for routed in &routing.targets {
            let target = self.resolve(event, routed, &token).await;
            // Two routes to one person or channel notify once.
            if seen.insert(target.dedupe.clone()) {
                resolved.push(target);
            }
        }

        let results = join_all(
            resolved
                .iter()
                .map(|target| self.slack_phase(event, target, &token, default_channel)),
        )
        .await;
        let mut reports = Vec::with_capacity(results.len());
        let mut pending = Vec::new();
        for result in results {
            match result {
                SlackResult::Done(report) => reports.push(report),
                SlackResult::NeedsEmail(email) => pending.push(email),
            }
        }
        reports.extend(self.email_phase(event, pending).await);
        DeliveryReport { targets: reports }
    }

    async fn resolve<'a>(
        &self,
        event: &Event,
        routed: &'a RoutedTarget,
        token: &Result<WorkspaceToken, SlackUnavailable>,
    ) -> Resolved<'a> {
        let fallback = |reason: String| Action::Email {
            addresses: fallback_addresses(event, routed),
            reason: Some(reason),
        };
        // The same identity with or without a usable token, so a target that
        // was emailed during an outage is not posted again once Slack is back.
        let ws = self
            .tokens
            .workspace_for(event.workspace.as_deref())
            .unwrap_or("default");
        // Who the target turns out to be, when that differs from its key.
        let mut dedupe = None;
        let (key, action) = match &routed.target {
            Target::Email(address) => (
                format!("email:{}", address.to_lowercase()),
                Action::Email {
                    addresses: vec![address.clone()],
                    reason: None,
                },
            ),
            Target::Assignee => (
                "assignee:unresolved".to_string(),
                fallback("the event's assignee has no Slack user id or email".into()),
            ),
            Target::SlackChannel(channel) | Target::SlackUser(channel) => {
                let key = format!("slack:{ws}:{channel}");
                match token {
                    Ok(_) => (
                        key,
                        Action::Slack {
                            channel: channel.clone(),
                        },
                    ),
                    Err(unavailable) => (key, fallback(unavailable.reason.clone())),
                }
            }
            // Keyed by the address on every path (lookup or not), so a person
            // emailed during an outage is not also messaged once Slack is back.
            Target::SlackEmail(address) => match token {
                Err(unavailable) => (
                    format!("slack:{ws}:email:{}", address.to_lowercase()),
                    fallback(unavailable.reason.clone()),
                ),
                Ok(token) => match self.lookup_user(token, address).await {
                    Ok(user) => {
                        dedupe = Some(format!("slack:{ws}:{user}"));
                        (
                            format!("slack:{ws}:email:{}", address.to_lowercase()),
                            Action::Slack { channel: user },
                        )
                    }
                    Err(e) if e.code == "users_not_found" => (
                        format!("slack:{ws}:email:{}", address.to_lowercase()),
                        Action::Email {
                            addresses: vec![address.clone()],
                            reason: Some(format!("no Slack user has the email {address}")),
                        },
                    ),
                    Err(e) => {
                        if matches!(e.failure, SlackFailure::Workspace) {
                            self.tokens.invalidate(&token.workspace);
                        }
                        (
                            format!("slack:{ws}:email:{}", address.to_lowercase()),
                            fallback(format!("Slack is unavailable: {e}")),
                        )
                    }
                },
            },
        };
        let action = match action {
            Action::Email { addresses, .. } if addresses.is_empty() => Action::Fail {
                detail: "Slack cannot take it and there is no email address to fall back to; set `email` on the rule or `defaults.email`".into(),
                retryable: true,
            },
            other => other,
        };
        Resolved {
            routed,
            dedupe: dedupe.unwrap_or_else(|| key.clone()),
            key,
            action,
        }
    }

    /// The Slack user with this email: from the shared cache, else `users.lookupByEmail`.
    async fn lookup_user(&self, token: &WorkspaceToken, email: &str) -> Result<String, SlackError> {
        if let Some(user) = self.users.get(&token.workspace, email).await {
            return Ok(user);
        }
        let reply = self
            .slack
            .call(
                "users.lookupByEmail",
                Some(&token.access_token),
                &Body::Form(&[("email", email)]),
            )
            .await?;
        let user = reply
            .pointer("/user/id")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(user) = &user {
            self.users.put(&token.workspace, email, user).await;
        }
        user.ok_or_else(|| SlackError {
            method: "users.lookupByEmail",
            code: "invalid_response".into(),
            detail: Some("no user.id in the reply".into()),
            failure: SlackFailure::Transient { retry_after: None },
        })
    }

    /// Claims a Slack target and posts it, rerouting as Slack's answer says.
    async fn slack_phase<'a>(
        &self,
        event: &Event,
        target: &Resolved<'a>,
        token: &Result<WorkspaceToken, SlackUnavailable>,
        default_channel: Option<&str>,
    ) -> SlackResult<'a> {
        let routed = target.routed;
        let (channel, token) = match (&target.action, token) {
            (Action::Fail { detail, retryable }, _) => {
                return SlackResult::Done(failed(&routed.target, detail.clone(), *retryable));
            }
            (Action::Email { addresses, reason }, _) => {
                let ticket = if matches!(routed.target, Target::Email(_)) {
                    None
                } else {
                    match self.claim(&event.id, &target.key).await {
                        Ok(ticket) => Some(ticket),
                        Err(status) => return SlackResult::Done(report(&routed.target, status)),
                    }
                };
                return SlackResult::NeedsEmail(PendingEmail {
                    routed,
                    ticket,
                    addresses: addresses.clone(),
                    reason: reason.clone(),
                    // Only the email can fail an email target; for a Slack
                    // target that falls back, Slack may come back.
                    transient: !matches!(routed.target, Target::Email(_)),
                });
            }
            (Action::Slack { channel }, Ok(token)) => (channel, token),
            (Action::Slack { .. }, Err(unavailable)) => {
                return SlackResult::Done(failed(
                    &routed.target,
                    unavailable.reason.clone(),
                    unavailable.transient,
                ));
            }
        };

        // The claim and the first rate-limit slot in one round trip.
        let claimed = self
            .limiter
            .claim_and_acquire(
                &token.workspace,
                channel,
                self.idempotency.ticket(&event.id, &target.key),
                self.idempotency.lease_ms(),
            )
            .await;
        let (ticket, first_wait) = match claimed {
            Ok((claim, wait)) => match claim_status(claim, &target.key) {
                Ok(ticket) => (ticket, wait),
                Err(status) => return SlackResult::Done(report(&routed.target, status)),
            },
            Err(e) => return SlackResult::Done(report(&routed.target, redis_failure(&e))),
        };
        let target_post = TargetPost {
            channel,
            token,
            default_channel,
            ticket: &ticket,
            first_wait,
        };
        match self.post(event, routed, target_post).await {
            Ok(to) => {
                self.complete(&ticket, &routed.target).await;
                info!(target = %routed.target, to = %to, "delivered");
                SlackResult::Done(report(&routed.target, TargetStatus::Delivered { to }))
            }
            Err(PostFailure::Deferred(wait)) => {
                self.release(&ticket).await;
                info!(target = %routed.target, ?wait, "rate limited; deferring");
                SlackResult::Done(report(&routed.target, TargetStatus::Deferred { wait }))
            }
            Err(PostFailure::Unavailable(unavailable)) => {
                warn!(target = %routed.target, reason = %unavailable.reason, "slack cannot take it; falling back to email");
                SlackResult::NeedsEmail(PendingEmail {
                    routed,
                    ticket: Some(ticket),
                    addresses: fallback_addresses(event, routed),
                    reason: Some(unavailable.reason),
                    transient: unavailable.transient,
                })
            }
        }
    }

    /// Posts to `channel`, handling destination and payload errors; returns
    /// where it landed, or why it did not.
    async fn post(
        &self,
        event: &Event,
        routed: &RoutedTarget,
        target: TargetPost<'_>,
    ) -> Result<String, PostFailure> {
        let TargetPost {
            channel,
            token,
            default_channel,
            ticket,
            first_wait,
        } = target;
        let context = RenderContext {
            rule: routed.rule.as_deref(),
            ..RenderContext::default()
        };
        let first_slot = match first_wait {
            None => Slot::Taken,
            Some(wait) => Slot::WaitFor(wait),
        };
        let error = match self
            .post_once(event, &context, channel, token, ticket, first_slot)
            .await
        {
            Ok(to) => return Ok(to),
            Err(AttemptFailure::Deferred(wait)) => return Err(PostFailure::Deferred(wait)),
            Err(AttemptFailure::Slack(e)) => e,
        };
        match error.failure {
            // A direct message that cannot be delivered must not land in a
            // shared channel: the person is emailed instead.
            SlackFailure::Destination if !matches!(routed.target, Target::SlackChannel(_)) => {
                Err(unavailable(&error))
            }
            SlackFailure::Destination => {
                if error.code == "not_in_channel" && self.join(channel, token).await {
                    match self
                        .post_once(event, &context, channel, token, ticket, Slot::Ask)
                        .await
                    {
                        Ok(to) => return Ok(to),
                        Err(AttemptFailure::Deferred(wait)) => {
                            return Err(PostFailure::Deferred(wait));
                        }
                        Err(AttemptFailure::Slack(e)) => {
                            warn!(channel, error = %e, "posting after joining failed");
                        }
                    }
                }
                let Some(default) = default_channel.filter(|d| *d != channel) else {
                    return Err(unavailable(&error));
                };
                let intended = format!("{} ({})", routed.target, error.code);
                let rerouted = RenderContext {
                    rule: routed.rule.as_deref(),
                    rerouted_from: Some(&intended),
                    plain_text: false,
                };
                warn!(channel, default, error = %error, "rerouting to the default channel");
                self.post_once(event, &rerouted, default, token, ticket, Slot::Ask)
                    .await
                    .map_err(give_up)
            }
            SlackFailure::Payload => {
                warn!(channel, error = %error, "slack refused the message layout; posting plain text");
                let plain = RenderContext {
                    plain_text: true,
                    ..context.clone()
                };
                self.post_once(event, &plain, channel, token, ticket, Slot::Ask)
                    .await
                    .map_err(give_up)
            }
            SlackFailure::TokenExpired => {
                // Rotation: refresh once (one replica at a time) and post again.
                match self.tokens.refresh(token).await {
                    Ok(fresh) => self
                        .post_once(event, &context, channel, &fresh, ticket, Slot::Ask)
                        .await
                        .map_err(give_up),
                    Err(e) => Err(PostFailure::Unavailable(SlackUnavailable {
                        reason: format!("Slack cannot take it: {error}, and {e}"),
                        transient: e.is_transient(),
                    })),
                }
            }
            SlackFailure::Workspace => {
                self.tokens.invalidate(&token.workspace);
                Err(unavailable(&error))
            }
            SlackFailure::Transient { .. } | SlackFailure::Other => Err(unavailable(&error)),
        }
    }

    /// One `chat.postMessage` through the shared rate limit. Waits inline up
    /// to `max_rate_limit_wait` in all; a 429 pauses the channel for every
    /// replica and goes back to waiting for a slot.
    async fn post_once(
        &self,
        event: &Event,
        context: &RenderContext<'_>,
        channel: &str,
        token: &WorkspaceToken,
        ticket: &ClaimTicket,
        first_slot: Slot,
    ) -> Result<String, AttemptFailure> {
        let payload = render(event, context).to(channel).to_json();
        let mut waited = Duration::ZERO;
        let mut slot = first_slot;
        loop {
            let acquired = match std::mem::replace(&mut slot, Slot::Ask) {
                Slot::Taken => Ok(None),
                Slot::WaitFor(wait) => Ok(Some(wait)),
                Slot::Ask => {
                    // Each attempt renews the claim, so a long chain (wait, post,
                    // join, post again, reroute) never outlives its lease.
                    if let Err(e) = self.idempotency.extend(ticket).await {
                        warn!(error = %e, "cannot renew the idempotency claim");
                    }
                    self.limiter.try_acquire(&token.workspace, channel).await
                }
            };
            match acquired {
                Ok(None) => {}
                Ok(Some(wait)) if waited + wait <= self.max_rate_limit_wait => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    continue;
                }
                Ok(Some(wait)) => return Err(AttemptFailure::Deferred(wait)),
                // Slack's own 429 still protects the channel; do not stall on Redis.
                Err(e) => warn!(error = %e, "cannot check the shared rate limit; posting anyway"),
            }
            let result = self
                .slack
                .call_leaving_rate_limits(
                    "chat.postMessage",
                    Some(&token.access_token),
                    &Body::JsonBytes(&payload),
                )
                .await;
            match result {
                Ok(reply) => {
                    let landed = reply
                        .get("channel")
                        .and_then(Value::as_str)
                        .unwrap_or(channel);
                    return Ok(format!("slack:{landed}"));
                }
                Err(e) if e.code == "ratelimited" => {
                    let pause = e
                        .retry_after()
                        .unwrap_or_else(|| honoured_retry_after(Duration::from_secs(1)));
                    warn!(
                        channel,
                        ?pause,
                        "slack rate-limited the channel; pausing it for every replica"
                    );
                    if let Err(redis) = self.limiter.pause(&token.workspace, channel, pause).await {
                        warn!(error = %redis, "cannot record the pause in Redis");
                    }
                    if waited + pause > self.max_rate_limit_wait {
                        return Err(AttemptFailure::Deferred(pause));
                    }
                    // Wait here too: the shared pause may not have been recorded.
                    tokio::time::sleep(pause).await;
                    waited += pause;
                }
                Err(e) => return Err(AttemptFailure::Slack(e)),
            }
        }
    }

    /// `conversations.join` for a public channel id; false when it cannot.
    async fn join(&self, channel: &str, token: &WorkspaceToken) -> bool {
        let body = serde_json::json!({ "channel": channel });
        match self
            .slack
            .call(
                "conversations.join",
                Some(&token.access_token),
                &Body::Json(&body),
            )
            .await
        {
            Ok(_) => {
                info!(channel, "joined the channel to post in it");
                true
            }
            Err(e) => {
                warn!(channel, error = %e, "cannot join the channel");
                false
            }
        }
    }

    /// Sends one email per distinct address, naming every target it stands in for.
    async fn email_phase(
        &self,
        event: &Event,
        pending: Vec<PendingEmail<'_>>,
    ) -> Vec<TargetReport> {
        if pending.is_empty() {
            return Vec::new();
        }
        // address → indexes of the pending targets that want it.
        let mut by_address: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, p) in pending.iter().enumerate() {
            for address in &p.addresses {
                by_address
                    .entry(address.to_lowercase())
                    .or_default()
                    .push(i);
            }
        }
        // Per pending target: Ok(delivered-to list) or the first failure.
        let mut outcomes: Vec<Result<Vec<String>, (String, bool)>> = pending
            .iter()
            .map(|p| {
                if p.addresses.is_empty() {
                    Err((
                        format!(
                            "{}; no email address to fall back to (set `email` on the rule or `defaults.email`)",
                            p.reason.as_deref().unwrap_or("Slack cannot take it")
                        ),
                        p.transient,
                    ))
                } else {
                    Ok(Vec::new())
                }
            })
            .collect();
        for (address, wanted_by) in &by_address {
            for &i in wanted_by {
                if let Some(ticket) = &pending[i].ticket {
                    let _ = self.idempotency.extend(ticket).await;
                }
            }
            let result = self
                .email_one(event, address, wanted_by.iter().map(|&i| &pending[i]))
                .await;
            for &i in wanted_by {
                match (&mut outcomes[i], &result) {
                    (Ok(sent), Ok(())) => sent.push(address.clone()),
                    (slot @ Ok(_), Err((detail, email_transient))) => {
                        let slack_reason =
                            pending[i].reason.as_deref().unwrap_or("routed to email");
                        *slot = Err((
                            format!("{slack_reason}; email to {address} failed too: {detail}"),
                            *email_transient || pending[i].transient,
                        ));
                    }
                    (Err(_), _) => {}
                }
            }
        }
        let mut reports = Vec::with_capacity(pending.len());
        for (p, outcome) in pending.iter().zip(outcomes) {
            match outcome {
                Ok(sent) => {
                    if let Some(ticket) = &p.ticket {
                        self.complete(ticket, &p.routed.target).await;
                    }
                    info!(target = %p.routed.target, to = ?sent, "delivered by email");
                    reports.push(report(
                        &p.routed.target,
                        TargetStatus::Delivered {
                            to: format!("email:{}", sent.join(",")),
                        },
                    ));
                }
                Err((detail, retryable)) => {
                    if let Some(ticket) = &p.ticket {
                        self.release(ticket).await;
                    }
                    warn!(target = %p.routed.target, %detail, "not delivered");
                    reports.push(failed(&p.routed.target, detail, retryable));
                }
            }
        }
        reports
    }

    /// Claims, sends and records one email to `address`.
    async fn email_one<'p, 'a: 'p>(
        &self,
        event: &Event,
        address: &str,
        wanted_by: impl Iterator<Item = &'p PendingEmail<'a>>,
    ) -> Result<(), (String, bool)> {
        let key = format!("email:{address}");
        let ticket = match self.idempotency.claim(&event.id, &key).await {
            Ok(Claim::Acquired(ticket)) => ticket,
            Ok(Claim::AlreadyDone) => return Ok(()),
            Ok(Claim::HeldElsewhere) => {
                return Err((
                    "another worker is sending this email right now".into(),
                    true,
                ));
            }
            Err(e) => return Err((format!("cannot check idempotency in Redis: {e}"), true)),
        };
        let wanted: Vec<&PendingEmail<'a>> = wanted_by.collect();
        let rule = wanted.iter().find_map(|p| p.routed.rule.as_deref());
        let reasons: Vec<String> = wanted
            .iter()
            .map(|p| match &p.reason {
                Some(reason) => format!("{}: {reason}", p.routed.target),
                None => format!("{}", p.routed.target),
            })
            .collect();
        let mut message = email::render(event, rule, &reasons.join("; "));
        message.to = vec![address.to_string()];
        match self.email.send(&message).await {
            Ok(()) => {
                if let Err(e) = self.idempotency.complete(&ticket).await {
                    warn!(%address, error = %e, "emailed, but could not record it in Redis");
                }
                Ok(())
            }
            Err(e) => {
                self.release(&ticket).await;
                Err((e.to_string(), e.is_transient()))
            }
        }
    }

    /// Claims `(event, key)`; without the claim, the status the target ends with.
    async fn claim(&self, event_id: &str, key: &str) -> Result<ClaimTicket, TargetStatus> {
        match self.idempotency.claim(event_id, key).await {
            Ok(claim) => claim_status(claim, key),
            Err(e) => Err(redis_failure(&e)),
        }
    }

    async fn complete(&self, ticket: &ClaimTicket, target: &Target) {
        for pause in [0, 50, 200] {
            // No sleep before the first try: even a zero sleep waits for the next timer tick.
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            match self.idempotency.complete(ticket).await {
                Ok(()) => return,
                Err(e) if pause == 200 => {
                    warn!(%target, error = %e, "sent, but could not record it in Redis; a redelivery after the claim lease may send it again");
                }
                Err(_) => {}
            }
        }
    }

    async fn release(&self, ticket: &ClaimTicket) {
        if let Err(e) = self.idempotency.release(ticket).await {
            warn!(error = %e, "could not release an idempotency claim; it expires by itself");
        }
    }
}

/// A claim as the target's status: ours to send, or why not.
fn claim_status(claim: Claim, key: &str) -> Result<ClaimTicket, TargetStatus> {
    match claim {
        Claim::Acquired(ticket) => Ok(ticket),
        Claim::AlreadyDone => {
            info!(key, "already delivered; not sending again");
            Err(TargetStatus::AlreadyDelivered)
        }
        Claim::HeldElsewhere => Err(TargetStatus::Failed {
            detail: "another worker is sending this right now".into(),
            retryable: true,
        }),
    }
}

fn redis_failure(error: &redis::RedisError) -> TargetStatus {
    TargetStatus::Failed {
        detail: format!("cannot check idempotency in Redis: {error}"),
        retryable: true,
    }
}

/// Where a target's email goes: its own address, else the rule's `email`,
/// else `defaults.email` (the router already merged those two).
fn fallback_addresses(event: &Event, routed: &RoutedTarget) -> Vec<String> {
    let own = match &routed.target {
        Target::Email(address) | Target::SlackEmail(address) => Some(address.clone()),
        Target::SlackUser(user) => event
            .assignee
            .as_ref()
            .filter(|a| a.slack_user.as_deref() == Some(user.as_str()))
            .and_then(|a| a.email.clone()),
        Target::SlackChannel(_) | Target::Assignee => None,
    };
    match own {
        Some(address) => vec![address],
        None => routed.fallback_emails.clone(),
    }
}

fn unavailable(error: &SlackError) -> PostFailure {
    PostFailure::Unavailable(SlackUnavailable {
        reason: format!("Slack cannot take it: {error}"),
        transient: error.is_transient(),
    })
}

fn give_up(failure: AttemptFailure) -> PostFailure {
    match failure {
        AttemptFailure::Slack(e) => unavailable(&e),
        AttemptFailure::Deferred(wait) => PostFailure::Deferred(wait),
    }
}

fn failed(target: &Target, detail: String, retryable: bool) -> TargetReport {
    report(target, TargetStatus::Failed { detail, retryable })
}

fn report(target: &Target, status: TargetStatus) -> TargetReport {
    let result = match &status {
        TargetStatus::Delivered { to } if to.starts_with("email:") => "emailed",
        TargetStatus::Delivered { .. } => "delivered",
        TargetStatus::AlreadyDelivered => "already_delivered",
        TargetStatus::Failed {
            retryable: true, ..
        } => "failed_retryable",
        TargetStatus::Failed {
            retryable: false, ..
        } => "failed",
        TargetStatus::Deferred { .. } => "deferred",
    };
    crate::telemetry::record_target(target.kind(), result);
    TargetReport {
        target: target.to_string(),
        kind: target.kind(),
        status,
    }
}
