//! The compiled rules and the router: which rules match an event, which
//! targets result, and what happens when nothing does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::file::{self, EscalationStep, FileSpec};
use super::matcher::Matcher;
use super::{Diagnostic, Loaded, RulesErrors};
use crate::event::{Event, Target};

/// What to do with events that no rule matches and that name no targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    /// Send them to `defaults.slack_channel` (else `defaults.email`).
    Default,
    /// Acknowledge and forget them.
    Drop,
    /// Put them in the dead-letter queue.
    DeadLetter,
}

/// A validated, compiled rules file. Immutable; share it through an `Arc`.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Distinct (label, regex) pairs across all rules.
    memo_slots: usize,
    default_channel: Option<String>,
    default_emails: Vec<String>,
    unmatched: Unmatched,
    origin: String,
}

#[derive(Debug)]
struct Rule {
    name: String,
    /// As written, in file order (for explanations).
    matchers: Vec<(String, Matcher)>,
    /// The order `route` tests them in: cheapest first, regexes last,
    /// each regex with its slot in the per-call memo.
    plan: Vec<Check>,
    notify: Vec<Target>,
    /// The rule's `email`, else `defaults.email`, resolved once at load.
    fallback_emails: Vec<String>,
    continue_: bool,
    escalate: Arc<[EscalationStep]>,
}

#[derive(Debug)]
struct Check {
    matcher: usize,
    memo_slot: Option<usize>,
}

impl Rule {
    /// The index of the first matcher (as written) that fails, `None` when all hold.
    fn first_failure(&self, event: &Event) -> Option<usize> {
        self.matchers.iter().position(|(_, m)| !m.matches(event))
    }

    /// Whether all matchers hold, remembering regex results in `memo` (0 =
    /// unknown, 1 = no match, 2 = match): rules tend to repeat the same
    /// regexes (`type=~"escalation\..*"`), and each is then run once per event.
    fn matches(&self, event: &Event, memo: &mut [u8]) -> bool {
        self.plan.iter().all(|check| {
            let matcher = &self.matchers[check.matcher].1;
            let hit = match check.memo_slot.and_then(|slot| memo.get_mut(slot)) {
                Some(&mut 1) => false,
                Some(&mut 2) => true,
                Some(known) => {
                    let hit = matcher.hit(&event.label(matcher.name()));
                    *known = 1 + u8::from(hit);
                    hit
                }
                None => matcher.hit(&event.label(matcher.name())),
            };
            hit != matcher.is_negated()
        })
    }
}

/// Regex memo slots up to this count live on the stack.
const STACK_MEMO: usize = 128;

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    /// Resolved, de-duplicated targets in order: matched rules first, then the
    /// event's own targets (or the unmatched default).
    pub targets: Vec<RoutedTarget>,
    /// Names of the rules that matched, in order.
    pub matched_rules: Vec<String>,
    pub disposition: Disposition,
    /// The escalation chains of the matched rules that have one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub escalations: Vec<EscalationChain>,
    /// Set for an escalation step's event: how long the incident went
    /// unacknowledged (`15m`), said in the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalated_after: Option<String>,
}

/// A matched rule's escalation chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EscalationChain {
    pub rule: String,
    pub steps: Arc<[EscalationStep]>,
}

/// The fate of an event as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Disposition {
    /// Notify `targets`.
    Deliver,
    /// Matched only rules with `notify: []`; nothing to send, ack it.
    Silenced { rule: String },
    /// Unmatched and `unmatched: drop`; ack it.
    Dropped,
    /// Unmatched and `unmatched: dead-letter` (or no default to send to).
    DeadLetter,
}

/// One resolved recipient.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutedTarget {
    /// `assignee` is already resolved to the assignee's Slack user or email
    /// when the event has them.
    pub target: Target,
    /// The rule that produced it; `None` for the event's own targets and the
    /// unmatched default.
    pub rule: Option<String>,
    /// Who to email when Slack cannot take it: the rule's `email`, else
    /// `defaults.email`.
    pub fallback_emails: Vec<String>,
}

/// The routing with the reasoning behind it, for `alert-router rules test`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// One step per rule, in file order.
    pub steps: Vec<RuleStep>,
    pub routing: Routing,
}

/// How one rule fared against the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleStep {
    pub rule: String,
    /// False when an earlier matching rule without `continue` stopped evaluation.
    pub evaluated: bool,
    pub matched: bool,
    /// The first matcher that failed, as written in the file.
    pub failed_matcher: Option<String>,
}

impl Rules {
    /// Parses, validates and compiles a rules file held in memory; `origin`
    /// names it in diagnostics.
    pub fn from_yaml(source: &str, origin: &str) -> Result<Loaded, RulesErrors> {
        let (spec, warnings) = file::parse(source, origin).map_err(RulesErrors)?;
        Ok(Loaded {
            rules: Rules::compile(spec, origin),
            warnings,
        })
    }

    /// Reads and loads a rules file. A read error is one diagnostic at line 0.
    pub fn load(path: &Path) -> Result<Loaded, RulesErrors> {
        let origin = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| {
            RulesErrors(vec![Diagnostic::error(
                &origin,
                0,
                0,
                format!("cannot read the rules file: {e}"),
            )])
        })?;
        Rules::from_yaml(&source, &origin)
    }

    fn compile(spec: FileSpec, origin: &str) -> Rules {
        let mut slots: HashMap<(String, String), usize> = HashMap::new();
        let mut rules = Vec::with_capacity(spec.rules.len());
        for r in spec.rules {
            let mut plan: Vec<Check> = r
                .matchers
                .iter()
                .enumerate()
                .map(|(i, (_, m))| {
                    let memo_slot = m.uses_regex().then(|| {
                        let next = slots.len();
                        *slots
                            .entry((m.name().to_string(), m.value().to_string()))
                            .or_insert(next)
                    });
                    Check {
                        matcher: i,
                        memo_slot,
                    }
                })
                .collect();
            // Stable: exact compares first, then alternations, then regexes;
            // file order within each. All must hold, so order cannot change the result.
            plan.sort_by_key(|c| r.matchers[c.matcher].1.cost());
            rules.push(Rule {
                fallback_emails: if r.email.is_empty() {
                    spec.default_emails.clone()
                } else {
                    r.email
                },
                name: r.name,
                matchers: r.matchers,
                plan,
                notify: r.notify,
                continue_: r.continue_,
                escalate: r.escalate.into(),
            });
        }
        Rules {
            rules,
            memo_slots: slots.len(),
            default_channel: spec.default_channel,
            default_emails: spec.default_emails,
            unmatched: spec.unmatched,
            origin: origin.to_string(),
        }
    }

    /// Routes an event. Regexes are precompiled; evaluation stops at the first
    /// matching rule without `continue`.
    pub fn route(&self, event: &Event) -> Routing {
        self.evaluate(event, None)
    }

    /// Routes an event and records, rule by rule, why it matched or not.
    pub fn explain(&self, event: &Event) -> Explanation {
        let mut steps = Vec::with_capacity(self.rules.len());
        let routing = self.evaluate(event, Some(&mut steps));
        Explanation { steps, routing }
    }

    fn evaluate(&self, event: &Event, mut steps: Option<&mut Vec<RuleStep>>) -> Routing {
        let mut stack_memo = [0u8; STACK_MEMO];
        let mut heap_memo = Vec::new();
        let memo: &mut [u8] = if self.memo_slots <= STACK_MEMO {
            &mut stack_memo[..self.memo_slots]
        } else {
            heap_memo.resize(self.memo_slots, 0);
            &mut heap_memo
        };
        let mut targets: Vec<RoutedTarget> = Vec::new();
        let mut matched_rules: Vec<String> = Vec::new();
        let mut escalations: Vec<EscalationChain> = Vec::new();
        let mut stopped = false;
        for rule in &self.rules {
            if stopped {
                match steps.as_deref_mut() {
                    Some(steps) => steps.push(RuleStep {
                        rule: rule.name.clone(),
                        evaluated: false,
                        matched: false,
                        failed_matcher: None,
                    }),
                    // Nothing left to record: skip the remaining rules entirely.
                    None => break,
                }
                continue;
            }
            let matched = match steps.as_deref_mut() {
                None => rule.matches(event, memo),
                Some(steps) => {
                    let failure = rule.first_failure(event);
                    steps.push(RuleStep {
                        rule: rule.name.clone(),
                        evaluated: true,
                        matched: failure.is_none(),
                        failed_matcher: failure.map(|i| rule.matchers[i].0.clone()),
                    });
                    failure.is_none()
                }
            };
            if !matched {
                continue;
            }
            matched_rules.push(rule.name.clone());
            if !rule.escalate.is_empty() {
                escalations.push(EscalationChain {
                    rule: rule.name.clone(),
                    steps: Arc::clone(&rule.escalate),
                });
            }
            for target in &rule.notify {
                push_unique(
                    &mut targets,
                    resolve(target, event),
                    Some(&rule.name),
                    &rule.fallback_emails,
                );
            }
            stopped = !rule.continue_;
        }

        let own = event.own_targets();
        for target in own {
            push_unique(
                &mut targets,
                resolve(target, event),
                None,
                &self.default_emails,
            );
        }

        let disposition = if !matched_rules.is_empty() || !own.is_empty() {
            match (targets.is_empty(), matched_rules.first()) {
                // Every matched rule had `notify: []` and the event named no one.
                (true, Some(first)) => Disposition::Silenced {
                    rule: first.clone(),
                },
                _ => Disposition::Deliver,
            }
        } else {
            self.unmatched_disposition(&mut targets)
        };
        Routing {
            targets,
            matched_rules,
            disposition,
            escalations,
            escalated_after: None,
        }
    }

    /// The routing of an escalation step's event: its own targets only (the
    /// step's, put there when it fired), with `rule`'s fallback emails; the
    /// rules are not applied again, or the incident's first destinations
    /// would be notified once more.
    pub fn route_escalation(&self, event: &Event, rule: &str, after: &str) -> Routing {
        let fallback = self
            .rules
            .iter()
            .find(|r| r.name == rule)
            .map_or(self.default_emails.as_slice(), |r| {
                r.fallback_emails.as_slice()
            });
        let targets = own_targets(event, Some(rule), fallback);
        let disposition = if targets.is_empty() {
            Disposition::Silenced {
                rule: rule.to_string(),
            }
        } else {
            Disposition::Deliver
        };
        Routing {
            targets,
            matched_rules: vec![rule.to_string()],
            disposition,
            escalations: Vec::new(),
            escalated_after: Some(after.to_string()),
        }
    }

    /// Step `index` of rule `rule`'s escalation chain in these rules, if
    /// they still have it (the rules may have been reloaded since it was set).
    pub fn escalation_step(&self, rule: &str, index: usize) -> Option<&EscalationStep> {
        self.rules
            .iter()
            .find(|r| r.name == rule)
            .and_then(|r| r.escalate.get(index))
    }

    fn unmatched_disposition(&self, targets: &mut Vec<RoutedTarget>) -> Disposition {
        match self.unmatched {
            Unmatched::Drop => Disposition::Dropped,
            Unmatched::DeadLetter => Disposition::DeadLetter,
            Unmatched::Default => {
                if let Some(channel) = &self.default_channel {
                    targets.push(RoutedTarget {
                        target: Target::SlackChannel(channel.clone()),
                        rule: None,
                        fallback_emails: self.default_emails.clone(),
                    });
                } else {
                    for email in &self.default_emails {
                        push_unique(
                            targets,
                            Target::Email(email.clone()),
                            None,
                            &self.default_emails,
                        );
                    }
                }
                if targets.is_empty() {
                    Disposition::DeadLetter
                } else {
                    Disposition::Deliver
                }
            }
        }
    }

    /// `defaults.slack_channel`.
    pub fn default_channel(&self) -> Option<&str> {
        self.default_channel.as_deref()
    }

    /// `defaults.email`.
    pub fn default_emails(&self) -> &[String] {
        &self.default_emails
    }

    /// The `unmatched` policy.
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// Where the rules came from (the file name used in diagnostics).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The rule names in file order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The total number of `notify` entries across all rules.
    pub fn target_count(&self) -> usize {
        self.rules.iter().map(|r| r.notify.len()).sum()
    }

    /// JSON Schema of the rules file, for editors.
    pub fn json_schema() -> serde_json::Value {
        file::json_schema()
    }
}

/// `assignee` becomes the assignee's Slack user, else their email; without
/// either it stays `Assignee` and delivery falls back to the fallback emails.
fn resolve(target: &Target, event: &Event) -> Target {
    if let Target::Assignee = target
        && let Some(assignee) = &event.assignee
    {
        if let Some(user) = present(&assignee.slack_user) {
            return Target::SlackUser(user.to_string());
        }
        if let Some(email) = present(&assignee.email) {
            return Target::SlackEmail(email.to_string());
        }
    }
    target.clone()
}

impl Routing {
    /// The routing to the event's own targets and nowhere else, each falling
    /// back to `fallback_emails`: no rule is applied, nothing escalates.
    /// What `alert-router send-test` delivers, so the test message goes
    /// where it was asked to and no rule adds recipients.
    pub fn own_targets_only(event: &Event, fallback_emails: &[String]) -> Routing {
        let targets = own_targets(event, None, fallback_emails);
        Routing {
            disposition: if targets.is_empty() {
                Disposition::DeadLetter
            } else {
                Disposition::Deliver
            },
            targets,
            matched_rules: Vec::new(),
            escalations: Vec::new(),
            escalated_after: None,
        }
    }
}

/// The event's own targets, de-duplicated, each with `rule` and `fallback`.
fn own_targets(event: &Event, rule: Option<&str>, fallback: &[String]) -> Vec<RoutedTarget> {
    let mut targets = Vec::new();
    for target in event.own_targets() {
        push_unique(&mut targets, resolve(target, event), rule, fallback);
    }
    targets
}

fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|s| !s.trim().is_empty())
}

/// Adds a target unless an equal one is already there (the first one wins).
/// Target lists are short, so a linear scan beats hashing.
fn push_unique(
    targets: &mut Vec<RoutedTarget>,
    target: Target,
    rule: Option<&str>,
    fallback: &[String],
) {
    if targets.iter().any(|t| t.target == target) {
        return;
    }
    targets.push(RoutedTarget {
        target,
        rule: rule.map(str::to_string),
        fallback_emails: fallback.to_vec(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Assignee, Severity};

    fn rules(yaml: &str) -> Rules {
        match Rules::from_yaml(yaml, "rules.yaml") {
            Ok(loaded) => loaded.rules,
            Err(e) => panic!("{e}"),
        }
    }

    fn event(kind: &str, severity: Severity, labels: &[(&str, &str)]) -> Event {
        Event {
            id: "e1".into(),
            kind: kind.into(),
            severity,
            title: "Checkout API error rate above SLO".into(),
            workspace: None,
            occurred_at: None,
            source: None,
            summary: None,
            ticket: None,
            assignee: None,
            level: None,
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            comment: None,
            targets: None,
            dedup_key: None,
            acknowledged_by: None,
            received: Default::default(),
        }
    }

    fn targets(routing: &Routing) -> Vec<String> {
        routing
            .targets
            .iter()
            .map(|t| t.target.to_string())
            .collect()
    }

    const LAYERED: &str = r##"
version: 1
defaults:
  slack_channel: "#escalations"
  email: ["oncall@example.com"]
rules:
  - name: audit
    matchers: ['severity=~"critical|high"']
    notify: [{slack_channel: C0AUDIT}]
    continue: true
  - name: payments
    matchers: [team=payments]
    notify:
      - slack_channel: C0PAY
      - slack_user: U0LEAD
    email: [payments-oncall@example.com]
  - name: payments-again
    matchers: [team=payments]
    notify: [{slack_channel: C0NEVER}]
  - name: everything-else
    notify: [{slack_channel: C0REST}]
"##;

    #[test]
    fn rules_apply_in_order_and_the_first_match_without_continue_stops() {
        let r = rules(LAYERED);
        let routing = r.route(&event(
            "issue.created",
            Severity::Critical,
            &[("team", "payments")],
        ));
        assert_eq!(routing.matched_rules, ["audit", "payments"]);
        assert_eq!(
            targets(&routing),
            [
                "slack_channel:C0AUDIT",
                "slack_channel:C0PAY",
                "slack_user:U0LEAD"
            ]
        );
        assert_eq!(routing.disposition, Disposition::Deliver);
    }

    #[test]
    fn each_target_carries_its_rule_and_fallback_emails() {
        let r = rules(LAYERED);
        let routing = r.route(&event(
            "issue.created",
            Severity::Critical,
            &[("team", "payments")],
        ));
        let audit = &routing.targets[0];
        assert_eq!(audit.rule.as_deref(), Some("audit"));
        assert_eq!(audit.fallback_emails, ["oncall@example.com"]);
        let pay = &routing.targets[1];
        assert_eq!(pay.rule.as_deref(), Some("payments"));
        assert_eq!(pay.fallback_emails, ["payments-oncall@example.com"]);
    }

    #[test]
    fn a_rule_without_matchers_catches_what_earlier_rules_left() {
        let r = rules(LAYERED);
        let routing = r.route(&event("issue.created", Severity::Low, &[("team", "web")]));
        assert_eq!(routing.matched_rules, ["everything-else"]);
        assert_eq!(targets(&routing), ["slack_channel:C0REST"]);
    }

    #[test]
    fn targets_are_merged_without_duplicates_first_occurrence_wins() {
        let r = rules(
            r#"
version: 1
rules:
  - name: first
    notify: [{slack_channel: C1}, {slack_user: U1}]
    continue: true
  - name: second
    notify: [{slack_user: U1}, {slack_channel: C2}, {slack_channel: C1}]
"#,
        );
        let mut e = event("t", Severity::Info, &[]);
        e.targets = Some(vec![
            Target::SlackChannel("C2".into()),
            Target::Email("x@example.com".into()),
        ]);
        let routing = r.route(&e);
        assert_eq!(
            targets(&routing),
            [
                "slack_channel:C1",
                "slack_user:U1",
                "slack_channel:C2",
                "email:x@example.com"
            ]
        );
        assert_eq!(routing.targets[2].rule.as_deref(), Some("second"));
        assert_eq!(routing.targets[3].rule, None);
    }

    const ASSIGNEE: &str = r#"
version: 1
rules:
  - name: owner
    notify: [assignee, {slack_user: U0ANA}]
"#;

    #[test]
    fn assignee_resolves_to_the_slack_user_first() {
        let mut e = event("t", Severity::Info, &[]);
        e.assignee = Some(Assignee {
            name: Some("Ana".into()),
            email: Some("ana@example.com".into()),
            slack_user: Some("U0ANA".into()),
        });
        // Resolves to the same user as the explicit target: notified once.
        assert_eq!(targets(&rules(ASSIGNEE).route(&e)), ["slack_user:U0ANA"]);
    }

    #[test]
    fn assignee_resolves_to_their_email_without_a_slack_user() {
        let mut e = event("t", Severity::Info, &[]);
        e.assignee = Some(Assignee {
            name: Some("Ana".into()),
            email: Some("ana@example.com".into()),
            slack_user: None,
        });
        assert_eq!(
            targets(&rules(ASSIGNEE).route(&e)),
            ["slack_email:ana@example.com", "slack_user:U0ANA"]
        );
    }

    #[test]
    fn an_unknown_assignee_stays_assignee_for_delivery_to_fall_back() {
        let mut e = event("t", Severity::Info, &[]);
        assert_eq!(
            targets(&rules(ASSIGNEE).route(&e)),
            ["assignee", "slack_user:U0ANA"]
        );
        e.assignee = Some(Assignee {
            name: Some("Ana".into()),
            email: Some(" ".into()),
            slack_user: Some(String::new()),
        });
        assert_eq!(
            targets(&rules(ASSIGNEE).route(&e)),
            ["assignee", "slack_user:U0ANA"]
        );
    }

    const SILENCE: &str = r##"
version: 1
defaults: {slack_channel: "#escalations"}
rules:
  - name: mute-test-env
    matchers: [env=test]
    notify: []
  - name: mute-info-but-go-on
    matchers: [severity=info]
    notify: []
    continue: true
  - name: web
    matchers: [team=web]
    notify: [{slack_channel: C0WEB}]
"##;

    #[test]
    fn notify_nothing_silences_what_it_matches() {
        let r = rules(SILENCE);
        let routing = r.route(&event(
            "t",
            Severity::High,
            &[("env", "test"), ("team", "web")],
        ));
        assert_eq!(
            routing.disposition,
            Disposition::Silenced {
                rule: "mute-test-env".into()
            }
        );
        assert!(routing.targets.is_empty());
        assert_eq!(routing.matched_rules, ["mute-test-env"]);
    }

    #[test]
    fn a_silencing_rule_with_continue_yields_to_later_targets() {
        let r = rules(SILENCE);
        let routing = r.route(&event("t", Severity::Info, &[("team", "web")]));
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert_eq!(targets(&routing), ["slack_channel:C0WEB"]);
        // ... but alone it silences, and the unmatched default does not apply.
        let routing = r.route(&event("t", Severity::Info, &[]));
        assert_eq!(
            routing.disposition,
            Disposition::Silenced {
                rule: "mute-info-but-go-on".into()
            }
        );
    }

    #[test]
    fn the_events_own_targets_survive_silencing() {
        let r = rules(SILENCE);
        let mut e = event("t", Severity::High, &[("env", "test")]);
        e.targets = Some(vec![Target::SlackUser("U0ME".into())]);
        let routing = r.route(&e);
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert_eq!(targets(&routing), ["slack_user:U0ME"]);
    }

    fn unmatched(policy: &str, defaults: &str) -> Routing {
        let yaml = format!(
            "version: 1\n{defaults}\nunmatched: {policy}\nrules:\n  - name: pay\n    matchers: [team=payments]\n    notify: [{{slack_channel: C0PAY}}]\n"
        );
        rules(&yaml).route(&event("t", Severity::Info, &[("team", "web")]))
    }

    #[test]
    fn unmatched_default_goes_to_the_default_channel() {
        let routing = unmatched(
            "default",
            "defaults: {slack_channel: '#escalations', email: [oncall@example.com]}",
        );
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert_eq!(
            routing.targets,
            [RoutedTarget {
                target: Target::SlackChannel("#escalations".into()),
                rule: None,
                fallback_emails: vec!["oncall@example.com".into()],
            }]
        );
        assert!(routing.matched_rules.is_empty());
    }

    #[test]
    fn unmatched_default_without_a_channel_emails_the_defaults() {
        let routing = unmatched(
            "default",
            "defaults: {email: [a@example.com, b@example.com]}",
        );
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert_eq!(
            targets(&routing),
            ["email:a@example.com", "email:b@example.com"]
        );
    }

    #[test]
    fn unmatched_default_with_no_defaults_dead_letters() {
        let routing = unmatched("default", "");
        assert_eq!(routing.disposition, Disposition::DeadLetter);
        assert!(routing.targets.is_empty());
    }

    #[test]
    fn unmatched_drop_and_dead_letter() {
        let defaults = "defaults: {slack_channel: '#escalations'}";
        assert_eq!(
            unmatched("drop", defaults).disposition,
            Disposition::Dropped
        );
        assert_eq!(
            unmatched("dead-letter", defaults).disposition,
            Disposition::DeadLetter
        );
    }

    #[test]
    fn an_event_naming_its_own_targets_bypasses_unmatched() {
        let r = rules(
            "version: 1\nunmatched: drop\nrules:\n  - name: pay\n    matchers: [team=payments]\n    notify: [{slack_channel: C0PAY}]\n",
        );
        let mut e = event("t", Severity::Info, &[]);
        e.targets = Some(vec![Target::Email("me@example.com".into())]);
        let routing = r.route(&e);
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert_eq!(targets(&routing), ["email:me@example.com"]);
        assert!(routing.matched_rules.is_empty());
    }

    #[test]
    fn a_built_in_field_wins_over_a_label_of_the_same_name() {
        let r = rules(
            "version: 1\nunmatched: drop\nrules:\n  - name: crit\n    matchers: [severity=critical]\n    notify: [{slack_channel: C0CRIT}]\n",
        );
        let spoofed = event("t", Severity::Low, &[("severity", "critical")]);
        assert_eq!(r.route(&spoofed).disposition, Disposition::Dropped);
        let real = event("t", Severity::Critical, &[]);
        assert_eq!(r.route(&real).matched_rules, ["crit"]);
    }

    #[test]
    fn explain_shows_each_rule_and_the_first_failing_matcher() {
        let r = rules(LAYERED);
        let explanation = r.explain(&event(
            "issue.created",
            Severity::Low,
            &[("team", "payments")],
        ));
        let steps: Vec<_> = explanation
            .steps
            .iter()
            .map(|s| {
                (
                    s.rule.as_str(),
                    s.evaluated,
                    s.matched,
                    s.failed_matcher.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                ("audit", true, false, Some(r#"severity=~"critical|high""#)),
                ("payments", true, true, None),
                ("payments-again", false, false, None),
                ("everything-else", false, false, None),
            ]
        );
        assert_eq!(
            explanation.routing,
            r.route(&event(
                "issue.created",
                Severity::Low,
                &[("team", "payments")]
            ))
        );
    }

    #[test]
    fn a_regex_shared_by_rules_gives_each_rule_its_own_answer() {
        // `=~` and `!~` on the same label and regex share one memo slot.
        let r = rules(
            r#"
version: 1
unmatched: drop
rules:
  - name: not-escalation
    matchers: ['type!~"escalation\..*"']
    notify: [{slack_channel: C1}]
    continue: true
  - name: escalation
    matchers: [team=web, 'type=~"escalation\..*"']
    notify: [{slack_channel: C2}]
"#,
        );
        let e = event("escalation.triggered", Severity::Info, &[("team", "web")]);
        assert_eq!(r.route(&e).matched_rules, ["escalation"]);
        assert_eq!(r.explain(&e).routing, r.route(&e));
        let e = event("issue.created", Severity::Info, &[("team", "web")]);
        assert_eq!(r.route(&e).matched_rules, ["not-escalation"]);
    }

    #[test]
    fn counts_and_defaults_are_exposed() {
        let r = rules(LAYERED);
        assert_eq!(r.rule_count(), 4);
        assert_eq!(r.target_count(), 5);
        assert_eq!(r.default_channel(), Some("#escalations"));
        assert_eq!(r.default_emails(), ["oncall@example.com"]);
        assert_eq!(r.unmatched(), Unmatched::Default);
        assert_eq!(
            r.rule_names().collect::<Vec<_>>(),
            ["audit", "payments", "payments-again", "everything-else"]
        );
    }

    #[test]
    fn rules_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Rules>();
    }

    #[test]
    fn own_targets_only_applies_no_rule_and_falls_back_to_the_emails_given() {
        let r = rules(LAYERED);
        // Matches `audit` and `payments`, which must not add recipients.
        let mut e = event("issue.created", Severity::Critical, &[("team", "payments")]);
        e.targets = Some(vec![
            Target::SlackChannel("#payments".into()),
            Target::SlackChannel("#payments".into()),
        ]);
        let routing = Routing::own_targets_only(&e, r.default_emails());
        assert_eq!(targets(&routing), ["slack_channel:#payments"]);
        assert_eq!(routing.disposition, Disposition::Deliver);
        assert!(routing.matched_rules.is_empty() && routing.escalations.is_empty());
        assert_eq!(routing.targets[0].rule, None);
        assert_eq!(routing.targets[0].fallback_emails, ["oncall@example.com"]);

        e.targets = None;
        let nowhere = Routing::own_targets_only(&e, &[]);
        assert!(nowhere.targets.is_empty());
        assert_eq!(nowhere.disposition, Disposition::DeadLetter);
    }

    #[test]
    fn routing_serializes_for_the_cli() {
        let routing = unmatched("drop", "");
        assert_eq!(
            serde_json::to_value(&routing).unwrap(),
            serde_json::json!({"targets": [], "matched_rules": [], "disposition": {"kind": "dropped"}})
        );
    }
}
