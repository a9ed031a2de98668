//! One event's delivery: resolve each routed target, skip what was already sent, send the rest.
//!
//! The result is a [`DeliveryReport`] saying, per target, whether it is
//! settled. Nothing here touches the broker: [`crate::settle`] turns the
//! report into ack, delayed retry or dead-letter.

pub mod idempotency;
pub mod slack;

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;
use tracing::{info, warn};

use crate::config::Secret;
use crate::event::{Event, Target};
use crate::rules::{RoutedTarget, Routing};
use idempotency::{Claim, Idempotency};
use slack::message::{RenderContext, render};
use slack::tokens::{TokenStore, WorkspaceToken};
use slack::{Body, SlackClient, SlackError};

/// The outcome of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetStatus {
    /// Sent now; `to` says where (e.g. `slack:C0PAY`).
    Delivered { to: String },
    /// An earlier attempt already sent it (redelivery, retry, another replica).
    AlreadyDelivered,
    /// Not sent. `retryable` is false when trying again cannot help.
    Failed { detail: String, retryable: bool },
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
        !matches!(self.status, TargetStatus::Failed { .. })
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
}

impl fmt::Display for DeliveryReport {
    /// `slack_channel:C1 failed: chat.postMessage: http_503; slack_user:U1 delivered`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .targets
            .iter()
            .map(|t| match &t.status {
                TargetStatus::Delivered { to } => format!("{} delivered to {to}", t.target),
                TargetStatus::AlreadyDelivered => format!("{} already delivered", t.target),
                TargetStatus::Failed { detail, .. } => format!("{} failed: {detail}", t.target),
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
}

/// A target after lookups: where exactly it goes.
struct Resolved<'a> {
    routed: &'a RoutedTarget,
    /// Identity for idempotency and de-duplication, e.g. `slack:T1:C0PAY`.
    key: String,
    /// The `channel` argument of `chat.postMessage` (channel id, `#name` or user id).
    channel: String,
}

impl Deliverer {
    pub fn new(slack: SlackClient, tokens: TokenStore, idempotency: Idempotency) -> Deliverer {
        Deliverer {
            slack,
            tokens,
            idempotency,
        }
    }

    /// Delivers `event` to every target of `routing`.
    pub async fn deliver(&self, event: &Event, routing: &Routing) -> DeliveryReport {
        let workspace = self.tokens.workspace_for(event.workspace.as_deref());
        let token = match self.tokens.get(workspace).await {
            Ok(Some(token)) => Ok(token),
            Ok(None) => Err((
                format!(
                    "no Slack token for workspace {}; store one with `alert-router tokens set` or set SLACK_BOT_TOKEN",
                    workspace.unwrap_or(
                        "(none: the event names no workspace and slack.default_workspace is unset)"
                    )
                ),
                true,
            )),
            Err(e) => Err((e.to_string(), e.is_transient())),
        };

        let mut reports = Vec::with_capacity(routing.targets.len());
        let mut resolved = Vec::with_capacity(routing.targets.len());
        let mut seen = HashSet::new();
        for routed in &routing.targets {
            let name = &routed.target;
            let token = match &token {
                Ok(token) => token,
                Err((detail, retryable)) => {
                    reports.push(failed(name, detail.clone(), *retryable));
                    continue;
                }
            };
            match self.resolve(routed, token).await {
                Ok(target) => {
                    // Two routes to one person or channel notify once.
                    if seen.insert(target.key.clone()) {
                        resolved.push(target);
                    }
                }
                Err((detail, retryable)) => reports.push(failed(name, detail, retryable)),
            }
        }

        if let Ok(token) = &token {
            let sends = resolved
                .iter()
                .map(|target| self.send_once(event, target, token));
            reports.extend(join_all(sends).await);
        }
        DeliveryReport { targets: reports }
    }

    async fn resolve<'a>(
        &self,
        routed: &'a RoutedTarget,
        token: &WorkspaceToken,
    ) -> Result<Resolved<'a>, (String, bool)> {
        let ws = &token.workspace;
        match &routed.target {
            Target::SlackChannel(channel) => Ok(Resolved {
                routed,
                key: format!("slack:{ws}:{channel}"),
                channel: channel.clone(),
            }),
            Target::SlackUser(user) => Ok(Resolved {
                routed,
                key: format!("slack:{ws}:{user}"),
                channel: user.clone(),
            }),
            Target::SlackEmail(email) => {
                let user = self
                    .lookup_user(&token.access_token, email)
                    .await
                    .map_err(|e| (e.to_string(), e.is_transient()))?;
                Ok(Resolved {
                    routed,
                    key: format!("slack:{ws}:{user}"),
                    channel: user,
                })
            }
            Target::Assignee => Err((
                "the event's assignee has neither slack_user nor email".into(),
                false,
            )),
            Target::Email(_) => Err((
                "email delivery is not available in this version".into(),
                true,
            )),
        }
    }

    async fn lookup_user(&self, token: &Secret, email: &str) -> Result<String, SlackError> {
        let reply = self
            .slack
            .call(
                "users.lookupByEmail",
                Some(token),
                &Body::Form(&[("email", email)]),
            )
            .await?;
        reply
            .pointer("/user/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| SlackError {
                method: "users.lookupByEmail",
                code: "invalid_response".into(),
                detail: Some("no user.id in the reply".into()),
                failure: slack::SlackFailure::Transient { retry_after: None },
            })
    }

    /// Claims, sends and records one target.
    async fn send_once(
        &self,
        event: &Event,
        target: &Resolved<'_>,
        token: &WorkspaceToken,
    ) -> TargetReport {
        let name = &target.routed.target;
        let ticket = match self.idempotency.claim(&event.id, &target.key).await {
            Ok(Claim::Acquired(ticket)) => ticket,
            Ok(Claim::AlreadyDone) => {
                info!(target = %name, "already delivered; not sending again");
                return report(name, TargetStatus::AlreadyDelivered);
            }
            Ok(Claim::HeldElsewhere) => {
                return failed(
                    name,
                    "another worker is sending this right now".into(),
                    true,
                );
            }
            Err(e) => {
                return failed(
                    name,
                    format!("cannot check idempotency in Redis: {e}"),
                    true,
                );
            }
        };

        let context = RenderContext {
            rule: target.routed.rule.as_deref(),
            rerouted_from: None,
        };
        let mut payload = render(event, &context);
        payload["channel"] = Value::String(target.channel.clone());
        match self
            .slack
            .call(
                "chat.postMessage",
                Some(&token.access_token),
                &Body::Json(&payload),
            )
            .await
        {
            Ok(reply) => {
                let to = reply
                    .get("channel")
                    .and_then(Value::as_str)
                    .unwrap_or(&target.channel)
                    .to_string();
                if let Err(e) = self.complete_with_retry(&ticket).await {
                    warn!(target = %name, error = %e, "sent, but could not record it in Redis; a redelivery after the claim lease may send it again");
                }
                info!(target = %name, channel = %to, "delivered to slack");
                report(
                    name,
                    TargetStatus::Delivered {
                        to: format!("slack:{to}"),
                    },
                )
            }
            Err(e) => {
                if let Err(release) = self.idempotency.release(&ticket).await {
                    warn!(target = %name, error = %release, "could not release the idempotency claim; it expires by itself");
                }
                warn!(target = %name, error = %e, "slack delivery failed");
                if matches!(
                    e.failure,
                    slack::SlackFailure::Workspace | slack::SlackFailure::TokenExpired
                ) {
                    self.tokens.invalidate(&token.workspace);
                }
                failed(name, e.to_string(), e.is_transient())
            }
        }
    }

    async fn complete_with_retry(
        &self,
        ticket: &idempotency::ClaimTicket,
    ) -> Result<(), redis::RedisError> {
        let mut last = None;
        for pause in [0, 50, 200] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            match self.idempotency.complete(ticket).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn failed(target: &Target, detail: String, retryable: bool) -> TargetReport {
    report(target, TargetStatus::Failed { detail, retryable })
}

fn report(target: &Target, status: TargetStatus) -> TargetReport {
    let result = match &status {
        TargetStatus::Delivered { .. } => "delivered",
        TargetStatus::AlreadyDelivered => "already_delivered",
        TargetStatus::Failed {
            retryable: true, ..
        } => "failed_retryable",
        TargetStatus::Failed {
            retryable: false, ..
        } => "failed",
    };
    crate::telemetry::record_target(target.kind(), result);
    TargetReport {
        target: target.to_string(),
        kind: target.kind(),
        status,
    }
}
