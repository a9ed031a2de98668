//! Truncation: for any text (multibyte, combining marks, emoji, `&<>`-heavy
//! so escapes are long) a cut never splits an escape, never panics, keeps
//! almost all it may, and every part of a message stays within Slack's limits
//! (NOTES.md, Block Kit reference): header 150, section text 3000, a field
//! 2000 and at most 10 of them, button value 2000 and URL 3000, ≤ 50 blocks;
//! the top-level `text` is held to 3000 (`chat.update` takes 4,000).

use alert_router::deliver::slack::message::{escape, neutralise_plain, truncate};
use proptest::prelude::*;
use serde_json::Value;

use super::escaping::{case, every_angle_bracket_is_joined, texts_of};
use super::{hostile_text, mrkdwn_sequences};

/// The most a cut may give up beyond its `…`: a cut entity (`&amp` is four
/// characters) and the `<` before it.
const MAX_LOSS: usize = 5;

/// A limit the code uses, or any small one.
fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=40, Just(150), Just(2000), Just(3000)]
}

fn chars(text: &str) -> usize {
    text.chars().count()
}

/// Within `limit`; untouched when it fits; else a prefix and `…`, short of
/// the limit by at most [`MAX_LOSS`].
fn assert_a_fair_cut(text: &str, cut: &str, limit: usize) -> Result<(), TestCaseError> {
    prop_assert!(chars(cut) <= limit, "{} > {limit}", chars(cut));
    if chars(text) <= limit {
        prop_assert_eq!(cut, text);
    } else {
        let kept = cut.strip_suffix('…');
        prop_assert!(kept.is_some(), "a cut ends with an ellipsis: {cut:?}");
        let kept = kept.unwrap_or_default();
        prop_assert!(
            text.starts_with(kept),
            "{cut:?} is not a prefix of the text"
        );
        prop_assert!(
            chars(kept) + 1 + MAX_LOSS >= limit,
            "kept {} characters of {limit}: {cut:?}",
            chars(kept)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_text_is_cut_fairly(text in hostile_text(1200), limit in limit()) {
        assert_a_fair_cut(&text, &truncate(&text, limit), limit)?;
    }

    #[test]
    fn escaped_text_is_never_cut_inside_an_entity(text in hostile_text(1200), limit in limit()) {
        let escaped = escape(&text);
        let cut = truncate(&escaped, limit);
        assert_a_fair_cut(&escaped, &cut, limit)?;
        prop_assert_eq!(mrkdwn_sequences(&cut), Ok(vec![]));
    }

    #[test]
    fn plain_text_is_never_cut_between_an_angle_bracket_and_its_joiner(
        text in hostile_text(400),
        limit in limit(),
    ) {
        let plain = neutralise_plain(&text);
        let cut = truncate(&plain, limit);
        assert_a_fair_cut(&plain, &cut, limit)?;
        prop_assert!(every_angle_bracket_is_joined(&cut), "{cut:?}");
    }
}

fn text_len(value: &Value) -> usize {
    value["text"].as_str().map(chars).unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_part_of_a_message_stays_within_slacks_limits(case in case()) {
        let message = case.rendered();
        prop_assert!(chars(message["text"].as_str().unwrap_or_default()) <= 3000);
        let blocks = message["blocks"].as_array().cloned().unwrap_or_default();
        prop_assert!(blocks.len() <= 50);
        let attachment_blocks = message["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["blocks"].as_array().cloned().unwrap_or_default());
        for block in blocks.iter().cloned().chain(attachment_blocks) {
            match block["type"].as_str() {
                Some("header") => prop_assert!(text_len(&block["text"]) <= 150, "{block}"),
                Some("section") => {
                    prop_assert!(text_len(&block["text"]) <= 3000);
                    let fields = block["fields"].as_array().cloned().unwrap_or_default();
                    prop_assert!(fields.len() <= 10);
                    for field in fields {
                        prop_assert!(text_len(&field) <= 2000, "{field}");
                    }
                }
                Some("context") => {
                    let elements = block["elements"].as_array().cloned().unwrap_or_default();
                    prop_assert!(elements.len() <= 10);
                    for element in elements {
                        prop_assert!(text_len(&element) <= 3000);
                    }
                }
                Some("actions") => {
                    for button in block["elements"].as_array().cloned().unwrap_or_default() {
                        prop_assert!(text_len(&button["text"]) <= 75);
                        prop_assert!(button["action_id"].as_str().map_or(0, chars) <= 255);
                        prop_assert!(button["value"].as_str().map_or(0, chars) <= 2000);
                        prop_assert!(button["url"].as_str().map_or(0, chars) <= 3000);
                    }
                }
                other => prop_assert!(false, "unexpected block {other:?}"),
            }
        }
        // Every text object, wherever it is, is within the general 3000.
        for kind in ["mrkdwn", "plain_text"] {
            for text in texts_of(&message, kind) {
                prop_assert!(chars(&text) <= 3000);
            }
        }
    }
}
