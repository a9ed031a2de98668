//! Step 3 of a delivery: what Slack cannot take goes by email, one message per address.
//!
//! A target falls back to its own address (an `email` target, a
//! `slack_email`, an assignee's email), else the rule's `email`, else
//! `defaults.email`. Several targets wanting one address get one email that
//! names them all; each address is claimed on its own, so a redelivery
//! never emails anyone twice.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::idempotency::{Claim, ClaimTicket, LeaseKeeper};
use super::{Deliverer, TargetReport, TargetStatus, email, failed, report};
use crate::event::{Event, Target};
use crate::rules::RoutedTarget;

/// A target waiting for the email phase.
pub(super) struct PendingEmail<'a> {
    pub routed: &'a RoutedTarget,
    /// The target's own claim, held until the email is settled (None for email targets).
    pub ticket: Option<ClaimTicket>,
    pub addresses: Vec<String>,
    pub reason: Option<String>,
    /// Whether the Slack failure behind this fallback may pass by itself.
    pub transient: bool,
    /// Whether a Slack post for this target may have landed after all (its
    /// answer was lost): if the email fails too, the next attempt looks first.
    pub may_have_sent: bool,
    /// Keeps `ticket` renewed until the email is settled.
    pub _lease: Option<LeaseKeeper>,
}

impl Deliverer {
    /// Sends one email per distinct address, naming every target it stands in for.
    pub(super) async fn email_phase(
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
                    let to: Vec<_> = sent.iter().map(|a| self.addresses.address(a)).collect();
                    info!(target = %self.addresses.target(&p.routed.target), ?to, "delivered by email");
                    reports.push(
                        report(
                            &p.routed.target,
                            TargetStatus::Delivered {
                                to: format!("email:{}", sent.join(",")),
                            },
                        )
                        .noting(p.reason.clone()),
                    );
                }
                Err((detail, retryable)) => {
                    if let Some(ticket) = &p.ticket {
                        self.release(ticket, p.may_have_sent).await;
                    }
                    warn!(target = %self.addresses.target(&p.routed.target), detail = %self.addresses.text(&detail), "not delivered");
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
            Ok(Claim::Acquired(ticket) | Claim::AcquiredAfterCrash { ticket, .. }) => ticket,
            Ok(Claim::AlreadyDone) => return Ok(()),
            Ok(Claim::HeldElsewhere { .. }) => {
                return Err((
                    "another worker is sending this email right now".into(),
                    true,
                ));
            }
            Err(e) => return Err((format!("cannot check idempotency in Redis: {e}"), true)),
        };
        let _lease = self.idempotency.keep_alive(&ticket);
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
                    warn!(address = %self.addresses.address(address), error = %e, "emailed, but could not record it in Redis");
                }
                Ok(())
            }
            Err(e) => {
                self.release(&ticket, false).await;
                Err((e.to_string(), e.is_transient()))
            }
        }
    }
}

/// Where a target's email goes: its own address, else the rule's `email`,
/// else `defaults.email` (the router already merged those two).
pub(super) fn fallback_addresses(event: &Event, routed: &RoutedTarget) -> Vec<String> {
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
