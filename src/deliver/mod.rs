//! One event's delivery: resolve each routed target, skip what was already sent, send the rest, fall back to email.
//!
//! One event's path, top to bottom:
//! 1. [`Deliverer::deliver`] (here): the workspace token, then every target
//!    resolved ([`resolve`]: channel names to ids, emails to user ids), and
//!    targets that reach the same channel or person merged; the event
//!    joins its incident ([`incident`]), and an event with a single Slack
//!    target claims it and its first slot in the same round trip.
//! 2. [`post`]: per Slack target, the claim (idempotency) and a rate-limit
//!    slot (at once, or in its turn from the channel's queue in
//!    [`schedule`]: most severe first), then `chat.postMessage`; Slack's answers are turned into the next
//!    step by one pure function, [`policy::next_step`] (join, resolve again,
//!    default channel, plain text, refresh the token, wait, or give up).
//! 3. [`fallback`]: what Slack cannot take is emailed: the target's own
//!    address, else the rule's `email`, else `defaults.email`.
//!
//! The result is a [`DeliveryReport`] saying, per target, whether it is
//! settled. Nothing here touches the broker: [`crate::settle`] turns the
//! report into ack, delayed retry or dead-letter.

pub mod email;
mod fallback;
pub mod idempotency;
pub mod incident;
pub mod limit;
pub mod policy;
mod post;
mod resolve;
pub mod schedule;
pub mod slack;
mod thread;

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use futures_util::future::join_all;
use tracing::info;

use crate::event::{Event, Target};
use crate::redact::Addresses;
use crate::rules::Routing;
use email::EmailSender;
use idempotency::{Claim, ClaimTicket, Idempotency};
use incident::{Incidents, Preclaim};
use limit::RateLimiter;
use post::SlackResult;
use resolve::Resolved;
use schedule::Scheduler;
use slack::SlackClient;
use slack::channels::ChannelDirectory;
use slack::tokens::TokenStore;
use slack::users::UserDirectory;

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
    /// Nothing to do, and nothing to retry: an update of a message Slack
    /// no longer has (deleted, or its channel archived), say.
    Skipped { reason: String },
}

/// One target and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReport {
    /// The target as routed, e.g. `slack_channel:C0PAY`.
    pub target: String,
    /// The target's kind (`slack_channel`, `email`, …), for metrics.
    pub kind: &'static str,
    pub status: TargetStatus,
    /// Why it did not land at the target itself: the Slack failure behind
    /// an email fallback, or the Slack error that sent the post to the
    /// default channel. For people (`alert-router send-test`); `None` when
    /// it went where it was routed.
    pub note: Option<String>,
}

impl TargetReport {
    fn noting(self, note: Option<String>) -> TargetReport {
        TargetReport { note, ..self }
    }

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
                TargetStatus::Skipped { reason } => format!("{} skipped: {reason}", t.target),
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
    /// Incidents: first messages to thread under and update, and their state.
    incidents: Incidents,
    /// Escalation steps, scheduled when an incident starts.
    escalations: crate::escalation::Schedule,
    email: EmailSender,
    limiter: RateLimiter,
    /// Longest inline wait for a rate-limit slot before deferring through the broker.
    max_rate_limit_wait: Duration,
    /// Posts waiting for their channel's slots.
    scheduler: Scheduler,
    users: UserDirectory,
    channels: ChannelDirectory,
    /// How recipient addresses appear in log lines.
    addresses: Addresses,
}

/// What a [`Deliverer`] is built from.
pub struct DelivererParts {
    pub slack: SlackClient,
    pub tokens: TokenStore,
    pub idempotency: Idempotency,
    pub incidents: Incidents,
    pub escalations: crate::escalation::Schedule,
    pub email: EmailSender,
    pub limiter: RateLimiter,
    pub max_rate_limit_wait: Duration,
    pub users: UserDirectory,
    pub channels: ChannelDirectory,
    pub addresses: Addresses,
}

/// Why Slack could not take a target, and whether it may work later.
struct SlackUnavailable {
    reason: String,
    transient: bool,
}

impl Deliverer {
    pub fn new(parts: DelivererParts) -> Deliverer {
        let DelivererParts {
            slack,
            tokens,
            idempotency,
            incidents,
            escalations,
            email,
            limiter,
            max_rate_limit_wait,
            users,
            channels,
            addresses,
        } = parts;
        Deliverer {
            slack,
            tokens,
            idempotency,
            incidents,
            escalations,
            email,
            scheduler: Scheduler::new(limiter.clone()),
            limiter,
            max_rate_limit_wait,
            users,
            channels,
            addresses,
        }
    }

    /// Delivers `event` to every target of `routing`; `default_channel` takes
    /// posts whose channel is gone or archived. `waited_enough`: the event
    /// has waited for Slack's rate limits for `delivery.max_rate_limit_deferral`
    /// already, so a target Slack still has no room for goes to email.
    pub async fn deliver(
        &self,
        event: &Event,
        routing: &Routing,
        default_channel: Option<&str>,
        waited_enough: bool,
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
            Err(e) if e.is_redis() => {
                // Without Redis there is no idempotency either: wait for it.
                return all_failed(routing, &e.to_string());
            }
            // A token that lapsed while nothing was sent is refreshed on the
            // first event after; Slack rate-limiting that exchange is a wait
            // like any other rate limit: no attempt spent, no email.
            Err(e) if let Some(wait) = e.rate_limited().filter(|_| !waited_enough) => {
                info!(error = %e, ?wait, "token refresh rate limited; deferring the event");
                return all_deferred(routing, wait);
            }
            // Slack failing the refresh is Slack unavailable: email now, as
            // when a post fails, and a retry later if email fails too.
            Err(e) => Err(SlackUnavailable {
                reason: e.to_string(),
                transient: e.is_transient(),
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

        // The incident: where its first messages are, and what this event changes.
        let incident_key = event.incident_key();
        // An event with a single Slack target (the usual case) claims it,
        // and takes its first slot, in the same round trip.
        let mut preclaimed = None;
        let observed = match &token {
            Ok(token) => {
                let observing = match resolved.as_slice() {
                    [
                        only @ Resolved {
                            action: resolve::Action::Slack(destination),
                            ..
                        },
                    ] => {
                        let budget = destination.budget(&destination.channel);
                        let preclaim = Preclaim {
                            ticket: self.idempotency.ticket(&event.id, &only.key),
                            lease_ms: self.idempotency.lease_ms(),
                            slot: (!self.scheduler.is_busy(&token.workspace, budget))
                                .then(|| self.limiter.slot_request(&token.workspace, budget)),
                            channel: &destination.channel,
                        };
                        self.incidents
                            .observe_and_claim(
                                &token.workspace,
                                &incident_key,
                                event,
                                &only.dedupe,
                                preclaim,
                            )
                            .await
                            .map(|(observed, claimed)| {
                                preclaimed = claimed;
                                observed
                            })
                    }
                    _ => {
                        let destinations: Vec<&str> = resolved
                            .iter()
                            .filter(|t| matches!(t.action, resolve::Action::Slack(_)))
                            .map(|t| t.dedupe.as_str())
                            .collect();
                        self.incidents
                            .observe(&token.workspace, &incident_key, event, &destinations)
                            .await
                    }
                };
                match observing {
                    Ok(observed) => Some(observed),
                    Err(e) => {
                        return all_failed(routing, &e.to_string());
                    }
                }
            }
            Err(_) => None,
        };
        // The first event of an incident starts its rules' escalation chains.
        if let (Some(observed), Ok(token)) = (&observed, &token)
            && observed.is_first
            && event.incident_state() == crate::event::IncidentState::Open
            && !routing.escalations.is_empty()
            && let Err(e) = self
                .escalations
                .schedule(
                    &token.workspace,
                    &incident_key,
                    observed.incident.first_at_ms,
                    &routing.escalations,
                )
                .await
        {
            if let Some((Claim::Acquired(ticket) | Claim::AcquiredAfterCrash { ticket, .. }, _)) =
                &preclaimed
            {
                // Nothing was sent: a retry claims afresh.
                self.release(ticket, false).await;
            }
            return all_failed(routing, &e.to_string());
        }
        let plans = thread::plans(
            &resolved,
            observed.as_ref(),
            token.as_ref().ok().map(|t| t.workspace.as_str()),
            &incident_key,
            routing.escalated_after.as_deref(),
        );

        // Only a single target can hold a claim taken with the observation.
        let token = &token;
        let preclaimed = &mut preclaimed;
        let mut phase = move |target, plan| {
            self.slack_phase(
                event,
                target,
                token,
                default_channel,
                waited_enough,
                plan,
                preclaimed.take(),
            )
        };
        // The usual single target is awaited in place: `join_all` would move
        // its large future into a vector first.
        let results = match (resolved.as_slice(), plans.as_slice()) {
            ([target], [plan]) => vec![phase(target, plan.as_ref()).await],
            _ => {
                join_all(
                    resolved
                        .iter()
                        .zip(&plans)
                        .map(|(t, p)| phase(t, p.as_ref())),
                )
                .await
            }
        };
        let mut reports = Vec::with_capacity(results.len());
        let mut pending = Vec::new();
        for result in results {
            match result {
                SlackResult::Done(report) => reports.push(report),
                SlackResult::NeedsEmail(email) => pending.push(email),
            }
        }
        reports.extend(self.email_phase(event, pending).await);
        if let (Some(observed), Ok(token)) = (&observed, &token)
            && event.incident_state() != crate::event::IncidentState::Open
        {
            reports.extend(
                self.update_first_messages(observed, token, &incident_key)
                    .await,
            );
        }
        DeliveryReport { targets: reports }
    }
}

/// An earlier attempt whose holder vanished before recording its outcome.
struct LostAttempt {
    /// When it claimed the target (Unix ms, Redis's clock).
    since_ms: u64,
    /// Where it was posting instead of the target's channel, if it had rerouted.
    rerouted_to: Option<String>,
}

/// A claim as the target's status: ours to send (with the earlier, vanished
/// holder's attempt, if one did), or why not.
fn claim_status(
    claim: Claim,
    key: &str,
    addresses: Addresses,
) -> Result<(ClaimTicket, Option<LostAttempt>), TargetStatus> {
    match claim {
        Claim::Acquired(ticket) => Ok((ticket, None)),
        Claim::AcquiredAfterCrash {
            ticket,
            since_ms,
            rerouted_to,
        } => Ok((
            ticket,
            Some(LostAttempt {
                since_ms,
                rerouted_to,
            }),
        )),
        Claim::AlreadyDone => {
            // Keys of email targets hold the address.
            info!(key = %addresses.text(key), "already delivered; not sending again");
            Err(TargetStatus::AlreadyDelivered)
        }
        // A live peer is sending it: wait for its lease instead of spending
        // an attempt (a dead peer's lease lapses within `delivery.claim_lease`).
        Claim::HeldElsewhere { remaining } => {
            info!(
                key = %addresses.text(key),
                ?remaining,
                "another worker holds this target; waiting for it"
            );
            Err(TargetStatus::Deferred {
                wait: remaining.max(Duration::from_millis(100)),
            })
        }
    }
}

/// Every target of `routing` waits `wait` for Slack before anything is sent.
fn all_deferred(routing: &Routing, wait: Duration) -> DeliveryReport {
    DeliveryReport {
        targets: routing
            .targets
            .iter()
            .map(|r| report(&r.target, TargetStatus::Deferred { wait }))
            .collect(),
    }
}

/// Every target of `routing` failed for one reason that may pass (Redis).
fn all_failed(routing: &Routing, detail: &str) -> DeliveryReport {
    DeliveryReport {
        targets: routing
            .targets
            .iter()
            .map(|r| failed(&r.target, detail.to_string(), true))
            .collect(),
    }
}

fn redis_failure(error: &redis::RedisError) -> TargetStatus {
    TargetStatus::Failed {
        detail: format!("cannot check idempotency in Redis: {error}"),
        retryable: true,
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
        TargetStatus::Skipped { .. } => "skipped",
    };
    crate::telemetry::record_target(target.kind(), result);
    TargetReport {
        target: target.to_string(),
        kind: target.kind(),
        status,
        note: None,
    }
}
