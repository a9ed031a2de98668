//! Step 2 of a delivery: one Slack target claimed, paced, posted, and Slack's answer followed.
//!
//! The claim (idempotency) and the first rate-limit slot are one Redis
//! round trip; for an event with one Slack target they come with the
//! incident's record, taken before this step. The claim is renewed while the post runs, so a crashed
//! worker's claim frees within `delivery.claim_lease`; a claim held by a
//! live peer is a wait, never a failed attempt. A claim left by a holder that
//! vanished mid-send is checked against the channel's history first, so a
//! post Slack accepted just before a crash is recorded, not repeated.
//!
//! Every failure goes through [`policy::next_step`]; this file only carries
//! the steps out.

use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use serde_json::Value;
use tracing::{info, warn};

use super::fallback::{PendingEmail, fallback_addresses};
use super::idempotency::Claim;
use super::idempotency::ClaimTicket;
use super::incident::{FirstMessage, FirstPost};
use super::limit::Slot;
use super::policy::{self, Method, Step, TargetKind, Tried};
use super::resolve::{Action, Resolved, SlackDestination};
use super::schedule::{Priority, Turn};
use super::slack::channels::{Destination, Resolution};
use super::slack::client::Posted;
use super::slack::message::{RenderContext, render};
use super::slack::tokens::WorkspaceToken;
use super::slack::{Body, SlackError, SlackFailure};
use super::thread::ThreadPlan;
use super::{
    Deliverer, LostAttempt, SlackUnavailable, TargetReport, TargetStatus, claim_status, failed,
    redis_failure, report,
};
use crate::event::Event;

/// What the Slack phase did with one target.
pub(super) enum SlackResult<'a> {
    Done(TargetReport),
    NeedsEmail(PendingEmail<'a>),
}

/// Why a post did not go out.
enum PostFailure {
    /// Slack cannot take it: fall back to email.
    Unavailable(SlackUnavailable),
    /// Slack asked to wait longer than a delivery may be held: try later.
    Deferred(Duration),
}

/// One `chat.postMessage` call's failure.
enum AttemptFailure {
    Slack(SlackError),
    Deferred(Duration),
}

/// The most steps one target may take (each recovery is tried once; this
/// only guards against a policy change that would loop).
const MAX_STEPS: usize = 12;
/// How far before the lost attempt's claim the history search starts
/// (clock differences between Redis and Slack).
const HISTORY_SLACK: Duration = Duration::from_secs(60);
/// How long after an unsure answer, with no retry left, the post is looked
/// for: long enough for a message Slack took to show in the history.
const UNSURE_LOOK_DELAY: Duration = Duration::from_millis(500);
/// Messages per page of the history search: the most Slack returns, so that
/// one call of the workspace's Tier 3 budget almost always covers the lost
/// attempt (at Slack's pace of a post a second, 999 messages are a quarter
/// of an hour of this channel).
const HISTORY_PAGE: &str = "999";
/// Pages of the history search: Slack returns the newest messages first, so
/// in a busy channel the lost post can be further down. Past this many the
/// worker cannot tell, and posts.
const HISTORY_MAX_PAGES: usize = 5;

/// What looking for a post in the conversation's history found.
enum Lookup {
    Found(Landed),
    NotThere,
    /// Slack could not answer, or not well enough to tell (logged).
    CannotCheck,
    /// The history's allowance is spent for this long.
    Wait(Duration),
}

/// How a search through history pages ended.
enum PageSearch {
    Found(Value),
    NotThere,
    /// [`HISTORY_MAX_PAGES`] read without reaching the lost attempt's start.
    TooMany,
}

/// Where a post landed.
struct Landed {
    channel: String,
    /// The message's `ts` (absent when a lost post was found by another way).
    ts: Option<String>,
    /// A new top-level message (not a reply): the incident's first message
    /// at this destination from now on.
    top_level: bool,
    /// The error that sent the post to the default channel, if one did.
    rerouted_by: Option<String>,
}

impl Landed {
    fn to(&self) -> String {
        format!("slack:{}", self.channel)
    }
}

impl Deliverer {
    /// Claims a Slack target and posts it, following Slack's answers: the
    /// first message of its incident there, or a reply in that message's
    /// thread (`plan`, when the incident is tracked).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn slack_phase<'a>(
        &self,
        event: &Event,
        target: &Resolved<'a>,
        token: &Result<WorkspaceToken, SlackUnavailable>,
        default_channel: Option<&str>,
        waited_enough: bool,
        plan: Option<&ThreadPlan<'_>>,
        preclaimed: Option<(Claim, Slot)>,
    ) -> SlackResult<'a> {
        let mut plan = plan.cloned();
        // Another delivery is posting the message this one replies under.
        if let Some(p) = plan.as_mut()
            && p.first == FirstPost::InFlight
        {
            match self.wait_for_first_post(p).await {
                Ok(found) => p.first = found,
                Err(wait) => {
                    return SlackResult::Done(report(
                        &target.routed.target,
                        TargetStatus::Deferred { wait },
                    ));
                }
            }
        }
        let result = self
            .post_target(
                event,
                target,
                token,
                default_channel,
                waited_enough,
                plan.as_ref(),
                preclaimed,
            )
            .await;
        if let Some(p) = &plan {
            match &result {
                SlackResult::Done(r) if matches!(r.status, TargetStatus::Delivered { .. }) => {}
                SlackResult::Done(_) => self.first_post_not_made(p, false).await,
                SlackResult::NeedsEmail(_) => self.first_post_not_made(p, true).await,
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn post_target<'a>(
        &self,
        event: &Event,
        target: &Resolved<'a>,
        token: &Result<WorkspaceToken, SlackUnavailable>,
        default_channel: Option<&str>,
        waited_enough: bool,
        plan: Option<&ThreadPlan<'_>>,
        preclaimed: Option<(Claim, Slot)>,
    ) -> SlackResult<'a> {
        let routed = target.routed;
        // Rate limits that outlast `delivery.max_rate_limit_deferral` count as
        // Slack being unavailable: email instead of waiting for ever.
        let too_long = |wait: Duration| SlackUnavailable {
            reason: format!(
                "Slack has had no room for it for longer than delivery.max_rate_limit_deferral (asked to wait {wait:?} more)"
            ),
            transient: true,
        };
        // A lookup Slack keeps rate-limiting past the limit: email it.
        let waited_out;
        let action = match &target.action {
            Action::Wait(wait) if waited_enough => {
                let addresses = fallback_addresses(event, routed);
                waited_out = if addresses.is_empty() {
                    Action::Fail {
                        detail: too_long(*wait).reason,
                        retryable: true,
                    }
                } else {
                    Action::Email {
                        addresses,
                        reason: Some(too_long(*wait).reason),
                    }
                };
                &waited_out
            }
            other => other,
        };
        let (destination, token) = match (action, token) {
            (Action::Fail { detail, retryable }, _) => {
                return SlackResult::Done(failed(&routed.target, detail.clone(), *retryable));
            }
            (Action::Wait(wait), _) => {
                info!(target = %self.addresses.target(&routed.target), ?wait, "slack asked to wait; deferring");
                return SlackResult::Done(report(
                    &routed.target,
                    TargetStatus::Deferred { wait: *wait },
                ));
            }
            (Action::Email { addresses, reason }, _) => {
                let ticket: Option<ClaimTicket> =
                    if matches!(routed.target, crate::event::Target::Email(_)) {
                        None
                    } else {
                        match self.idempotency.claim(&event.id, &target.key).await {
                            Ok(claim) => match claim_status(claim, &target.key, self.addresses) {
                                Ok((ticket, _)) => Some(ticket),
                                Err(status) => {
                                    return SlackResult::Done(report(&routed.target, status));
                                }
                            },
                            Err(e) => {
                                return SlackResult::Done(report(
                                    &routed.target,
                                    redis_failure(&e),
                                ));
                            }
                        }
                    };
                return SlackResult::NeedsEmail(PendingEmail {
                    routed,
                    _lease: ticket.as_ref().map(|t| self.idempotency.keep_alive(t)),
                    ticket,
                    addresses: addresses.clone(),
                    reason: reason.clone(),
                    // Only the email can fail an email target; for a Slack
                    // target that falls back, Slack may come back.
                    transient: !matches!(routed.target, crate::event::Target::Email(_)),
                    may_have_sent: false,
                });
            }
            (Action::Slack(destination), Ok(token)) => (destination, token),
            (Action::Slack(_), Err(unavailable)) => {
                return SlackResult::Done(failed(
                    &routed.target,
                    unavailable.reason.clone(),
                    unavailable.transient,
                ));
            }
        };

        // The slot taken with the claim is the routed channel's budget.
        let routed_budget = destination.budget(&destination.channel);
        // A reply goes where the first message is (a DM's `D…` id, say).
        let replying;
        let destination = match plan.and_then(ThreadPlan::parent) {
            Some(parent) => {
                replying = SlackDestination {
                    channel: parent.channel.clone(),
                    ..destination.clone()
                };
                &replying
            }
            None => destination,
        };
        let budget = destination.budget(&destination.channel);

        // Its place in the channel's queue, should it have to wait.
        let priority = self.scheduler.priority(event.severity);
        // The claim and the first rate-limit slot in one round trip, unless
        // posts already wait for this channel: then it queues behind them.
        let claimed = if let Some((claim, slot)) = preclaimed {
            // Taken with the incident's record ([`super::incident::Incidents::observe_and_claim`]).
            let slot = if budget == routed_budget {
                slot
            } else {
                Slot::Ask
            };
            Ok((claim, slot))
        } else if self.scheduler.is_busy(&token.workspace, budget) {
            self.idempotency
                .claim(&event.id, &target.key)
                .await
                .map(|claim| (claim, Slot::Ask))
        } else {
            self.limiter
                .claim_and_acquire(
                    &token.workspace,
                    budget,
                    self.idempotency.ticket(&event.id, &target.key),
                    self.idempotency.lease_ms(),
                )
                .await
                .map(|(claim, wait)| (claim, wait.map_or(Slot::Taken, Slot::WaitFor)))
        };
        let (ticket, lost_attempt, first_slot) = match claimed {
            Ok((claim, slot)) => match claim_status(claim, &target.key, self.addresses) {
                Ok((ticket, lost_attempt)) => (ticket, lost_attempt, slot),
                Err(status) => return SlackResult::Done(report(&routed.target, status)),
            },
            Err(e) => return SlackResult::Done(report(&routed.target, redis_failure(&e))),
        };
        // Renewed while this target is in hand; a crash stops the renewals.
        let lease = self.idempotency.keep_alive(&ticket);

        if let Some(lost) = lost_attempt {
            match self
                .look_for_post(
                    event,
                    &routed.target.to_string(),
                    destination,
                    plan.and_then(ThreadPlan::parent).map(|p| p.ts.as_str()),
                    token,
                    &lost,
                    self.tier_wait(),
                )
                .await
            {
                Lookup::Found(landed) => {
                    self.complete_posted(&ticket, &routed.target, plan, &landed)
                        .await;
                    info!(target = %self.addresses.target(&routed.target), to = %landed.to(), "a worker that crashed had posted this; recorded, not posted again");
                    return SlackResult::Done(report(
                        &routed.target,
                        TargetStatus::Delivered { to: landed.to() },
                    ));
                }
                Lookup::NotThere | Lookup::CannotCheck => {}
                // Slack has made the event wait long enough already (a
                // history allowance of one call a minute, say): posting
                // without the check beats deferring it again and again.
                Lookup::Wait(wait) if waited_enough => {
                    warn!(target = %self.addresses.target(&routed.target), ?wait, "cannot check whether a crashed worker had posted this before the event's deferral limit; posting (a duplicate is possible)");
                }
                Lookup::Wait(wait) => {
                    self.release(&ticket, true).await;
                    return SlackResult::Done(report(
                        &routed.target,
                        TargetStatus::Deferred { wait },
                    ));
                }
            }
        }

        let mut may_have_sent = false;
        let outcome = self
            .post(
                event,
                &routed.target.to_string(),
                routed.rule.as_deref(),
                destination,
                token,
                default_channel,
                &ticket,
                first_slot,
                priority,
                plan,
                &mut may_have_sent,
            )
            .await;
        match outcome {
            Ok(landed) => {
                self.complete_posted(&ticket, &routed.target, plan, &landed)
                    .await;
                let to = landed.to();
                info!(target = %self.addresses.target(&routed.target), rule = routed.rule.as_deref().unwrap_or(""), to = %to, thread = landed_in_thread(plan, &landed), "delivered");
                SlackResult::Done(
                    report(&routed.target, TargetStatus::Delivered { to })
                        .noting(landed.rerouted_by),
                )
            }
            Err(PostFailure::Deferred(wait)) if waited_enough => {
                let unavailable = too_long(wait);
                warn!(target = %self.addresses.target(&routed.target), reason = %self.addresses.text(&unavailable.reason), "falling back to email");
                SlackResult::NeedsEmail(PendingEmail {
                    routed,
                    ticket: Some(ticket),
                    addresses: fallback_addresses(event, routed),
                    reason: Some(unavailable.reason),
                    transient: true,
                    may_have_sent,
                    _lease: Some(lease),
                })
            }
            Err(PostFailure::Deferred(wait)) => {
                self.release(&ticket, may_have_sent).await;
                info!(target = %self.addresses.target(&routed.target), ?wait, "rate limited; deferring");
                SlackResult::Done(report(&routed.target, TargetStatus::Deferred { wait }))
            }
            Err(PostFailure::Unavailable(unavailable)) => {
                warn!(target = %self.addresses.target(&routed.target), reason = %self.addresses.text(&unavailable.reason), "slack cannot take it; falling back to email");
                SlackResult::NeedsEmail(PendingEmail {
                    routed,
                    ticket: Some(ticket),
                    addresses: fallback_addresses(event, routed),
                    reason: Some(unavailable.reason),
                    transient: unavailable.transient,
                    may_have_sent,
                    _lease: Some(lease),
                })
            }
        }
    }

    /// Posts to the destination, following [`policy::next_step`] until the
    /// post lands or there is nothing left to try; returns where it landed.
    #[allow(clippy::too_many_arguments)]
    async fn post(
        &self,
        event: &Event,
        target: &str,
        rule: Option<&str>,
        destination: &SlackDestination,
        token: &WorkspaceToken,
        default_channel: Option<&str>,
        ticket: &ClaimTicket,
        first_slot: Slot,
        priority: Priority,
        plan: Option<&ThreadPlan<'_>>,
        may_have_sent: &mut bool,
    ) -> Result<Landed, PostFailure> {
        let emailed_note = plan.and_then(ThreadPlan::emailed_note);
        let mut token = token.clone();
        let mut channel = destination.channel.clone();
        let mut tried = destination.tried();
        let mut plain_text = false;
        let mut without_metadata = false;
        let mut rerouted_from: Option<String> = None;
        let mut slot = first_slot;
        let mut waited = Duration::ZERO;
        // The first failure that sent the post elsewhere, for the final reason.
        let mut first_error: Option<SlackError> = None;
        // When the last post was sent (Unix ms), and when the first one
        // whose outcome is unknown was: where to look for it.
        let mut sent_at_ms = 0;
        let mut unsure_since_ms: Option<u64> = None;
        // Posting again after an answer that may follow a done post, as the
        // client retries what certainly did not happen.
        let mut unsure_retries = self.slack.retry_delays();
        // Cleared when Slack cannot answer the check (an outage): the
        // retries then go without it.
        let mut history_answers = true;
        let mut pending_error = if destination.missing {
            // The name exists nowhere the bot can see: as if Slack said so.
            Some(SlackError::new(
                "chat.postMessage",
                "channel_not_found",
                SlackFailure::Destination,
            ))
        } else {
            None
        };

        for _ in 0..MAX_STEPS {
            let error = match pending_error.take() {
                Some(error) => error,
                None => {
                    let context = RenderContext {
                        rule,
                        rerouted_from: rerouted_from.as_deref(),
                        plain_text,
                        without_metadata,
                        target,
                        incident: plan.map(ThreadPlan::incident),
                        emailed_note: emailed_note.as_deref(),
                        escalation: plan.and_then(|p| p.escalated_after),
                        // A reply says what its event says; a first message
                        // shows where the incident stands.
                        status: plan.filter(|p| p.parent().is_none()).and_then(|p| p.status),
                    };
                    sent_at_ms = unix_ms_now();
                    // In the thread while the post goes where its parent is.
                    let thread = plan
                        .and_then(|p| p.parent().map(|parent| (parent, p.rose)))
                        .filter(|(parent, _)| parent.channel == channel && !tried.without_thread)
                        .map(|(parent, rose)| (parent.ts.as_str(), rose));
                    match self
                        .post_once(
                            event,
                            &context,
                            (&channel, destination.budget(&channel), thread),
                            &token,
                            (slot, priority),
                            &mut waited,
                        )
                        .await
                    {
                        Ok(landed) => {
                            return Ok(Landed {
                                rerouted_by: first_error.as_ref().map(ToString::to_string),
                                ..landed
                            });
                        }
                        Err(AttemptFailure::Deferred(wait)) => {
                            return Err(PostFailure::Deferred(wait));
                        }
                        Err(AttemptFailure::Slack(error)) => error,
                    }
                }
            };
            slot = Slot::Ask;
            if error.may_have_landed() {
                *may_have_sent = true;
                let since_ms = *unsure_since_ms.get_or_insert(sent_at_ms);
                let retry_after = unsure_retries.next();
                tokio::time::sleep(retry_after.unwrap_or(UNSURE_LOOK_DELAY)).await;
                // Slack may have taken it: look before posting again, and
                // before giving up on Slack. Only with history allowance to
                // spare now and while Slack answers the check: an alert is
                // not held back to avoid a possible duplicate.
                let lookup = if history_answers {
                    let lost = LostAttempt {
                        since_ms,
                        rerouted_to: (channel != destination.channel).then(|| channel.clone()),
                    };
                    let parent = plan
                        .and_then(ThreadPlan::parent)
                        .filter(|parent| parent.channel == channel && !tried.without_thread)
                        .map(|parent| parent.ts.as_str());
                    self.look_for_post(
                        event,
                        target,
                        destination,
                        parent,
                        &token,
                        &lost,
                        Duration::ZERO,
                    )
                    .await
                } else {
                    Lookup::CannotCheck
                };
                match lookup {
                    Lookup::Found(landed) => {
                        info!(target = %self.addresses.text(target), error = %error, "Slack had taken the post despite the error; not posting again");
                        return Ok(Landed {
                            rerouted_by: first_error.as_ref().map(ToString::to_string),
                            ..landed
                        });
                    }
                    Lookup::NotThere => {}
                    Lookup::CannotCheck => history_answers = false,
                    Lookup::Wait(wait) => {
                        warn!(target = %self.addresses.text(target), ?wait, error = %error, "cannot check now whether Slack had taken the post (the history's allowance is spent); a duplicate is possible");
                    }
                }
                if retry_after.is_some() {
                    continue;
                }
            }
            let step = policy::next_step(Method::PostMessage, destination.kind, &error, tried);
            match step {
                Step::Wait(wait) => return Err(PostFailure::Deferred(wait)),
                Step::RefreshToken => {
                    tried.refreshed_token = true;
                    token = self.refreshed(&token, &error).await?;
                }
                Step::JoinAndPost => {
                    tried.joined = true;
                    if let Err(join_error) = self.join(&channel, &token).await {
                        warn!(channel, error = %join_error, "cannot join the channel");
                        match policy::next_step(Method::Join, destination.kind, &join_error, tried)
                        {
                            Step::Wait(wait) => return Err(PostFailure::Deferred(wait)),
                            // Expired between the post and the join: refreshed,
                            // then the post (and, still outside, the join) again.
                            Step::RefreshToken => {
                                tried.refreshed_token = true;
                                tried.joined = false;
                                token = self.refreshed(&token, &join_error).await?;
                            }
                            Step::PostToDefaultChannel => {
                                // Reroute for the post's error, naming why.
                                pending_error = Some(SlackError::new(
                                    "chat.postMessage",
                                    error.code.clone(),
                                    SlackFailure::Destination,
                                ));
                                tried.joined = true;
                                tried.have_channel_id = false;
                            }
                            _ => return Err(unavailable(&join_error)),
                        }
                    }
                }
                Step::ResolveAgain => {
                    tried.resolved_again = true;
                    let name = destination.name.as_deref().unwrap_or_default();
                    match self.channels.resolve_again(&token, name, &channel).await {
                        Ok(Resolution::Id(id)) => {
                            info!(name, old = %channel, new = %id, "the channel's id changed; posting to the new one");
                            channel = id;
                        }
                        Ok(_) => pending_error = Some(error.clone()),
                        Err(e) => {
                            warn!(name, error = %e, "cannot resolve the channel name again");
                            pending_error = Some(error.clone());
                        }
                    }
                }
                Step::PostToDefaultChannel => {
                    let Some(default) = self.default_channel_id(&token, default_channel).await
                    else {
                        return Err(unavailable(&error));
                    };
                    if default == channel {
                        return Err(unavailable(&error));
                    }
                    warn!(channel, default, error = %error, "rerouting to the default channel");
                    // A worker taking over after a crash must look there.
                    if let Err(e) = self.idempotency.note_reroute(ticket, &default).await {
                        warn!(error = %e, "cannot note the reroute on the claim");
                    }
                    rerouted_from = Some(format!("{target} ({})", error.code));
                    first_error.get_or_insert(error);
                    channel = default;
                    // A fresh start at the new channel, keeping what is not about the channel.
                    tried = Tried {
                        at_default_channel: true,
                        refreshed_token: tried.refreshed_token,
                        plain_text: tried.plain_text,
                        without_metadata: tried.without_metadata,
                        ..SlackDestination {
                            channel: channel.clone(),
                            kind: TargetKind::Channel,
                            name: None,
                            missing: false,
                            person: None,
                        }
                        .tried()
                    };
                }
                Step::PostPlainText => {
                    warn!(channel, error = %error, "slack refused the message layout; posting plain text");
                    tried.plain_text = true;
                    plain_text = true;
                }
                Step::PostWithoutThread => {
                    warn!(channel, error = %error, "the incident's thread is gone; posting a new message");
                    tried.without_thread = true;
                }
                Step::PostWithoutMetadata => {
                    warn!(channel, error = %error, "slack refused the message metadata; posting without it");
                    tried.without_metadata = true;
                    without_metadata = true;
                }
                Step::EmailPerson
                | Step::SlackUnavailable { .. }
                | Step::PostByName
                | Step::PostWithoutCheck => {
                    if error.failure == SlackFailure::Workspace {
                        self.tokens.invalidate(&token.workspace);
                    }
                    let error = match first_error {
                        Some(first) if tried.at_default_channel => {
                            return Err(PostFailure::Unavailable(SlackUnavailable {
                                reason: format!(
                                    "Slack cannot take it: {first}; the default channel neither: {error}"
                                ),
                                transient: error.is_transient(),
                            }));
                        }
                        _ => error,
                    };
                    return Err(unavailable(&error));
                }
            }
        }
        Err(PostFailure::Unavailable(SlackUnavailable {
            reason: "Slack cannot take it: too many steps".into(),
            transient: true,
        }))
    }

    /// One `chat.postMessage` through the shared rate limit. Without a slot
    /// in hand it waits its turn in the channel's queue, up to
    /// `max_rate_limit_wait` in all (`waited` carries the total across
    /// calls); a 429 pauses the channel for every replica and goes back to
    /// waiting for a slot. `budget` is the channel's rate-limit key
    /// ([`SlackDestination::budget`]).
    async fn post_once(
        &self,
        event: &Event,
        context: &RenderContext<'_>,
        (channel, budget, thread): (&str, &str, Option<(&str, bool)>),
        token: &WorkspaceToken,
        (first_slot, priority): (Slot, Priority),
        waited: &mut Duration,
    ) -> Result<Landed, AttemptFailure> {
        let mut message = render(event, context).to(channel);
        if let Some((ts, broadcast)) = thread {
            message = message.in_thread(ts, broadcast);
        }
        let payload = message.to_json();
        let mut slot = first_slot;
        loop {
            let patience = self.max_rate_limit_wait.saturating_sub(*waited);
            match std::mem::replace(&mut slot, Slot::Ask) {
                Slot::Taken => {}
                Slot::WaitFor(wait) if wait > patience => {
                    return Err(AttemptFailure::Deferred(wait));
                }
                Slot::WaitFor(_) | Slot::Ask => {
                    let asked = tokio::time::Instant::now();
                    let turn = self
                        .scheduler
                        .turn(&token.workspace, budget, priority, patience)
                        .await;
                    *waited += asked.elapsed();
                    if let Turn::Defer(wait) = turn {
                        return Err(AttemptFailure::Deferred(wait));
                    }
                }
            }
            let result = self
                .slack
                .call_once_sure::<Posted>(
                    "chat.postMessage",
                    Some(&token.access_token),
                    &Body::JsonBytes(&payload),
                )
                .await;
            match result {
                Ok(reply) => {
                    return Ok(Landed {
                        // A reply whose parent is gone may be taken as a
                        // channel message (`ok`, no `message.thread_ts`)
                        // rather than refused: then it is the first message.
                        top_level: thread.is_none() || reply.echoed_top_level(),
                        channel: reply.channel.unwrap_or_else(|| channel.to_string()),
                        ts: reply.ts,
                        // Set by `post`, which knows why it is posting here.
                        rerouted_by: None,
                    });
                }
                Err(e) if e.is_rate_limited() => {
                    let key = self.limiter.channel_pause_key(&token.workspace, budget);
                    if let Err(pause) = self
                        .limiter
                        .wait_out_429(key, &e, waited, self.max_rate_limit_wait)
                        .await
                    {
                        return Err(AttemptFailure::Deferred(pause));
                    }
                }
                Err(e) => return Err(AttemptFailure::Slack(e)),
            }
        }
    }

    /// One call of a tiered method (`conversations.join`, `.open`, `.history`,
    /// `users.lookupByEmail`) within the workspace's shared budget for it.
    pub(super) async fn call_within_tier(
        &self,
        token: &WorkspaceToken,
        method: &'static str,
        body: &Body<'_>,
    ) -> Result<Value, SlackError> {
        self.call_waiting_up_to(token, method, body, self.tier_wait())
            .await
    }

    /// [`Deliverer::call_within_tier`], waiting up to `max_wait` for the slot.
    async fn call_waiting_up_to(
        &self,
        token: &WorkspaceToken,
        method: &'static str,
        body: &Body<'_>,
        max_wait: Duration,
    ) -> Result<Value, SlackError> {
        self.limiter
            .call_within_tier(&token.workspace, method, max_wait, || {
                self.slack
                    .call_leaving_rate_limits(method, Some(&token.access_token), body)
            })
            .await
    }

    /// Longest wait for one tiered call's slot. A delivery may make several
    /// (a lookup, a join, a history check) besides its post's own wait, so
    /// each gets a third of `slack.max_rate_limit_wait`: what is held stays
    /// within about twice that.
    fn tier_wait(&self) -> Duration {
        self.max_rate_limit_wait / 3
    }

    /// `conversations.join` for a public channel id.
    async fn join(&self, channel: &str, token: &WorkspaceToken) -> Result<(), SlackError> {
        let body = serde_json::json!({ "channel": channel });
        self.call_within_tier(token, "conversations.join", &Body::Json(&body))
            .await?;
        info!(channel, "joined the channel to post in it");
        Ok(())
    }

    /// The default channel's id (or `#name` when names cannot be listed).
    async fn default_channel_id(
        &self,
        token: &WorkspaceToken,
        default_channel: Option<&str>,
    ) -> Option<String> {
        let default = default_channel?;
        match Destination::parse(default) {
            Destination::ChannelId(id) | Destination::User(id) => Some(id),
            Destination::Name(name) => match self.channels.resolve(token, &name).await {
                Ok(Resolution::Id(id)) => Some(id),
                Ok(Resolution::ByName(name)) => Some(format!("#{name}")),
                Ok(Resolution::NotFound) => {
                    warn!(
                        channel = default,
                        "the default channel does not exist (or the bot cannot see it)"
                    );
                    None
                }
                // Posting by name still works while the listing does not.
                Err(e) => {
                    warn!(channel = default, error = %e, "cannot resolve the default channel; posting by name");
                    Some(format!("#{name}"))
                }
            },
        }
    }

    /// Looks for the post an earlier attempt may have made for this event
    /// and target since `lost.since_ms` (a vanished holder's, or this
    /// delivery's own after an answer in doubt): in the conversation's
    /// history, and, for a reply under the incident's first message
    /// (`thread`, its `ts`), in that thread, which the history does not
    /// list. Waits up to `patience` for the history call's shared allowance.
    #[allow(clippy::too_many_arguments)]
    async fn look_for_post(
        &self,
        event: &Event,
        target: &str,
        destination: &SlackDestination,
        thread: Option<&str>,
        token: &WorkspaceToken,
        lost: &LostAttempt,
        patience: Duration,
    ) -> Lookup {
        let on_error = |method: Method, e: &SlackError| -> Lookup {
            match policy::next_step(method, destination.kind, e, Tried::default()) {
                Step::Wait(wait) => Lookup::Wait(wait),
                _ => {
                    warn!(target = %self.addresses.text(target), error = %e, "cannot check whether an earlier attempt had posted this; posting (a duplicate is possible)");
                    Lookup::CannotCheck
                }
            }
        };
        let looked_in = lost.rerouted_to.as_deref().unwrap_or(&destination.channel);
        let conversation = match Destination::parse(looked_in) {
            Destination::ChannelId(id) => id,
            Destination::User(user) => {
                let body = serde_json::json!({ "users": user });
                match self
                    .call_waiting_up_to(token, "conversations.open", &Body::Json(&body), patience)
                    .await
                {
                    Ok(reply) => match reply.pointer("/channel/id").and_then(Value::as_str) {
                        Some(id) => id.to_string(),
                        None => return Lookup::CannotCheck,
                    },
                    Err(e) => return on_error(Method::Open, &e),
                }
            }
            // A name the app may not resolve: history needs an id.
            Destination::Name(_) => return Lookup::CannotCheck,
        };
        let oldest = lost
            .since_ms
            .saturating_sub(HISTORY_SLACK.as_millis() as u64);
        let oldest = format!("{}.{:03}000", oldest / 1000, oldest % 1000);
        let mut places = vec![("conversations.history", None)];
        // A reply goes where the first message is: only then is the thread there.
        if lost.rerouted_to.is_none()
            && let Some(ts) = thread
        {
            places.push(("conversations.replies", Some(ts)));
        }
        for (method, thread) in places {
            let mut args = vec![
                ("channel", conversation.as_str()),
                ("oldest", oldest.as_str()),
            ];
            if let Some(ts) = thread {
                args.push(("ts", ts));
            }
            match self
                .search_pages(token, method, &args, &event.id, target, patience)
                .await
            {
                Ok(PageSearch::Found(message)) => {
                    let ts = message.get("ts").and_then(Value::as_str);
                    // A message somebody replied under carries `thread_ts`
                    // equal to its own `ts`: a thread's parent, not a reply.
                    let thread_ts = message.get("thread_ts").and_then(Value::as_str);
                    return Lookup::Found(Landed {
                        top_level: thread_ts.is_none() || thread_ts == ts,
                        ts: ts.map(str::to_string),
                        channel: conversation,
                        rerouted_by: None,
                    });
                }
                Ok(PageSearch::NotThere) => {}
                Ok(PageSearch::TooMany) => {
                    warn!(target = %self.addresses.text(target), method, pages = HISTORY_MAX_PAGES, "cannot check whether an earlier attempt had posted this: too many newer messages; posting (a duplicate is possible)");
                    return Lookup::CannotCheck;
                }
                Err(e) => return on_error(Method::History, &e),
            }
        }
        Lookup::NotThere
    }

    /// Reads `method` (`conversations.history` or `.replies`) with `args` a
    /// page at a time, following Slack's cursor, until this event's post for
    /// `target` turns up or the pages end.
    async fn search_pages(
        &self,
        token: &WorkspaceToken,
        method: &'static str,
        args: &[(&str, &str)],
        event_id: &str,
        target: &str,
        patience: Duration,
    ) -> Result<PageSearch, SlackError> {
        let mut cursor: Option<String> = None;
        for _ in 0..HISTORY_MAX_PAGES {
            let mut form = args.to_vec();
            form.extend([("include_all_metadata", "true"), ("limit", HISTORY_PAGE)]);
            // A search under way waits longer for its next page: deferred
            // halfway, it would start again from the first page next time,
            // and searches competing for the budget would never end. One
            // that may not wait at all (a post's retry) waits for none.
            let max_wait = if let Some(cursor) = &cursor {
                form.push(("cursor", cursor.as_str()));
                if patience.is_zero() {
                    patience
                } else {
                    self.max_rate_limit_wait
                }
            } else {
                patience
            };
            let page = self
                .call_waiting_up_to(token, method, &Body::Form(&form), max_wait)
                .await?;
            if let Some(message) = lost_post_in(&page, event_id, target) {
                return Ok(PageSearch::Found(message.clone()));
            }
            cursor = page
                .get("has_more")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .then(|| page.pointer("/response_metadata/next_cursor"))
                .flatten()
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            if cursor.is_none() {
                return Ok(PageSearch::NotThere);
            }
        }
        Ok(PageSearch::TooMany)
    }

    /// [`Deliverer::complete`] for a post, recording in the same round trip
    /// where an incident's first message landed.
    async fn complete_posted(
        &self,
        ticket: &ClaimTicket,
        target: &crate::event::Target,
        plan: Option<&ThreadPlan<'_>>,
        landed: &Landed,
    ) {
        let also = match plan {
            Some(plan) => {
                // A top-level post is the incident's first message here: the
                // first one, or a new one where the thread was gone.
                let first = match &landed.ts {
                    Some(ts) if landed.top_level => Some(FirstMessage {
                        channel: landed.channel.clone(),
                        ts: ts.clone(),
                    }),
                    _ => None,
                };
                self.incidents.posted_commands(
                    plan.workspace,
                    plan.key,
                    plan.destination,
                    first.as_ref(),
                    plan.emailed_since_ms.is_some(),
                )
            }
            None => Vec::new(),
        };
        self.complete_with(ticket, target, &also).await;
    }

    /// Records the delivery, trying Redis three times within about a quarter
    /// of a second: a record lost here costs a history lookup on redelivery.
    pub(super) async fn complete(&self, ticket: &ClaimTicket, target: &crate::event::Target) {
        self.complete_with(ticket, target, &[]).await;
    }

    async fn complete_with(
        &self,
        ticket: &ClaimTicket,
        target: &crate::event::Target,
        also: &[redis::Cmd],
    ) {
        let recorded = (|| self.idempotency.complete_and(ticket, also))
            .retry(
                ConstantBuilder::default()
                    .with_delay(Duration::from_millis(100))
                    .with_max_times(2),
            )
            .await;
        if let Err(e) = recorded {
            warn!(target = %self.addresses.target(target), error = %e, "sent, but could not record it in Redis; a redelivery will look for the post before sending again");
        }
    }

    pub(super) async fn release(&self, ticket: &ClaimTicket, may_have_sent: bool) {
        if let Err(e) = self.idempotency.release(ticket, may_have_sent).await {
            warn!(error = %e, "could not release an idempotency claim; it expires by itself");
        }
    }
}

/// Now, in Unix milliseconds, for where a post's history check starts.
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// For the log: whether the post went into an incident's thread.
fn landed_in_thread(plan: Option<&ThreadPlan<'_>>, landed: &Landed) -> bool {
    plan.and_then(ThreadPlan::parent)
        .is_some_and(|parent| parent.channel == landed.channel)
}

impl Deliverer {
    /// The token after one refresh, for a call Slack answered `error`
    /// (`token_expired`); a refresh Slack rate-limited waits like any 429.
    async fn refreshed(
        &self,
        token: &WorkspaceToken,
        error: &SlackError,
    ) -> Result<WorkspaceToken, PostFailure> {
        match self.tokens.refresh(token).await {
            Ok(fresh) => Ok(fresh),
            Err(e) if let Some(wait) = e.rate_limited() => Err(PostFailure::Deferred(wait)),
            Err(e) => Err(PostFailure::Unavailable(SlackUnavailable {
                reason: format!("Slack cannot take it: {error}, and {e}"),
                transient: e.is_transient(),
            })),
        }
    }
}

fn unavailable(error: &SlackError) -> PostFailure {
    PostFailure::Unavailable(SlackUnavailable {
        reason: format!("Slack cannot take it: {error}"),
        transient: error.is_transient(),
    })
}

/// The message in a `conversations.history` page that is this event's post
/// for `target`, by the metadata every post carries (metadata that names no
/// target counts for any).
fn lost_post_in<'a>(page: &'a Value, event_id: &str, target: &str) -> Option<&'a Value> {
    page.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|message| {
            let payload = message.pointer("/metadata/event_payload");
            message
                .pointer("/metadata/event_type")
                .and_then(Value::as_str)
                == Some(super::slack::message::METADATA_EVENT_TYPE)
                && payload
                    .and_then(|p| p.get("event_id"))
                    .and_then(Value::as_str)
                    == Some(event_id)
                && payload
                    .and_then(|p| p.get("target"))
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == target)
        })
}
