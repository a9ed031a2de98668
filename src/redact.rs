//! Recipient addresses as logs and dead-letter headers show them: `a***@example.com`.
//!
//! Addresses are personal data that producers put in events; logs and
//! dead-letter headers travel further than the email does. Every place an
//! address can reach one goes through [`Addresses`], whose one rule is
//! [`redact_address`]; `log.show_addresses: true` turns it off.

use std::borrow::Cow;

use crate::event::Target;

/// How recipient addresses are shown: redacted (the default) or in full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Addresses {
    show: bool,
}

impl Addresses {
    /// `show`: `log.show_addresses`.
    pub fn new(show: bool) -> Addresses {
        Addresses { show }
    }

    /// One address as it may be shown.
    pub fn address<'a>(&self, address: &'a str) -> Cow<'a, str> {
        if self.show {
            Cow::Borrowed(address)
        } else {
            Cow::Owned(redact_address(address))
        }
    }

    /// A target as it may be shown: `email:a***@example.com`,
    /// `slack_channel:C0PAY` (channels and user ids are not personal).
    pub fn target(&self, target: &Target) -> String {
        match target {
            Target::Email(address) | Target::SlackEmail(address) => {
                format!("{}:{}", target.kind(), self.address(address))
            }
            other => other.to_string(),
        }
    }

    /// Free text (an error, a detail, an idempotency key) with every
    /// address in it redacted: SMTP servers and Slack echo addresses back.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.show {
            Cow::Borrowed(text)
        } else {
            redact_text(text)
        }
    }
}

/// `alice@example.com` → `a***@example.com`: the first character, `***`,
/// and everything from the last `@`; without an `@` (or with nothing before
/// it), `***`.
pub fn redact_address(address: &str) -> String {
    let address = address.trim();
    match (address.rfind('@'), address.chars().next()) {
        (Some(at), Some(first)) if at > 0 => format!("{first}***{}", &address[at..]),
        _ => "***".to_string(),
    }
}

/// [`redact_address`] applied to every `local@domain` in `text`.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = String::with_capacity(text.len());
    // Byte offset up to which `text` has been copied to `out`.
    let mut copied = 0;
    for (i, &(at, c)) in chars.iter().enumerate() {
        if c != '@' || at < copied {
            continue;
        }
        let start = chars[..i]
            .iter()
            .rposition(|&(_, c)| !is_local_char(c))
            .map_or(0, |p| p + 1);
        let end = chars[i + 1..]
            .iter()
            .position(|&(_, c)| !is_domain_char(c))
            .map_or(chars.len(), |p| i + 1 + p);
        // A sentence may end right after the domain.
        let mut end = end;
        while end > i + 1 && chars[end - 1].1 == '.' {
            end -= 1;
        }
        let local_start = chars[start].0.max(copied);
        if local_start >= at || end == i + 1 {
            continue;
        }
        let end_byte = chars.get(end).map_or(text.len(), |&(b, _)| b);
        out.push_str(&text[copied..local_start]);
        out.push_str(&redact_address(&text[local_start..end_byte]));
        copied = end_byte;
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// RFC 5322 allows a few more (`'`, `` ` ``, `{`, `|`, `}`, `/`), but
/// prose quotes addresses with them, and they almost never occur in one.
fn is_local_char(c: char) -> bool {
    c.is_alphanumeric() || "!#$%&*+=?^_~.-".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_keeps_its_first_character_and_its_domain() {
        assert_eq!(redact_address("alice@example.com"), "a***@example.com");
        assert_eq!(redact_address(" Bob@Example.COM "), "B***@Example.COM");
        assert_eq!(redact_address("not an address"), "***");
        assert_eq!(redact_address("@example.com"), "***");
        assert_eq!(redact_address(""), "***");
    }

    #[test]
    fn every_address_in_a_sentence_is_redacted() {
        assert_eq!(
            redact_text(
                "email:ops@example.com: SMTP server 127.0.0.1:25 replied 550: 5.1.1 <bob.smith@mail.example.org>: no such user."
            ),
            "email:o***@example.com: SMTP server 127.0.0.1:25 replied 550: 5.1.1 <b***@mail.example.org>: no such user."
        );
        assert_eq!(
            redact_text("slack:T1:email:zoë@example.com"),
            "slack:T1:email:z***@example.com"
        );
        assert_eq!(
            redact_text("address `ann@example.com` or 'bo@example.com'"),
            "address `a***@example.com` or 'b***@example.com'"
        );
    }

    #[test]
    fn text_without_addresses_is_unchanged() {
        for text in [
            "slack_channel:C0PAY failed: chat.postMessage: http_503",
            "@here look",
            "trailing at@",
        ] {
            assert_eq!(redact_text(text), text);
        }
    }

    #[test]
    fn redacting_twice_changes_nothing() {
        let once = redact_text("to a@example.com and `bo@example.net`");
        assert_eq!(once, "to a***@example.com and `b***@example.net`");
        assert_eq!(redact_text(&once), once);
    }

    #[test]
    fn showing_addresses_is_an_explicit_choice() {
        let shown = Addresses::new(true);
        let hidden = Addresses::default();
        let target = Target::Email("ana@example.com".into());
        assert_eq!(shown.target(&target), "email:ana@example.com");
        assert_eq!(hidden.target(&target), "email:a***@example.com");
        assert_eq!(
            hidden.target(&Target::SlackChannel("C0PAY".into())),
            "slack_channel:C0PAY"
        );
        assert_eq!(hidden.text("x ana@example.com"), "x a***@example.com");
        assert_eq!(shown.text("x ana@example.com"), "x ana@example.com");
    }
}
