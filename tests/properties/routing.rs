//! Routing: `Rules::route` and `Rules::explain` agree with a naive evaluator
//! written from the README's "How an event is routed", for random rule files
//! and events drawn from small shared alphabets (so rules do match).

use std::collections::BTreeMap;

use alert_router::event::{Assignee, Event, Severity, Target};
use alert_router::rules::{Disposition, Rules};
use proptest::prelude::*;
use proptest::sample::select;
use regex::Regex;

// ---------------------------------------------------------------------------
// The model: a rules file and an event, as plain data.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

#[derive(Debug, Clone)]
struct MatcherSpec {
    name: &'static str,
    op: Op,
    value: String,
}

#[derive(Debug, Clone)]
struct RuleSpec {
    /// Items of `matchers:`; an item may hold two comma-separated matchers.
    matcher_items: Vec<Vec<MatcherSpec>>,
    notify: Vec<Target>,
    email: Vec<String>,
    continue_: bool,
    escalates: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    Default,
    Drop,
    DeadLetter,
}

#[derive(Debug, Clone)]
struct FileSpec {
    default_channel: Option<String>,
    default_emails: Vec<String>,
    /// `None`: the key is left out (and means `default`).
    unmatched: Option<Policy>,
    rules: Vec<RuleSpec>,
}

/// Label names a matcher may test, each with the values events draw from, so
/// that `=` and alternations hit often. `""` is "missing".
const LABELS: &[(&str, &[&str])] = &[
    (
        "type",
        &[
            "escalation.triggered",
            "issue.created",
            "escalation.resolved",
        ],
    ),
    ("severity", &["critical", "high", "medium", "low", "info"]),
    ("source", &["aexy", "ox", ""]),
    ("workspace", &["T1", "T2", ""]),
    ("level", &["0", "1", "12", ""]),
    ("team", &["payments", "web", "zürich", ""]),
    ("env", &["prod", "staging", "a b", ""]),
];

/// Regexes beyond plain alternations: each means the same in Go's RE2 and the
/// `regex` crate, so the reference can compile them as they are.
const REGEXES: &[&str] = &[
    ".*",
    ".+",
    "",
    "[a-z]+",
    "(p|w).*",
    r"escalation\..*",
    r"issue\.created",
    "[0-9]",
    "[0-9]+",
    "z.rich",
    "(critical|high)?",
    "a b|prod",
    "T[12]",
];

fn values_of(name: &str) -> &'static [&'static str] {
    LABELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or(&[""])
}

fn matcher() -> impl Strategy<Value = MatcherSpec> {
    let label = select(LABELS.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    (
        label,
        select(vec![Op::Equal, Op::NotEqual, Op::Regex, Op::NotRegex]),
    )
        .prop_flat_map(|(name, op)| {
            let values: Vec<String> = values_of(name).iter().map(|v| v.to_string()).collect();
            let value = match op {
                Op::Equal | Op::NotEqual => select(values).boxed(),
                // A plain alternation (the router compares strings for these)
                // or a real regex.
                Op::Regex | Op::NotRegex => prop_oneof![
                    proptest::sample::subsequence(values.clone(), 1..=values.len().min(3))
                        .prop_map(|vs| vs.join("|")),
                    select(REGEXES.iter().map(|r| r.to_string()).collect::<Vec<_>>()),
                ]
                .boxed(),
            };
            value.prop_map(move |value| MatcherSpec { name, op, value })
        })
}

fn target() -> impl Strategy<Value = Target> {
    select(vec![
        Target::SlackChannel("C1".into()),
        Target::SlackChannel("#pay".into()),
        Target::SlackUser("U0ANA".into()),
        Target::SlackUser("U1".into()),
        Target::SlackEmail("ana@example.com".into()),
        Target::Email("e@example.com".into()),
        Target::Assignee,
    ])
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    (
        prop::collection::vec(prop::collection::vec(matcher(), 1..=2), 0..=3),
        prop::collection::vec(target(), 0..=3),
        select(vec![
            vec![],
            vec!["r@example.com".to_string()],
            vec!["r@example.com".into(), "s@example.com".into()],
        ]),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(matcher_items, notify, email, continue_, escalates)| RuleSpec {
                matcher_items,
                notify,
                email,
                continue_,
                escalates,
            },
        )
}

fn file() -> impl Strategy<Value = FileSpec> {
    (
        prop::option::of(select(vec!["#esc".to_string(), "C0DEFAULT".into()])),
        select(vec![
            vec![],
            vec!["d@example.com".to_string()],
            vec!["d@example.com".into(), "e@example.com".into()],
        ]),
        prop::option::of(select(vec![
            Policy::Default,
            Policy::Drop,
            Policy::DeadLetter,
        ])),
        prop::collection::vec(rule(), 0..=6),
    )
        .prop_map(
            |(default_channel, default_emails, unmatched, rules)| FileSpec {
                default_channel,
                default_emails,
                unmatched,
                rules,
            },
        )
}

fn some_value(name: &'static str) -> impl Strategy<Value = Option<String>> {
    let present: Vec<String> = values_of(name)
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.to_string())
        .collect();
    prop::option::of(select(present))
}

fn event() -> impl Strategy<Value = Event> {
    let labels = prop::option::of(prop::collection::btree_map(
        // `severity`, `type` and `level` as labels try to spoof the built-ins.
        select(vec!["team", "env", "severity", "type", "level"]),
        select(vec![
            "payments", "web", "zürich", "prod", "staging", "a b", "", "critical", "1",
        ]),
        0..=4,
    ));
    let assignee = prop::option::of(
        (
            select(vec![None, Some("U0ANA"), Some(" "), Some("U9")]),
            select(vec![None, Some("ana@example.com"), Some("")]),
        )
            .prop_map(|(slack_user, email)| Assignee {
                name: Some("Ana".into()),
                email: email.map(str::to_string),
                slack_user: slack_user.map(str::to_string),
            }),
    );
    (
        select(values_of("type").to_vec()),
        select(vec![
            Severity::Critical,
            Severity::High,
            Severity::Medium,
            Severity::Low,
            Severity::Info,
        ]),
        some_value("source"),
        some_value("workspace"),
        prop::option::of(select(vec![0u64, 1, 12])),
        labels,
        prop::option::of(prop::collection::vec(target(), 0..=2)),
        assignee,
    )
        .prop_map(
            |(kind, severity, source, workspace, level, labels, targets, assignee)| Event {
                id: "e-1".into(),
                kind: kind.to_string(),
                severity,
                title: "Checkout API error rate above SLO".into(),
                workspace,
                occurred_at: None,
                source,
                summary: None,
                ticket: None,
                assignee,
                level,
                labels: labels.map(|l| {
                    l.into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>()
                }),
                comment: None,
                targets,
                dedup_key: None,
                acknowledged_by: None,
                received: Default::default(),
            },
        )
}

// ---------------------------------------------------------------------------
// Writing the model as a rules file.

fn op_text(op: Op) -> &'static str {
    match op {
        Op::Equal => "=",
        Op::NotEqual => "!=",
        Op::Regex => "=~",
        Op::NotRegex => "!~",
    }
}

/// `name op "value"` with Alertmanager's escapes inside the quotes.
fn matcher_text(m: &MatcherSpec) -> String {
    let mut value = String::new();
    for c in m.value.chars() {
        match c {
            '\\' => value.push_str(r"\\"),
            '"' => value.push_str("\\\""),
            '\n' => value.push_str(r"\n"),
            c => value.push(c),
        }
    }
    format!("{}{}\"{value}\"", m.name, op_text(m.op))
}

fn item_text(item: &[MatcherSpec]) -> String {
    item.iter().map(matcher_text).collect::<Vec<_>>().join(", ")
}

/// YAML single-quoted scalar.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn target_yaml(target: &Target) -> String {
    match target {
        Target::Assignee => "assignee".into(),
        Target::SlackChannel(v) => format!("{{slack_channel: {}}}", quoted(v)),
        Target::SlackUser(v) => format!("{{slack_user: {}}}", quoted(v)),
        Target::SlackEmail(v) => format!("{{slack_email: {}}}", quoted(v)),
        Target::Email(v) => format!("{{email: {}}}", quoted(v)),
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(", "))
}

fn yaml(spec: &FileSpec) -> String {
    let mut out = String::from("version: 1\n");
    if spec.default_channel.is_some() || !spec.default_emails.is_empty() {
        out.push_str("defaults:\n");
        if let Some(channel) = &spec.default_channel {
            out.push_str(&format!("  slack_channel: {}\n", quoted(channel)));
        }
        if !spec.default_emails.is_empty() {
            out.push_str(&format!(
                "  email: {}\n",
                list(spec.default_emails.iter().map(|e| quoted(e)))
            ));
        }
    }
    if let Some(policy) = spec.unmatched {
        out.push_str(match policy {
            Policy::Default => "unmatched: default\n",
            Policy::Drop => "unmatched: drop\n",
            Policy::DeadLetter => "unmatched: dead-letter\n",
        });
    }
    out.push_str("rules:\n");
    if spec.rules.is_empty() {
        out.push_str("  []\n");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        out.push_str(&format!("  - name: r{i}\n"));
        if !rule.matcher_items.is_empty() {
            out.push_str("    matchers:\n");
            for item in &rule.matcher_items {
                out.push_str(&format!("      - {}\n", quoted(&item_text(item))));
            }
        }
        out.push_str(&format!(
            "    notify: {}\n",
            list(rule.notify.iter().map(target_yaml))
        ));
        if !rule.email.is_empty() {
            out.push_str(&format!(
                "    email: {}\n",
                list(rule.email.iter().map(|e| quoted(e)))
            ));
        }
        out.push_str(&format!("    continue: {}\n", rule.continue_));
        if rule.escalates {
            out.push_str(
                "    escalate:\n      - after: 15m\n        notify: [{slack_user: U0HEAD}]\n",
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The reference evaluator, from the README alone.

/// A label's value: the built-in fields win over `labels`; missing is `""`.
fn label(event: &Event, name: &str) -> String {
    match name {
        "type" => event.kind.clone(),
        "severity" => event.severity.as_str().to_string(),
        "source" => event.source.clone().unwrap_or_default(),
        "workspace" => event.workspace.clone().unwrap_or_default(),
        "level" => event.level.map(|l| l.to_string()).unwrap_or_default(),
        other => event
            .labels
            .as_ref()
            .and_then(|l| l.get(other).cloned())
            .unwrap_or_default(),
    }
}

/// Regexes are anchored at both ends.
fn full_match(pattern: &str, value: &str) -> bool {
    Regex::new(&format!("^(?:{pattern})$"))
        .expect("the strategy only draws valid regexes")
        .is_match(value)
}

fn holds(m: &MatcherSpec, event: &Event) -> bool {
    let value = label(event, m.name);
    match m.op {
        Op::Equal => value == m.value,
        Op::NotEqual => value != m.value,
        Op::Regex => full_match(&m.value, &value),
        Op::NotRegex => !full_match(&m.value, &value),
    }
}

/// `assignee` becomes the assignee's Slack user, else their email (a blank
/// one counts as none); with neither it stays `assignee`.
fn resolve(target: &Target, event: &Event) -> Target {
    let present = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    match (target, &event.assignee) {
        (Target::Assignee, Some(a)) => {
            if let Some(user) = present(&a.slack_user) {
                Target::SlackUser(user)
            } else if let Some(email) = present(&a.email) {
                Target::SlackEmail(email)
            } else {
                Target::Assignee
            }
        }
        _ => target.clone(),
    }
}

/// A routed target as compared: (target, rule, fallback emails).
type Routed = (Target, Option<String>, Vec<String>);

#[derive(Debug, PartialEq)]
struct Expected {
    targets: Vec<Routed>,
    matched: Vec<String>,
    disposition: Disposition,
    escalating_rules: Vec<String>,
    /// Per rule: (evaluated, matched, first failing matcher as written).
    steps: Vec<(bool, bool, Option<String>)>,
}

fn add(targets: &mut Vec<Routed>, target: Target, rule: Option<String>, fallback: &[String]) {
    if !targets.iter().any(|(t, _, _)| *t == target) {
        targets.push((target, rule, fallback.to_vec()));
    }
}

fn reference(spec: &FileSpec, event: &Event) -> Expected {
    let mut targets = Vec::new();
    let mut matched = Vec::new();
    let mut escalating_rules = Vec::new();
    let mut steps = Vec::new();
    let mut stopped = false;
    for (i, rule) in spec.rules.iter().enumerate() {
        let name = format!("r{i}");
        if stopped {
            steps.push((false, false, None));
            continue;
        }
        let matchers: Vec<&MatcherSpec> = rule.matcher_items.iter().flatten().collect();
        let failed = matchers.iter().find(|m| !holds(m, event));
        steps.push((true, failed.is_none(), failed.map(|m| matcher_text(m))));
        if failed.is_some() {
            continue;
        }
        let fallback = if rule.email.is_empty() {
            &spec.default_emails
        } else {
            &rule.email
        };
        for target in &rule.notify {
            add(
                &mut targets,
                resolve(target, event),
                Some(name.clone()),
                fallback,
            );
        }
        if rule.escalates {
            escalating_rules.push(name.clone());
        }
        matched.push(name);
        stopped = !rule.continue_;
    }
    let own = event.targets.clone().unwrap_or_default();
    for target in &own {
        add(
            &mut targets,
            resolve(target, event),
            None,
            &spec.default_emails,
        );
    }
    let disposition = if !matched.is_empty() || !own.is_empty() {
        if targets.is_empty() {
            Disposition::Silenced {
                rule: matched[0].clone(),
            }
        } else {
            Disposition::Deliver
        }
    } else {
        match spec.unmatched.unwrap_or(Policy::Default) {
            Policy::Drop => Disposition::Dropped,
            Policy::DeadLetter => Disposition::DeadLetter,
            Policy::Default => {
                if let Some(channel) = &spec.default_channel {
                    targets.push((
                        Target::SlackChannel(channel.clone()),
                        None,
                        spec.default_emails.clone(),
                    ));
                } else {
                    for email in &spec.default_emails {
                        add(
                            &mut targets,
                            Target::Email(email.clone()),
                            None,
                            &spec.default_emails,
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
    };
    Expected {
        targets,
        matched,
        disposition,
        escalating_rules,
        steps,
    }
}

// ---------------------------------------------------------------------------

fn routed_by(rules: &Rules, event: &Event) -> Expected {
    let routing = rules.route(event);
    let explanation = rules.explain(event);
    assert_eq!(explanation.routing, routing, "explain routes as route does");
    Expected {
        targets: routing
            .targets
            .iter()
            .map(|t| (t.target.clone(), t.rule.clone(), t.fallback_emails.clone()))
            .collect(),
        matched: routing.matched_rules.clone(),
        disposition: routing.disposition.clone(),
        escalating_rules: routing.escalations.iter().map(|c| c.rule.clone()).collect(),
        steps: explanation
            .steps
            .iter()
            .map(|s| (s.evaluated, s.matched, s.failed_matcher.clone()))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn routing_equals_the_naive_reference(
        spec in file(),
        events in prop::collection::vec(event(), 1..=8),
    ) {
        let source = yaml(&spec);
        let rules = match Rules::from_yaml(&source, "rules.yaml") {
            Ok(loaded) => loaded.rules,
            Err(e) => panic!("the generated file loads:\n{source}\n{e}"),
        };
        for event in &events {
            prop_assert_eq!(
                routed_by(&rules, event),
                reference(&spec, event),
                "rules:\n{}\nevent: {}",
                source,
                serde_json::to_string(event).unwrap()
            );
        }
    }
}

/// The strategies are worth their cases only if rules often match and every
/// disposition occurs: measured over a fixed sample, not asserted per case.
#[test]
fn the_generated_cases_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut matched, mut continued, mut kinds) = (0, 0, std::collections::BTreeSet::new());
    for _ in 0..300 {
        let spec = file().new_tree(&mut runner).unwrap().current();
        let event = event().new_tree(&mut runner).unwrap().current();
        let expected = reference(&spec, &event);
        matched += usize::from(!expected.matched.is_empty());
        continued += usize::from(expected.matched.len() > 1);
        kinds.insert(match expected.disposition {
            Disposition::Deliver => "deliver",
            Disposition::Silenced { .. } => "silenced",
            Disposition::Dropped => "dropped",
            Disposition::DeadLetter => "dead-letter",
        });
    }
    assert!(matched > 100, "only {matched} of 300 events matched a rule");
    assert!(
        continued > 20,
        "only {continued} of 300 matched through `continue`"
    );
    assert_eq!(kinds.len(), 4, "dispositions seen: {kinds:?}");
}
