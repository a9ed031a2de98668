//! Fuzz target `matcher`: one Alertmanager-style matcher string, as a rule's
//! `matchers:` item holds it. The input is the matcher, then optionally
//! label values to test it on, each after a 0xFF byte (never part of UTF-8
//! text, so seeds stay readable). What it checks:
//! - a matcher's canonical form (`Display`) parses back to the same matcher,
//!   alone and in a list, and prints the same again;
//! - a line of matchers (`parse_list`) reads back from its canonical form;
//! - the fast paths agree with a real regex: an `=~` value that is a plain
//!   alternation (`critical|high`, compared as strings) matches exactly what
//!   the same pattern forced through the regex engine matches;
//! - `!=` and `!~` are the negation of `=` and `=~`;
//! - a matcher that claims to match anything matches every one-line value.
#![no_main]

use alert_router::rules::{MatchOp, Matcher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xFF);
    let Some(Ok(text)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let mut probes: Vec<String> = parts
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(str::to_string)
        .collect();

    if let Ok(list) = Matcher::parse_list(text) {
        let canonical: Vec<String> = list.iter().map(Matcher::to_string).collect();
        let line = canonical.join(",");
        let again = Matcher::parse_list(&line).expect("a canonical line parses");
        assert_eq!(
            again, list,
            "a line of matchers reads back from its canonical form"
        );
    }

    let Ok(matcher) = Matcher::parse(text) else {
        return;
    };
    let canonical = matcher.to_string();
    let again: Matcher = canonical.parse().expect("the canonical form parses");
    assert_eq!(
        again, matcher,
        "the canonical form parses to the same matcher"
    );
    assert_eq!(again.to_string(), canonical, "and prints the same");
    assert_eq!(
        Matcher::parse_list(&canonical).expect("the canonical form is a one-matcher line"),
        vec![matcher.clone()]
    );

    // Values to test: the fuzzer's, the matcher's own value and its pieces.
    probes.push(matcher.value().to_string());
    probes.extend(matcher.value().split('|').map(str::to_string));
    probes.push(String::new());

    let positive = match matcher.op() {
        MatchOp::Equal | MatchOp::NotEqual => None,
        MatchOp::Regex | MatchOp::NotRegex => Some(
            // A group is regex syntax: never a plain alternation, always the regex engine.
            Matcher::new(
                matcher.name(),
                MatchOp::Regex,
                &format!("(?:{})", matcher.value()),
            )
            .expect("a valid pattern stays valid inside a group"),
        ),
    };
    for probe in &probes {
        let result = matcher.matches_value(probe);
        let hit = match &positive {
            None => probe == matcher.value(),
            Some(regex) => regex.matches_value(probe),
        };
        let negated = matches!(matcher.op(), MatchOp::NotEqual | MatchOp::NotRegex);
        assert_eq!(
            result,
            hit != negated,
            "{canonical} on {probe:?}: the fast path and the regex engine agree"
        );
        if matcher.matches_anything() && !probe.contains('\n') {
            assert!(
                result,
                "{canonical} claims to match anything, but not {probe:?}"
            );
        }
    }
});
