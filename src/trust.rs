//! Trust boundaries: which workspaces and email domains a producer's event may name.
//!
//! Any producer on the broker can publish, so what an event says about where
//! it goes is untrusted: its `workspace`, the addresses in its own `targets`
//! and its assignee's email. The rules file is the operator's and is trusted.
//! An event that names something outside `slack.allowed_workspaces` or
//! `email.allowed_domains` is refused whole, before anything is sent: a
//! partial delivery would hide the problem, and an operator can fix and
//! replay it.

use std::fmt;

use lettre::message::Mailbox;

use crate::config::Settings;
use crate::event::{Event, Target};
use crate::redact::Addresses;
use crate::rules::Routing;

/// The dead-letter reason for an event refused here.
pub const REASON: &str = "forbidden_target";

/// What events may name. Empty lists allow anything.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    allowed_workspaces: Vec<String>,
    /// Lowercase.
    allowed_domains: Vec<String>,
    default_workspace: Option<String>,
}

/// Why an event is refused. The address is already shown as the settings allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error(
        "workspace `{workspace}` is not in slack.allowed_workspaces; add it there to allow events for it"
    )]
    Workspace { workspace: String },
    #[error(
        "{field} `{address}` is outside email.allowed_domains; add `{domain}` there to allow it"
    )]
    Domain {
        field: String,
        address: String,
        domain: String,
    },
    #[error(
        "{field} `{address}` is not an email address, so email.allowed_domains cannot allow it"
    )]
    NotAnAddress { field: String, address: String },
}

impl TrustPolicy {
    pub fn from_settings(settings: &Settings) -> TrustPolicy {
        TrustPolicy {
            allowed_workspaces: settings.slack.allowed_workspaces.clone(),
            allowed_domains: settings
                .email
                .allowed_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            default_workspace: settings.slack.default_workspace.clone(),
        }
    }

    /// Refuses an event whose workspace is not allowed. Checked before
    /// routing: the workspace decides whose token is used for every target.
    pub fn check_workspace(&self, event: &Event) -> Result<(), Forbidden> {
        let Some(workspace) = event.workspace.as_deref() else {
            // No workspace named: the operator's default (or SLACK_BOT_TOKEN).
            return Ok(());
        };
        if self.allowed_workspaces.is_empty()
            || self.default_workspace.as_deref() == Some(workspace)
            || self.allowed_workspaces.iter().any(|w| w == workspace)
        {
            return Ok(());
        }
        Err(Forbidden::Workspace {
            workspace: workspace.to_string(),
        })
    }

    /// Refuses an event whose own addresses are outside the allowed
    /// domains: its `email` and `slack_email` targets, and its assignee's
    /// email when `routing` may reach it (an `assignee` target, or a DM to
    /// the assignee's Slack user, which falls back to that email).
    pub fn check_addresses(
        &self,
        event: &Event,
        routing: &Routing,
        addresses: Addresses,
    ) -> Result<(), Forbidden> {
        if self.allowed_domains.is_empty() {
            return Ok(());
        }
        for (i, target) in event.own_targets().iter().enumerate() {
            if let Target::Email(address) | Target::SlackEmail(address) = target {
                self.check_address(
                    &format!("targets[{i}].{}", target.kind()),
                    address,
                    addresses,
                )?;
            }
        }
        if let Some(assignee) = &event.assignee
            && let Some(email) = assignee.email.as_deref().filter(|e| !e.trim().is_empty())
        {
            let reached = routing.targets.iter().any(|routed| match &routed.target {
                Target::SlackEmail(address) => address == email,
                Target::SlackUser(user) => assignee.slack_user.as_deref() == Some(user.as_str()),
                _ => false,
            });
            if reached {
                self.check_address("assignee.email", email, addresses)?;
            }
        }
        Ok(())
    }

    fn check_address(
        &self,
        field: &str,
        address: &str,
        addresses: Addresses,
    ) -> Result<(), Forbidden> {
        // Parsed as the email sender parses it, so the domain checked is
        // the one mail would go to (`Name <a@b>` included).
        let Ok(mailbox) = address.trim().parse::<Mailbox>() else {
            return Err(Forbidden::NotAnAddress {
                field: field.to_string(),
                address: addresses.address(address).into_owned(),
            });
        };
        let domain = mailbox.email.domain().to_ascii_lowercase();
        // Exact: `example.com` allows neither `evil-example.com` nor `mail.example.com`.
        if self.allowed_domains.contains(&domain) {
            return Ok(());
        }
        Err(Forbidden::Domain {
            field: field.to_string(),
            address: addresses.address(address).into_owned(),
            domain,
        })
    }
}

impl fmt::Display for TrustPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |l: &[String]| {
            if l.is_empty() {
                "any".to_string()
            } else {
                l.join(", ")
            }
        };
        write!(
            f,
            "workspaces: {}; email domains: {}",
            list(&self.allowed_workspaces),
            list(&self.allowed_domains)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DEFAULT_MAX_BODY_BYTES;
    use crate::rules::Rules;

    fn policy(workspaces: &[&str], domains: &[&str]) -> TrustPolicy {
        let mut settings = Settings::default();
        settings.slack.default_workspace = Some("T0HOME".into());
        settings.slack.allowed_workspaces = workspaces.iter().map(|s| s.to_string()).collect();
        settings.email.allowed_domains = domains.iter().map(|s| s.to_string()).collect();
        TrustPolicy::from_settings(&settings)
    }

    fn event(json: &str) -> Event {
        Event::decode(json.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
    }

    fn check(policy: &TrustPolicy, rules: &str, json: &str) -> Result<(), Forbidden> {
        let rules = Rules::from_yaml(rules, "rules.yaml").unwrap().rules;
        let event = event(json);
        policy.check_workspace(&event)?;
        policy.check_addresses(&event, &rules.route(&event), Addresses::default())
    }

    const CHANNEL_ONLY: &str = "version: 1\ndefaults: {slack_channel: C0ESC}\nrules: []\n";
    const TO_ASSIGNEE: &str = "version: 1\nrules:\n  - name: owner\n    notify: [assignee]\n";

    #[test]
    fn a_workspace_outside_the_list_is_refused_by_name() {
        let p = policy(&["T0OTHER"], &[]);
        let err = check(
            &p,
            CHANNEL_ONLY,
            r#"{"id":"a","type":"t","severity":"info","title":"x","workspace":"T0EVIL"}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "workspace `T0EVIL` is not in slack.allowed_workspaces; add it there to allow events for it"
        );
        for allowed in ["T0OTHER", "T0HOME"] {
            let json = format!(
                r#"{{"id":"a","type":"t","severity":"info","title":"x","workspace":"{allowed}"}}"#
            );
            assert_eq!(check(&p, CHANNEL_ONLY, &json), Ok(()), "{allowed}");
        }
        // No workspace named: the default, which the operator chose.
        assert_eq!(
            check(
                &p,
                CHANNEL_ONLY,
                r#"{"id":"a","type":"t","severity":"info","title":"x"}"#
            ),
            Ok(())
        );
    }

    #[test]
    fn empty_lists_allow_anything() {
        let p = policy(&[], &[]);
        let json = r#"{"id":"a","type":"t","severity":"info","title":"x","workspace":"T0ANY",
                      "targets":[{"email":"x@anywhere.test"}]}"#;
        assert_eq!(check(&p, CHANNEL_ONLY, json), Ok(()));
    }

    #[test]
    fn domains_match_exactly_and_ignore_case() {
        let p = policy(&[], &["Example.com"]);
        let with = |address: &str| {
            let json = format!(
                r#"{{"id":"a","type":"t","severity":"info","title":"x","targets":[{{"email":"{address}"}}]}}"#
            );
            check(&p, CHANNEL_ONLY, &json)
        };
        assert_eq!(with("ana@example.com"), Ok(()));
        assert_eq!(with("Ana@EXAMPLE.COM"), Ok(()));
        assert_eq!(with("Ana <ana@example.com>"), Ok(()));
        for refused in [
            "someone@evil-example.com",
            "someone@mail.example.com",
            "someone@example.com.evil.test",
            "Ana <someone@evil.test>",
        ] {
            assert!(
                matches!(with(refused), Err(Forbidden::Domain { .. })),
                "{refused}"
            );
        }
        assert!(matches!(
            with("not an address"),
            Err(Forbidden::NotAnAddress { .. })
        ));
    }

    #[test]
    fn the_refusal_names_the_field_the_redacted_address_and_the_setting() {
        let p = policy(&[], &["example.com"]);
        let err = check(
            &p,
            CHANNEL_ONLY,
            r#"{"id":"a","type":"t","severity":"info","title":"x",
                "targets":[{"slack_channel":"C1"},{"slack_email":"someone@evil.example"}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "targets[1].slack_email `s***@evil.example` is outside email.allowed_domains; add `evil.example` there to allow it"
        );
    }

    #[test]
    fn the_assignee_email_counts_only_when_routing_can_reach_it() {
        let p = policy(&[], &["example.com"]);
        let json = r#"{"id":"a","type":"t","severity":"info","title":"x",
                       "assignee":{"name":"Eve","email":"eve@evil.test"}}"#;
        // Only shown in the message: nothing is sent to it.
        assert_eq!(check(&p, CHANNEL_ONLY, json), Ok(()));
        let err = check(&p, TO_ASSIGNEE, json).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("assignee.email `e***@evil.test`"),
            "{err}"
        );
        // A DM to the assignee's Slack user falls back to that email.
        let json = r#"{"id":"a","type":"t","severity":"info","title":"x",
                       "assignee":{"slack_user":"U0EVE","email":"eve@evil.test"}}"#;
        assert!(check(&p, TO_ASSIGNEE, json).is_err());
    }

    #[test]
    fn addresses_in_the_rules_file_are_trusted() {
        let p = policy(&[], &["example.com"]);
        let rules =
            "version: 1\nrules:\n  - name: partner\n    notify: [{email: ops@partner.test}]\n";
        assert_eq!(
            check(
                &p,
                rules,
                r#"{"id":"a","type":"t","severity":"info","title":"x"}"#
            ),
            Ok(())
        );
    }
}
