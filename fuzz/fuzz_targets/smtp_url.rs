//! Fuzz target `smtp_url`: `email.smtp_url` read as the email sender reads
//! it (`SmtpEndpoint::parse`), and shown as settings and errors show it
//! (`SecretUrl`). The input is the URL text. What it checks:
//! - the password never shows: not in an error, not in the endpoint's
//!   `Debug`, not in the redacted URL. "The password" is what a person
//!   writing the URL means by one (`user:password@host`, even with the `//`
//!   forgotten), whether or not the URL standard reads it so. A leak is told
//!   from text the messages happen to contain by parsing the same URL with
//!   that text changed: only a leak changes with it;
//! - a URL that is taken is consistent: a host, `smtps` and only `smtps` on
//!   implicit TLS, the default ports, no credentials over what may be plain
//!   text unless to a loopback host.
#![no_main]

use alert_router::config::SecretUrl;
use alert_router::deliver::email::{Security, SmtpEndpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let url = SecretUrl::new(text);
    let parsed = SmtpEndpoint::parse(&url);
    if let Ok(endpoint) = &parsed {
        check_endpoint(text, endpoint);
    }

    let Some(password) = password_as_people_read_it(text) else {
        return;
    };
    let changed_text = text.replacen(password, &changed(password), 1);
    let changed_url = SecretUrl::new(changed_text.as_str());
    let shown = everything_shown(&url, &parsed);
    let shown_changed = everything_shown(&changed_url, &SmtpEndpoint::parse(&changed_url));
    // Panic messages name where, never the text: it holds the password.
    for (place, (original, other)) in ["parse", "redacted URL"]
        .iter()
        .zip(shown.iter().zip(&shown_changed))
    {
        assert!(
            original.matches(password).count() <= other.matches(password).count(),
            "the password ({} characters) shows in the {place}",
            password.chars().count()
        );
    }
});

/// The password as a person writing the URL means it: in what follows the
/// scheme's `:` and any slashes, up to the next `/`, `\`, `?` or `#`, the text
/// between the first `:` and the last `@`. Only when it could be a password
/// and occurs nowhere else in the URL.
fn password_as_people_read_it(text: &str) -> Option<&str> {
    let after_scheme = &text[text.find(':')? + 1..];
    let authority = after_scheme.trim_start_matches(['/', '\\']);
    // (`\` is a `/` too in `http:` and other special schemes.)
    let authority = &authority[..authority
        .find(['/', '\\', '?', '#'])
        .unwrap_or(authority.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    let plausible = password.chars().count() >= 4
        && password.chars().any(|c| c.is_ascii_alphanumeric())
        && !password
            .chars()
            .any(|c| c.is_whitespace() || c.is_control());
    (plausible && text.matches(password).count() == 1).then_some(password)
}

/// Letters and digits moved on by one within their class (`a`→`b`,
/// `Z`→`A`, `9`→`0`), so the URL parses the same way; the rest kept.
fn changed(password: &str) -> String {
    let next = |c: char, first: char, count: u8| {
        (first as u8 + (c as u8 - first as u8 + 1) % count) as char
    };
    password
        .chars()
        .map(|c| match c {
            'a'..='z' => next(c, 'a', 26),
            'A'..='Z' => next(c, 'A', 26),
            '0'..='9' => next(c, '0', 10),
            other => other,
        })
        .collect()
}

/// The parse's error or endpoint as logs would print it, and the URL as
/// settings and errors show it.
fn everything_shown(
    url: &SecretUrl,
    parsed: &Result<SmtpEndpoint, alert_router::deliver::email::EmailError>,
) -> [String; 2] {
    let parse = match parsed {
        Ok(endpoint) => format!("{endpoint:?}"),
        Err(error) => format!("{error} {error:?}"),
    };
    [parse, format!("{} {url:?} {}", url.redacted(), url)]
}

fn check_endpoint(text: &str, endpoint: &SmtpEndpoint) {
    assert!(!endpoint.host.is_empty(), "an endpoint has a host");
    let url = url::Url::parse(text).expect("a taken URL parses");
    let scheme = url.scheme();
    assert_eq!(
        endpoint.security == Security::Implicit,
        scheme == "smtps",
        "implicit TLS exactly for smtps://"
    );
    let loopback = match endpoint.host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => endpoint.host.eq_ignore_ascii_case("localhost"),
    };
    assert_eq!(
        endpoint.loopback, loopback,
        "loopback is decided by the host"
    );
    if endpoint.credentials.is_some() {
        assert!(
            endpoint.loopback
                || matches!(endpoint.security, Security::StartTls | Security::Implicit),
            "credentials only over TLS, or to a loopback host"
        );
    }
    match url.port() {
        Some(port) => assert_eq!(endpoint.port, port),
        None => assert_eq!(endpoint.port, if scheme == "smtps" { 465 } else { 25 }),
    }
    if let Some((user, _)) = &endpoint.credentials {
        assert!(!user.is_empty(), "credentials have a user");
    }
}
