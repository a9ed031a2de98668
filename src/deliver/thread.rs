//! Incidents in Slack: a later event of an incident replies in its first message's thread, and acknowledging or resolving it updates every first message.
//!
//! [`super::incident`] keeps where each first message is; this module turns
//! that into what a delivery does: per Slack destination a [`ThreadPlan`]
//! (post the first message, reply under it, or wait for the delivery that
//! is posting it), and for `*.acknowledged` / `*.resolved` events the
//! `chat.update` of every first message (status line, colour, no button).
//! Updates go through the workspace's Tier 3 budget for `chat.update`.

use std::time::Duration;

use tracing::{info, warn};

use super::incident::{FirstMessage, FirstPost, Incident, Observed};
use super::policy::{self, Method, Step, TargetKind, Tried};
use super::resolve::{Action, Resolved};
use super::slack::message::{IncidentRef, RenderContext, Status, render};
use super::slack::tokens::WorkspaceToken;
use super::slack::{Body, SlackError, SlackFailure};
use super::{Deliverer, TargetReport, TargetStatus};
use crate::event::{Event, IncidentState};

/// What one Slack destination's post is within its incident.
#[derive(Debug, Clone)]
pub(super) struct ThreadPlan<'a> {
    pub workspace: &'a str,
    pub key: &'a str,
    /// When the incident began (Unix ms): its buttons name this incident.
    pub since_ms: u64,
    /// The destination's identity (`slack:T1:C0PAY`), as the incident keys it.
    pub destination: &'a str,
    pub first: FirstPost,
    /// The event is more severe (or higher) than any before: a reply is
    /// also shown in the channel.
    pub rose: bool,
    /// Since when Slack could not take this destination's notifications of
    /// the incident and they went to email (Unix ms), if they did.
    pub emailed_since_ms: Option<u64>,
    /// For an escalation step's post: how long the incident went unacknowledged.
    pub escalated_after: Option<&'a str>,
    /// How the incident stands if no longer open: a first message posted
    /// after an acknowledgement (events can arrive out of order) shows it
    /// and has no button.
    pub status: Option<Status<'a>>,
}

impl ThreadPlan<'_> {
    pub fn incident(&self) -> IncidentRef<'_> {
        IncidentRef {
            workspace: self.workspace,
            key: self.key,
            since_ms: Some(self.since_ms),
        }
    }

    /// The message to reply under, if there is one.
    pub fn parent(&self) -> Option<&FirstMessage> {
        match &self.first {
            FirstPost::Exists(message) => Some(message),
            _ => None,
        }
    }

    /// The catch-up note for the first post Slack takes after email stood in.
    pub fn emailed_note(&self) -> Option<String> {
        let since = self.emailed_since_ms?;
        let at = chrono::DateTime::from_timestamp_millis(i64::try_from(since).ok()?)?;
        Some(format!(
            "Slack could not take earlier notifications of this incident here; since {} UTC they went by email.",
            at.format("%Y-%m-%d %H:%M")
        ))
    }
}

/// One plan per resolved target (`None` for targets that are not Slack
/// posts, or when the incident is not tracked: no usable token).
pub(super) fn plans<'a>(
    resolved: &'a [Resolved<'a>],
    observed: Option<&'a Observed>,
    workspace: Option<&'a str>,
    key: &'a str,
    escalated_after: Option<&'a str>,
) -> Vec<Option<ThreadPlan<'a>>> {
    let (Some(observed), Some(workspace)) = (observed, workspace) else {
        return resolved.iter().map(|_| None).collect();
    };
    // `first_posts` holds one answer per Slack destination, in order.
    let mut answers = observed.first_posts.iter();
    resolved
        .iter()
        .map(|target| {
            if !matches!(target.action, Action::Slack(_)) {
                return None;
            }
            let first = answers.next()?.clone();
            Some(ThreadPlan {
                workspace,
                key,
                since_ms: observed.incident.first_at_ms,
                destination: &target.dedupe,
                first,
                rose: observed.rose,
                emailed_since_ms: observed.incident.emailed.get(&target.dedupe).copied(),
                escalated_after,
                status: status_of(&observed.incident),
            })
        })
        .collect()
}

/// How long a delivery waits for another to post its incident's first
/// message at a destination before trying again later.
const FIRST_POST_WAIT: Duration = Duration::from_secs(5);
const FIRST_POST_POLL: Duration = Duration::from_millis(100);

impl Deliverer {
    /// Waits while another delivery posts the first message this one should
    /// reply under: `Ok` with what it found, `Err(wait)` to try again later.
    pub(super) async fn wait_for_first_post(
        &self,
        plan: &ThreadPlan<'_>,
    ) -> Result<FirstPost, Duration> {
        let deadline = tokio::time::Instant::now() + FIRST_POST_WAIT;
        loop {
            tokio::time::sleep(FIRST_POST_POLL).await;
            match self
                .incidents
                .first_post(plan.workspace, plan.key, plan.destination)
                .await
            {
                Ok(FirstPost::InFlight) if tokio::time::Instant::now() < deadline => {}
                Ok(FirstPost::InFlight) => return Err(FIRST_POST_WAIT),
                Ok(found) => return Ok(found),
                Err(e) => {
                    warn!(error = %e, "cannot check the incident's first message; trying again later");
                    return Err(FIRST_POST_WAIT);
                }
            }
        }
    }

    /// Gives back a first post this delivery did not make; `emailed`: the
    /// notification went to email instead (noted for the catch-up).
    pub(super) async fn first_post_not_made(&self, plan: &ThreadPlan<'_>, emailed: bool) {
        let ours = matches!(plan.first, FirstPost::Ours);
        if !ours && !emailed {
            return;
        }
        if let Err(e) = self
            .incidents
            .abandon_first(plan.workspace, plan.key, plan.destination, emailed)
            .await
        {
            warn!(error = %e, "cannot release the incident's first post; it frees by itself within a minute");
        }
    }

    /// `chat.update` of every first message of the incident to show its
    /// state (acknowledged, resolved). One report per message.
    pub(super) async fn update_first_messages(
        &self,
        observed: &Observed,
        token: &WorkspaceToken,
        key: &str,
    ) -> Vec<TargetReport> {
        let incident = &observed.incident;
        let Some(first_event) = incident
            .first_event
            .as_deref()
            .and_then(|json| serde_json::from_str::<Event>(json).ok())
        else {
            return Vec::new();
        };
        let Some(status) = status_of(incident) else {
            return Vec::new();
        };
        let mut reports = Vec::with_capacity(incident.messages.len());
        for (destination, message) in &incident.messages {
            let context = RenderContext {
                status: Some(status),
                incident: Some(IncidentRef {
                    workspace: &token.workspace,
                    key,
                    since_ms: Some(incident.first_at_ms),
                }),
                ..RenderContext::default()
            };
            let replacement =
                render(&first_event, &context).replacing(&message.channel, &message.ts);
            let body = replacement.to_json();
            let target = format!("update:{destination}");
            let plain = || replacement.clone().plain_update(Some(status));
            let status = match self.update_message(token, &body, plain).await {
                Ok(()) => {
                    info!(channel = %message.channel, ts = %message.ts, state = incident.state.as_str(), "updated the incident's first message");
                    TargetStatus::Delivered {
                        to: format!("slack:{} (updated)", message.channel),
                    }
                }
                Err(status) => status,
            };
            crate::telemetry::record_target("slack_update", status_result(&status));
            reports.push(TargetReport {
                target,
                kind: "slack_update",
                status,
                note: None,
            });
        }
        reports
    }

    /// One `chat.update` with a token refresh on `token_expired`, and the
    /// `plain` body once if Slack refuses the layout (a first message that
    /// was itself posted as plain text, say); what Slack answered as the
    /// update's status otherwise.
    async fn update_message(
        &self,
        token: &WorkspaceToken,
        body: &[u8],
        plain: impl FnOnce() -> Vec<u8>,
    ) -> Result<(), TargetStatus> {
        let mut token = token.clone();
        let mut tried = Tried {
            have_channel_id: true,
            ..Tried::default()
        };
        let mut plain = Some(plain);
        let mut plain_body = Vec::new();
        loop {
            let sending = if tried.plain_text { &plain_body } else { body };
            let error = match self
                .call_within_tier(&token, "chat.update", &Body::JsonBytes(sending))
                .await
            {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if error.failure == SlackFailure::Payload
                && let Some(plain) = plain.take()
            {
                warn!(error = %error, "slack refused the update's layout; updating with plain text");
                tried.plain_text = true;
                plain_body = plain();
                continue;
            }
            match policy::next_step(Method::Update, TargetKind::Channel, &error, tried) {
                Step::RefreshToken => {
                    tried.refreshed_token = true;
                    match self.tokens.refresh(&token).await {
                        Ok(fresh) => token = fresh,
                        Err(e) if let Some(wait) = e.rate_limited() => {
                            return Err(TargetStatus::Deferred { wait });
                        }
                        Err(e) => return Err(update_failed(&error, e.is_transient())),
                    }
                }
                Step::Wait(wait) => return Err(TargetStatus::Deferred { wait }),
                _ if error.is_transient() => return Err(update_failed(&error, true)),
                _ => {
                    warn!(error = %error, "cannot update the incident's first message; leaving it as it is");
                    return Err(TargetStatus::Skipped {
                        reason: format!("Slack cannot update it: {error}"),
                    });
                }
            }
        }
    }
}

fn update_failed(error: &SlackError, retryable: bool) -> TargetStatus {
    TargetStatus::Failed {
        detail: format!("cannot update the incident's first message: {error}"),
        retryable,
    }
}

/// What the first messages should say of the incident, if it is no longer open.
fn status_of(incident: &Incident) -> Option<Status<'_>> {
    let seconds = |ms: Option<u64>| {
        ms.and_then(|ms| i64::try_from(ms / 1000).ok())
            .unwrap_or_default()
    };
    match incident.state {
        IncidentState::Open => None,
        IncidentState::Acknowledged => Some(Status::Acknowledged {
            by: incident.acknowledged_by.as_deref(),
            at_unix: seconds(incident.acknowledged_at_ms),
        }),
        IncidentState::Resolved => Some(Status::Resolved {
            at_unix: seconds(incident.resolved_at_ms),
        }),
    }
}

fn status_result(status: &TargetStatus) -> &'static str {
    match status {
        TargetStatus::Delivered { .. } => "updated",
        TargetStatus::Skipped { .. } => "skipped",
        TargetStatus::Deferred { .. } => "deferred",
        TargetStatus::Failed { .. } => "failed",
        TargetStatus::AlreadyDelivered => "already_delivered",
    }
}
