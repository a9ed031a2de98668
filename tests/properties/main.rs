//! Property tests (issue 9): routing against a naive reference, Slack text
//! escaping and truncation for any input, and the shared rate limiter under
//! three concurrent clients on the real Redis.
//!
//! Case counts keep the whole binary well under a minute on a 2-core machine.
//! A failing case is saved by proptest in `tests/proptest-regressions/`,
//! which is committed so that every run tries those cases first.

mod escaping;
mod rate_limit;
mod routing;
mod truncation;

use proptest::prelude::*;
use proptest::sample::select;

/// U+2060 WORD JOINER, which the header puts after every `<`.
pub const WORD_JOINER: char = '\u{2060}';

/// Text Slack would act on, and text that only looks like it: every kind of
/// mention and link, entities whole and cut, the characters that matter in
/// mrkdwn, and multibyte text (combining marks, ZWJ emoji, CJK).
const PIECES: &[&str] = &[
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<!subteam^S0ONCALL|@oncall>",
    "<@U0ALICE>",
    "<@W0ENT|ana>",
    "<#C0GENERAL|general>",
    "<https://evil.example|click>",
    "<mailto:a@example.com|mail>",
    "<!date^1700000000^{date}|x>",
    "&",
    "<",
    ">",
    "&amp;",
    "&lt;",
    "&gt",
    "&am",
    "|",
    "!",
    "@",
    "#",
    "^",
    "*_~`",
    "\u{2060}",
    "e\u{301}",
    "👩\u{200d}👩\u{200d}👧",
    "🔴",
    "日本語",
    "\n",
    " ",
    "a",
    "xyz",
];

/// Strings of up to `max_pieces` pieces (or any characters at all).
pub fn hostile_text(max_pieces: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            8 => select(PIECES).prop_map(str::to_string),
            2 => any::<char>().prop_map(String::from),
        ],
        0..=max_pieces,
    )
    .prop_map(|pieces| pieces.concat())
}

/// The `<…>` sequences Slack acts on in mrkdwn text, in order; an error when
/// the text holds a `&` that starts no `&amp;`, `&lt;` or `&gt;`, a `>`
/// outside a sequence, or a `<` that no `>` closes.
pub fn mrkdwn_sequences(text: &str) -> Result<Vec<&str>, String> {
    let mut sequences = Vec::new();
    let mut i = 0;
    // `&`, `<` and `>` are ASCII, so byte offsets at them are char boundaries.
    let bytes = text.as_bytes();
    while i < bytes.len() {
        match bytes[i] {
            b'&' if !["&amp;", "&lt;", "&gt;"]
                .iter()
                .any(|entity| text[i..].starts_with(entity)) =>
            {
                return Err(format!("a bare `&` at byte {i} of {text:?}"));
            }
            b'<' => {
                let Some(len) = text[i..].find('>') else {
                    return Err(format!("a `<` at byte {i} that no `>` closes in {text:?}"));
                };
                let sequence = &text[i..=i + len];
                if sequence[1..].contains('<') {
                    return Err(format!("a `<` inside {sequence:?}"));
                }
                sequences.push(sequence);
                i += len + 1;
                continue;
            }
            b'>' => {
                return Err(format!(
                    "a `>` outside any sequence at byte {i} of {text:?}"
                ));
            }
            _ => {}
        }
        i += 1;
    }
    Ok(sequences)
}

/// The text as Slack shows mrkdwn of escaped text: the three entities undone.
pub fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[test]
fn the_sequence_reader_tells_live_text_from_escaped_text() {
    assert_eq!(mrkdwn_sequences("a &lt;!here&gt; &amp; b"), Ok(vec![]));
    assert_eq!(
        mrkdwn_sequences("hi <!here> and <@U1>"),
        Ok(vec!["<!here>", "<@U1>"])
    );
    assert!(mrkdwn_sequences("R&D").is_err());
    assert!(mrkdwn_sequences("&am…").is_err());
    assert!(mrkdwn_sequences("<https://x|TCK…").is_err());
    assert!(mrkdwn_sequences("a > b").is_err());
}
