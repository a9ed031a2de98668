//! Routing throughput: one realistic event against generated rule sets of
//! 10, 100 and 1000 rules, with the only match near the end, so the router
//! evaluates almost every rule.

use std::fmt::Write as _;
use std::hint::black_box;

use alert_router::event::{DEFAULT_MAX_BODY_BYTES, Event};
use alert_router::rules::{Disposition, Rules};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// `n` rules mixing equality and regex matchers; rule `n - 2` matches the
/// event, so the router evaluates almost every rule before it finds one.
fn rule_set(n: usize) -> String {
    let mut yaml = String::from(
        "version: 1\ndefaults:\n  slack_channel: \"#escalations\"\n  email: [oncall@example.com]\nrules:\n",
    );
    for i in 0..n {
        let team = if i == n - 2 {
            "payments".to_string()
        } else {
            format!("team-{i}")
        };
        let _ = write!(
            yaml,
            "  - name: rule-{i}\n    matchers:\n      - type=~\"escalation\\\\..*\"\n      - severity=~\"critical|high\"\n      - team=\"{team}\"\n      - env!~\"dev|staging\"\n    notify:\n      - slack_channel: C{i:05}\n      - assignee\n    email: [team-{i}@example.com]\n"
        );
    }
    yaml
}

/// Like [`rule_set`], but every rule tells itself apart by its own regex, so
/// nothing can be shared or skipped cheaply: the pessimistic case.
fn regex_rule_set(n: usize) -> String {
    let mut yaml = String::from("version: 1\nrules:\n");
    for i in 0..n {
        let service = if i == n - 2 {
            format!("check(out|in)|svc-{i}-.+")
        } else {
            format!("svc-{i}-.+")
        };
        let _ = write!(
            yaml,
            "  - name: rule-{i}\n    matchers:\n      - type=~\"escalation\\\\..*\"\n      - service=~\"{service}\"\n    notify:\n      - slack_channel: C{i:05}\n"
        );
    }
    yaml
}

fn event() -> Event {
    let body = br#"{"id":"esc-2041-2","type":"escalation.escalated","severity":"critical",
        "title":"Checkout API error rate above SLO","workspace":"T0AEXY01",
        "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041"},
        "assignee":{"name":"Ana Ruiz","email":"ana@example.com","slack_user":"U0ANA"},
        "level":2,"labels":{"team":"payments","env":"prod","service":"checkout"}}"#;
    match Event::decode(body, DEFAULT_MAX_BODY_BYTES) {
        Ok(event) => event,
        Err(e) => panic!("bench event: {e}"),
    }
}

fn bench_route(c: &mut Criterion) {
    let event = event();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    for n in [10, 100, 1000] {
        let rules = match Rules::from_yaml(&rule_set(n), "bench.yaml") {
            Ok(loaded) => loaded.rules,
            Err(e) => panic!("{e}"),
        };
        let routing = rules.route(&event);
        assert_eq!(routing.matched_rules, [format!("rule-{}", n - 2)]);
        assert_eq!(routing.disposition, Disposition::Deliver);
        group.bench_function(format!("{n}_rules"), |b| {
            b.iter(|| rules.route(black_box(&event)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("route_distinct_regexes");
    group.throughput(Throughput::Elements(1));
    for n in [10, 100, 1000] {
        let rules = match Rules::from_yaml(&regex_rule_set(n), "bench.yaml") {
            Ok(loaded) => loaded.rules,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            rules.route(&event).matched_rules,
            [format!("rule-{}", n - 2)]
        );
        group.bench_function(format!("{n}_rules"), |b| {
            b.iter(|| rules.route(black_box(&event)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
