//! Fuzz target `rules_file`: a rules file parsed and validated as the worker
//! loads it (`Rules::from_yaml`). Every diagnostic, error or warning, must
//! point inside the file (a 1-based line that exists, a column on it or just
//! after its end), errors come in file order, and a file that loads routes
//! events the same way with and without the explanation `rules test` prints.
#![no_main]

use std::sync::LazyLock;

use alert_router::event::{DEFAULT_MAX_BODY_BYTES, Event};
use alert_router::rules::{Diagnostic, Level, Rules};
use libfuzzer_sys::fuzz_target;

/// Events that exercise the built-in labels, free labels and own targets.
static EVENTS: LazyLock<Vec<Event>> = LazyLock::new(|| {
    [
        include_str!("../../examples/escalation.json"),
        r#"{"id":"e2","type":"issue.created","severity":"low","title":"t","source":"aexy","labels":{"team":"","env":"dev"}}"#,
        r##"{"id":"e3","type":"escalation.resolved","severity":"info","title":"t","level":0,"dedup_key":"k","targets":[{"slack_channel":"#ops"},"assignee"],"assignee":{"slack_user":"U1"}}"##,
        r#"{"id":"e4","type":"security.alert","severity":"high","title":"t","workspace":"T2","labels":{"team":"security","severity":"low","a:b":"x\ny"}}"#,
    ]
    .iter()
    .map(|json| Event::decode(json.as_bytes(), DEFAULT_MAX_BODY_BYTES).expect("a valid event"))
    .collect()
});

fuzz_target!(|data: &[u8]| {
    // The worker reads the file as UTF-8 text; anything else never gets here.
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let lines = line_lengths(source);
    match Rules::from_yaml(source, "rules.yaml") {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                assert_eq!(warning.level, Level::Warning);
                assert_inside(warning, &lines);
            }
            for event in EVENTS.iter() {
                let routing = loaded.rules.route(event);
                let explained = loaded.rules.explain(event);
                assert_eq!(
                    explained.routing, routing,
                    "routing with and without the explanation agree"
                );
                assert_eq!(explained.steps.len(), loaded.rules.rule_count());
                let matched: Vec<&str> = explained
                    .steps
                    .iter()
                    .filter(|s| s.matched)
                    .map(|s| s.rule.as_str())
                    .collect();
                assert_eq!(
                    matched, routing.matched_rules,
                    "the matched rules are the ones explained"
                );
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refused file says why");
            for error in &errors.0 {
                assert_eq!(error.level, Level::Error);
                assert_inside(error, &lines);
            }
            let positions: Vec<(usize, usize)> =
                errors.0.iter().map(|d| (d.line, d.column)).collect();
            assert!(
                positions.is_sorted(),
                "errors are reported in file order: {positions:?}"
            );
        }
    }
});

/// The length in characters of each line, as YAML breaks lines (`\n`,
/// `\r\n` or `\r`); a file ending in a line break has an empty last line.
fn line_lengths(source: &str) -> Vec<usize> {
    let mut lengths = vec![0];
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => lengths.push(0),
            _ => *lengths.last_mut().expect("one line at least") += 1,
        }
    }
    lengths
}

fn assert_inside(diagnostic: &Diagnostic, lines: &[usize]) {
    let (line, column) = (diagnostic.line, diagnostic.column);
    assert!(
        (1..=lines.len()).contains(&line),
        "line {line} of a {}-line file: {diagnostic}",
        lines.len()
    );
    let length = lines[line - 1];
    assert!(
        (1..=length + 1).contains(&column),
        "column {column} of line {line}, {length} characters long: {diagnostic}"
    );
}
