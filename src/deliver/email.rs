//! Email fallback: renders an event as a notification email and sends it over SMTP when Slack cannot take it.
//!
//! The sender is built once from `email.smtp_url` and shared (a cheap clone).
//! Each email has a connection of its own, and at most
//! `email.max_connections` are open at once. Errors are classified the
//! way the rest of the delivery code needs: [`EmailError::is_transient`] says
//! whether a broker-level retry can help. No error text ever carries the SMTP
//! password, whatever lettre or the server put in it.
//!
//! # `email.smtp_url`
//!
//! | URL | Connection |
//! |---|---|
//! | `smtp://host[:port]` (port defaults to 25) | plain text, no STARTTLS (local relays, test sinks) |
//! | `smtp://host:587` | STARTTLS required (587 is the submission port, which expects it) |
//! | `smtp://host:port?tls=required` | STARTTLS required: no mail or credentials before TLS is up |
//! | `smtp://host:port?tls=opportunistic` | STARTTLS when offered, else plain text |
//! | `smtp://host:port?tls=none` | plain text, even on 587 |
//! | `smtps://host[:port]` (port defaults to 465) | implicit TLS from the first byte |
//! | `smtp://host:465` | refused: 465 expects implicit TLS, so `smtps://` |
//!
//! `user:password@` in the URL (percent-encoded) become SMTP AUTH
//! credentials. They are refused over a connection that may be plain text
//! (`smtp://` without `tls=required`) unless the host is a loopback address:
//! a password must not cross the network in clear, but a local relay or test
//! sink is fine.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, header::Header};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::response::Severity;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{EmailSettings, Secret, SecretUrl};
use crate::deliver::slack::message::{is_web_url, severity_color, severity_label, truncate};
use crate::event::Event;

/// How long one SMTP step (connect, a command, its reply) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole send (connect, handshake, envelope, data) may take this many
/// steps' worth of time before it is abandoned as a timeout.
const WHOLE_SEND_STEPS: u32 = 4;
/// Subjects longer than this are cut: mail clients show far less anyway.
const SUBJECT_LIMIT: usize = 200;

/// One email to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailMessage {
    /// Recipients, each `addr@example.com` or `Name <addr@example.com>`.
    pub to: Vec<String>,
    /// CR and LF are removed again before sending.
    pub subject: String,
    /// The plain-text body; always sent.
    pub text: String,
    /// An HTML alternative to `text`, sent as `multipart/alternative`.
    pub html: Option<String>,
    /// What the message is about (the event's id): with the recipients it
    /// makes the `Message-ID`, so a copy sent again after a lost reply has
    /// the same one and mail systems keep one of the two. `None`: random.
    pub about: Option<String>,
}

/// Why an email was not sent.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// `email.smtp_url` cannot be used; the URL shown has its password redacted.
    #[error("invalid email.smtp_url {url}: {problem}")]
    InvalidUrl { url: String, problem: String },
    /// `email.from` is not a mailbox.
    #[error("invalid email.from {address:?}: {problem}")]
    InvalidFrom { address: String, problem: String },
    /// A recipient is not an email address.
    #[error("invalid recipient address {address:?}: {problem}")]
    InvalidRecipient { address: String, problem: String },
    /// The message names no recipient.
    #[error("the email has no recipients")]
    NoRecipients,
    /// lettre could not assemble the message.
    #[error("could not build the email: {0}")]
    Message(String),
    /// The server answered a command with a negative reply (4xx or 5xx).
    #[error("SMTP server {server} replied {code}: {text}")]
    Rejected {
        server: String,
        code: u16,
        text: String,
    },
    /// The server could not be reached, or the connection broke.
    #[error("could not talk to SMTP server {server}: {detail}")]
    Connection { server: String, detail: String },
    /// A step or the whole send took too long.
    #[error("SMTP server {server} did not answer in time")]
    Timeout { server: String },
    /// TLS (implicit or STARTTLS) could not be set up.
    #[error("TLS with SMTP server {server} failed: {detail}")]
    Tls { server: String, detail: String },
    /// The server's reply could not be understood.
    #[error("SMTP server {server} sent an unreadable reply: {detail}")]
    Protocol { server: String, detail: String },
    /// The client cannot proceed with this configuration, e.g. the server
    /// offers no authentication mechanism lettre supports.
    #[error("SMTP client error with {server}: {detail}")]
    Client { server: String, detail: String },
}

impl EmailError {
    /// True when trying again later can help: the server or the network is
    /// having trouble (unreachable, slow, TLS hiccup, 4xx reply such as 421,
    /// 450, 451, 452). False when the message or the configuration is wrong
    /// (5xx replies such as 550 or 553, bad addresses, a bad URL).
    pub fn is_transient(&self) -> bool {
        match self {
            EmailError::Rejected { code, .. } => (400..500).contains(code),
            EmailError::Connection { .. }
            | EmailError::Timeout { .. }
            | EmailError::Tls { .. }
            | EmailError::Protocol { .. } => true,
            EmailError::InvalidUrl { .. }
            | EmailError::InvalidFrom { .. }
            | EmailError::InvalidRecipient { .. }
            | EmailError::NoRecipients
            | EmailError::Message(_)
            | EmailError::Client { .. } => false,
        }
    }

    /// The SMTP reply code, when the server refused.
    pub fn smtp_code(&self) -> Option<u16> {
        match self {
            EmailError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No TLS.
    Plain,
    /// STARTTLS when the server offers it, else plain text.
    Opportunistic,
    /// STARTTLS required before anything else is sent.
    StartTls,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// What `email.smtp_url` says: where to connect, how to secure it, and whom
/// to log in as (see the table at the top of this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpEndpoint {
    /// A name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// The host is `localhost` or a loopback address.
    pub loopback: bool,
    /// User and password, percent-decoded.
    pub credentials: Option<(String, Secret)>,
}

impl SmtpEndpoint {
    /// Reads and checks `email.smtp_url`. An error shows the URL with its
    /// password redacted.
    pub fn parse(smtp_url: &SecretUrl) -> Result<SmtpEndpoint, EmailError> {
        let invalid = |problem: &str| EmailError::InvalidUrl {
            url: smtp_url.redacted(),
            problem: problem.to_string(),
        };
        let url = url::Url::parse(smtp_url.expose()).map_err(|e| invalid(&e.to_string()))?;

        let (host, loopback) = match url.host() {
            // `smtp` is not a "special" scheme to the URL standard, so an IPv4
            // address arrives as an opaque host name: parse it here.
            Some(url::Host::Domain(name)) if !name.is_empty() => {
                let loopback = match name.parse::<IpAddr>() {
                    Ok(ip) => ip.is_loopback(),
                    Err(_) => name.eq_ignore_ascii_case("localhost"),
                };
                (name.to_string(), loopback)
            }
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), IpAddr::V4(ip).is_loopback()),
            Some(url::Host::Ipv6(ip)) => (ip.to_string(), IpAddr::V6(ip).is_loopback()),
            _ => return Err(invalid("has no host")),
        };
        if !matches!(url.path(), "" | "/") {
            return Err(invalid("has a path; write smtp://host:port"));
        }

        let mut tls_param = None;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "tls" if tls_param.is_none() => tls_param = Some(value.into_owned()),
                "tls" => return Err(invalid("repeats the `tls` parameter")),
                other => {
                    return Err(invalid(&format!(
                        "has an unknown parameter `{other}`; only `tls` is understood"
                    )));
                }
            }
        }
        let (security, port) = match url.scheme() {
            "smtp" => {
                let port = url.port().unwrap_or(25);
                // 465 speaks TLS from the first byte: plain SMTP to it would
                // wait out every send's timeout, only in a Slack outage.
                if port == 465 {
                    return Err(invalid(
                        "names port 465, which expects TLS from the first byte; write smtps://host:465",
                    ));
                }
                let security = match tls_param.as_deref() {
                    None if port == 587 => Security::StartTls,
                    None | Some("none") => Security::Plain,
                    Some("required") => Security::StartTls,
                    Some("opportunistic") => Security::Opportunistic,
                    Some(other) => {
                        return Err(invalid(&format!(
                            "has tls={other}; use tls=required, tls=opportunistic or tls=none"
                        )));
                    }
                };
                (security, port)
            }
            "smtps" => {
                if tls_param.is_some() {
                    return Err(invalid(
                        "has a `tls` parameter, but smtps:// always uses implicit TLS",
                    ));
                }
                (Security::Implicit, url.port().unwrap_or(465))
            }
            other => {
                return Err(invalid(&format!(
                    "has scheme `{other}`; use smtp:// or smtps://"
                )));
            }
        };

        let user = percent_decode(url.username()).ok_or_else(|| invalid("user is not UTF-8"))?;
        let password = match url.password() {
            Some(p) => Some(percent_decode(p).ok_or_else(|| invalid("password is not UTF-8"))?),
            None => None,
        };
        let credentials = match (user.is_empty(), password) {
            (true, None) => None,
            (false, Some(password)) => Some((user, Secret::new(password))),
            (false, None) => return Err(invalid("has a user but no password")),
            (true, Some(_)) => return Err(invalid("has a password but no user")),
        };
        if credentials.is_some()
            && matches!(security, Security::Plain | Security::Opportunistic)
            && !loopback
        {
            return Err(invalid(
                "has credentials but the connection may be plain text; \
                 use smtps:// or ?tls=required (plain text is only allowed to a loopback host)",
            ));
        }
        Ok(SmtpEndpoint {
            host,
            port,
            security,
            loopback,
            credentials,
        })
    }
}

/// Sends email through one SMTP server, a connection per email.
///
/// No pooled connections: a send abandoned at its timeout would leave its
/// connection mid-transaction, and lettre's pool hands such a connection out
/// again, its replies one command behind (a later refusal read as the
/// acceptance of an earlier step). Fallback mail is rare; a fresh
/// connection costs a handshake.
#[derive(Clone)]
pub struct EmailSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// Connections open at once (`email.max_connections`): during a Slack
    /// outage every delivery in flight may fall back at the same moment, and
    /// relays refuse a client that opens too many (421, 432).
    connections: Arc<Semaphore>,
    from: Mailbox,
    /// `host:port`, for error messages.
    server: String,
    /// Bound on one whole send.
    send_timeout: Duration,
    /// Kept only to scrub it out of error text, in case a server echoes it.
    password: Option<Secret>,
}

impl std::fmt::Debug for EmailSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSender")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .field("send_timeout", &self.send_timeout)
            .finish_non_exhaustive()
    }
}

impl EmailSender {
    /// A sender for `settings.smtp_url` with the default step timeout.
    ///
    /// Nothing is connected yet: a server that is down shows up on `send`.
    pub fn new(settings: &EmailSettings) -> Result<EmailSender, EmailError> {
        EmailSender::with_timeout(settings, DEFAULT_TIMEOUT)
    }

    /// Like [`EmailSender::new`] with a chosen per-step timeout (tests use short ones).
    pub fn with_timeout(
        settings: &EmailSettings,
        timeout: Duration,
    ) -> Result<EmailSender, EmailError> {
        let SmtpEndpoint {
            host,
            port,
            security,
            credentials,
            ..
        } = SmtpEndpoint::parse(&settings.smtp_url)?;
        let invalid = |problem: &str| EmailError::InvalidUrl {
            url: settings.smtp_url.redacted(),
            problem: problem.to_string(),
        };

        let from: Mailbox =
            settings
                .from
                .trim()
                .parse()
                .map_err(|e: lettre::address::AddressError| EmailError::InvalidFrom {
                    address: settings.from.clone(),
                    problem: e.to_string(),
                })?;

        let tls = |wrap: fn(TlsParameters) -> Tls| {
            TlsParameters::new(host.clone())
                .map(wrap)
                .map_err(|e| invalid(&format!("TLS setup failed: {e}")))
        };
        let tls = match security {
            Security::Plain => Tls::None,
            Security::Opportunistic => tls(Tls::Opportunistic)?,
            Security::StartTls => tls(Tls::Required)?,
            Security::Implicit => tls(Tls::Wrapper)?,
        };
        // `builder_dangerous` only means "nothing is preset": TLS and
        // credentials are set explicitly below, as decided above.
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(timeout));
        let mut secret = None;
        if let Some((user, password)) = credentials {
            builder = builder.credentials(Credentials::new(user, password.expose().to_string()));
            secret = Some(password);
        }

        let server = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(EmailSender {
            transport: builder.build(),
            connections: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            from,
            server,
            send_timeout: timeout.saturating_mul(WHOLE_SEND_STEPS),
            password: secret,
        })
    }

    /// `host:port` of the SMTP server.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends one email; `Ok` means the server accepted it for delivery.
    pub async fn send(&self, message: &EmailMessage) -> Result<(), EmailError> {
        let email = self.build(message)?;
        // Never closed: the sender holds the semaphore for its whole life.
        let _connection = self.connections.acquire().await;
        match tokio::time::timeout(self.send_timeout, self.transport.send(email)).await {
            // Accepted is a 2xx reply to the end of the data, nothing else.
            Ok(Ok(reply)) if reply.code().severity == Severity::PositiveCompletion => Ok(()),
            Ok(Ok(reply)) => Err(EmailError::Rejected {
                server: self.server.clone(),
                code: u16::from(reply.code()),
                text: self.scrub(&reply.message().collect::<Vec<_>>().join(" ")),
            }),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(EmailError::Timeout {
                server: self.server.clone(),
            }),
        }
    }

    fn build(&self, message: &EmailMessage) -> Result<Message, EmailError> {
        if message.to.iter().all(|to| to.trim().is_empty()) {
            return Err(EmailError::NoRecipients);
        }
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(clean_subject(&message.subject))
            .message_id(
                message
                    .about
                    .as_deref()
                    .map(|about| self.message_id(about, &message.to)),
            )
            .header(AutoSubmitted);
        for to in &message.to {
            let to = to.trim();
            if to.is_empty() {
                continue;
            }
            let mailbox: Mailbox = to.parse().map_err(|e: lettre::address::AddressError| {
                EmailError::InvalidRecipient {
                    address: to.to_string(),
                    problem: e.to_string(),
                }
            })?;
            builder = builder.to(mailbox);
        }
        let built = match &message.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                message.text.clone(),
                html.clone(),
            )),
            None => builder
                .header(ContentType::TEXT_PLAIN)
                .body(message.text.clone()),
        };
        built.map_err(|e| EmailError::Message(e.to_string()))
    }

    fn classify(&self, e: &lettre::transport::smtp::Error) -> EmailError {
        let server = self.server.clone();
        if let Some(code) = e.status() {
            // The server's own words, without lettre's "permanent error (550)" prefix.
            let text = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            return EmailError::Rejected {
                server,
                code: u16::from(code),
                text: self.scrub(&text),
            };
        }
        let detail = self.scrub(&error_chain(e));
        if e.is_timeout() {
            EmailError::Timeout { server }
        } else if e.is_tls() || (e.is_client() && detail.contains("STARTTLS")) {
            // lettre reports a server that does not offer the required
            // STARTTLS as a client error; it is the server's state (or someone
            // on the path stripping the offer), so it counts as a TLS failure
            // and a retry later may succeed. Nothing was sent in clear.
            EmailError::Tls { server, detail }
        } else if e.is_client() {
            EmailError::Client { server, detail }
        } else if e.is_response() {
            EmailError::Protocol { server, detail }
        } else {
            EmailError::Connection { server, detail }
        }
    }

    /// Removes the password from text that came from lettre or the server.
    /// `<hash.alert-router@domain>` for an email about `about` to `to`: the
    /// same for every attempt of the same email, different for any other.
    fn message_id(&self, about: &str, to: &[String]) -> String {
        let mut recipients: Vec<String> = to
            .iter()
            .map(|to| to.trim().to_lowercase())
            .filter(|to| !to.is_empty())
            .collect();
        recipients.sort();
        let mut digest = Sha256::new();
        digest.update(about.as_bytes());
        for recipient in &recipients {
            digest.update(b"\n");
            digest.update(recipient.as_bytes());
        }
        let hash = hex::encode(digest.finalize());
        format!(
            "<{}.alert-router@{}>",
            &hash[..32],
            self.from.email.domain()
        )
    }

    fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) if !p.expose().is_empty() => text.replace(p.expose(), "***"),
            _ => text.to_string(),
        }
    }
}

/// `Auto-Submitted: auto-generated` (RFC 3834): tells vacation responders
/// and the like not to answer a machine.
#[derive(Debug, Clone, Copy)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_string())
    }
}

/// lettre's error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// `%40` → `@`; `None` when the bytes are not UTF-8. Bad escapes stay as written.
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

/// One line, no control characters: CR/LF in a subject would start new headers.
fn clean_subject(subject: &str) -> String {
    let one_line: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let collapsed = one_line.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&collapsed, SUBJECT_LIMIT)
}

/// Escapes text for HTML element content and double- or single-quoted attributes.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The notification email for `event`, with `to` left empty for the caller.
///
/// `rule` is the rule that routed it (`None`: the event's own targets);
/// `reason` says why it came by email, e.g. "Slack is unavailable for
/// workspace T1: token_revoked".
pub fn render(event: &Event, rule: Option<&str>, reason: &str) -> EmailMessage {
    let severity = severity_label(event.severity);
    let ticket = event.ticket.as_ref();
    let number = ticket.and_then(|t| t.number.as_deref());
    let link = ticket
        .and_then(|t| t.url.as_deref())
        .filter(|u| is_web_url(u));

    let mut subject = format!("[{severity}] {}", event.title);
    if let Some(number) = number {
        subject.push_str(&format!(" ({number})"));
    }

    // (label, value) rows shared by both bodies, in reading order.
    let mut rows: Vec<(&str, String)> = vec![("Severity", severity.clone())];
    if let Some(number) = number {
        rows.push(("Ticket", number.to_string()));
    }
    if let Some(form) = ticket.and_then(|t| t.form.as_deref()) {
        rows.push(("Form", form.to_string()));
    }
    if let Some(link) = link {
        rows.push(("Link", link.to_string()));
    }
    if let Some(assignee) = &event.assignee {
        let shown = match (&assignee.name, &assignee.email) {
            (Some(name), Some(email)) => Some(format!("{name} <{email}>")),
            (Some(name), None) => Some(name.clone()),
            (None, Some(email)) => Some(email.clone()),
            (None, None) => None,
        };
        if let Some(shown) = shown {
            rows.push(("Assignee", shown));
        }
    }
    if let Some(level) = event.level {
        rows.push(("Level", level.to_string()));
    }
    if let Some(source) = &event.source {
        rows.push(("Source", source.clone()));
    }
    if let Some(at) = event.occurred_at {
        rows.push(("Occurred", at.to_rfc3339()));
    }
    if let Some(labels) = event.labels.as_ref().filter(|l| !l.is_empty()) {
        let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(("Labels", shown.join(", ")));
    }
    let summary = event.summary.as_deref().filter(|s| !s.trim().is_empty());
    let comment = event.comment.as_deref().filter(|s| !s.trim().is_empty());
    let mut footer: Vec<(&str, String)> = vec![("Event", format!("{} ({})", event.id, event.kind))];
    if let Some(rule) = rule {
        footer.push(("Rule", rule.to_string()));
    }
    footer.push(("Sent by email because", reason.to_string()));

    let mut text = String::new();
    let _ = writeln!(text, "[{severity}] {}", event.title);
    text.push('\n');
    for (label, value) in &rows {
        let _ = writeln!(text, "{:<10}{value}", format!("{label}:"));
    }
    if let Some(summary) = summary {
        let _ = write!(text, "\nSummary:\n{summary}\n");
    }
    if let Some(comment) = comment {
        let _ = write!(text, "\nComment:\n{comment}\n");
    }
    text.push('\n');
    for (label, value) in &footer {
        let _ = writeln!(text, "{label}: {value}");
    }
    text.push_str("\n-- \nalert-router\n");

    let e = escape_html;
    let mut html = String::new();
    let _ = writeln!(
        html,
        "<!DOCTYPE html>\n<html><body style=\"font-family:sans-serif\">\n\
         <div style=\"border-left:6px solid {};padding-left:12px\">",
        severity_color(event.severity)
    );
    let _ = writeln!(html, "<h2>[{}] {}</h2>", e(&severity), e(&event.title));
    html.push_str("<table cellpadding=\"4\">\n");
    for (label, value) in &rows {
        let shown = if *label == "Link" {
            format!("<a href=\"{0}\">{0}</a>", e(value))
        } else {
            e(value)
        };
        let _ = writeln!(
            html,
            "<tr><th align=\"left\">{}</th><td>{shown}</td></tr>",
            e(label)
        );
    }
    html.push_str("</table>\n");
    if let Some(summary) = summary {
        let _ = writeln!(
            html,
            "<h3>Summary</h3>\n<p style=\"white-space:pre-wrap\">{}</p>",
            e(summary)
        );
    }
    if let Some(comment) = comment {
        let _ = writeln!(
            html,
            "<h3>Comment</h3>\n<p style=\"white-space:pre-wrap\">{}</p>",
            e(comment)
        );
    }
    html.push_str("</div>\n<p style=\"color:#666;font-size:small\">\n");
    for (label, value) in &footer {
        let _ = writeln!(html, "{}: {}<br>", e(label), e(value));
    }
    html.push_str("</p>\n</body></html>\n");

    EmailMessage {
        to: Vec::new(),
        subject: clean_subject(&subject),
        text,
        html: Some(html),
        about: Some(event.id.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DEFAULT_MAX_BODY_BYTES;

    fn event(json: &str) -> Event {
        Event::decode(json.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
    }

    fn full_event() -> Event {
        event(
            r#"{"id":"esc-2041-2","type":"escalation.escalated","severity":"critical",
                "title":"Checkout API error rate above SLO","workspace":"T1",
                "occurred_at":"2025-03-01T10:15:00+01:00","source":"aexy",
                "summary":"5xx rate is 7% for 10 minutes","comment":"Rolling back deploy 812",
                "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041"},
                "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},
                "level":2,"labels":{"team":"payments"}}"#,
        )
    }

    fn settings(url: &str) -> EmailSettings {
        EmailSettings {
            smtp_url: url.into(),
            from: "alert-router@localhost".into(),
            ..EmailSettings::default()
        }
    }

    #[test]
    fn subject_names_severity_title_and_ticket() {
        let m = render(&full_event(), None, "why");
        assert_eq!(
            m.subject,
            "[CRITICAL] Checkout API error rate above SLO (TCK-2041)"
        );
        assert!(m.to.is_empty());
    }

    #[test]
    fn text_body_carries_every_field_and_the_reason() {
        let reason = "Slack is unavailable for workspace T1: token_revoked";
        let m = render(&full_event(), Some("payments-critical"), reason);
        for expected in [
            "Checkout API error rate above SLO",
            "CRITICAL",
            "TCK-2041",
            "Incident report",
            "https://support.example.com/t/2041",
            "Ana Ruiz <ana@example.com>",
            "aexy",
            "2025-03-01T10:15:00+01:00",
            "5xx rate is 7% for 10 minutes",
            "Rolling back deploy 812",
            "esc-2041-2",
            "escalation.escalated",
            "payments-critical",
            "team=payments",
            reason,
        ] {
            assert!(
                m.text.contains(expected),
                "{expected:?} missing:\n{}",
                m.text
            );
            let html = m.html.as_deref().unwrap();
            assert!(
                html.contains(&escape_html(expected)),
                "{expected:?} missing from html"
            );
        }
        assert!(m.text.contains("Level:    2"), "{}", m.text);
    }

    #[test]
    fn html_escapes_every_event_string() {
        let e = event(
            r#"{"id":"<id>","type":"t","severity":"high","title":"<script>alert(1)</script>",
                "summary":"<b>bold</b> & \"quoted\"","comment":"<img src=x onerror=alert(1)>",
                "source":"a'b","ticket":{"number":"<n>","form":"<f>","url":"https://x.example/?a=1&b=\"><script>"},
                "assignee":{"name":"<Mallory>","email":"m@example.com"},"labels":{"<k>":"<v>"}}"#,
        );
        let m = render(&e, Some("<rule>"), "<reason>");
        let html = m.html.unwrap();
        for live in [
            "<script>",
            "<b>",
            "<img",
            "<Mallory>",
            "<id>",
            "<n>",
            "<f>",
            "<k>",
            "<rule>",
            "<reason>",
            "\"><script>",
            "a'b",
        ] {
            assert!(!html.contains(live), "{live} is live in html:\n{html}");
        }
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&amp; &quot;quoted&quot;"));
        assert!(html.contains("href=\"https://x.example/?a=1&amp;b=&quot;&gt;&lt;script&gt;\""));
        // The plain-text body shows event text as written.
        assert!(m.text.contains("<script>alert(1)</script>"));
    }

    #[test]
    fn a_non_web_ticket_url_is_not_shown() {
        let e = event(
            r#"{"id":"x","type":"t","severity":"info","title":"t","ticket":{"number":"1","url":"javascript:alert(1)"}}"#,
        );
        let m = render(&e, None, "r");
        assert!(!m.text.contains("javascript"));
        assert!(!m.html.unwrap().contains("javascript"));
    }

    #[test]
    fn subject_has_no_line_breaks() {
        let mut e = full_event();
        e.title = "Down\r\nBcc: victim@example.com\rX\nY\u{2028}Z\tT".into();
        e.ticket.as_mut().unwrap().number = Some("1\r\n2".into());
        let m = render(&e, None, "r");
        assert!(!m.subject.contains(['\r', '\n']), "{:?}", m.subject);
        assert!(!m.subject.chars().any(char::is_control), "{:?}", m.subject);
        assert_eq!(
            m.subject,
            "[CRITICAL] Down Bcc: victim@example.com X Y Z T (1 2)"
        );
    }

    #[test]
    fn long_subjects_are_cut() {
        let mut e = full_event();
        e.title = "x".repeat(1000);
        let m = render(&e, None, "r");
        assert_eq!(m.subject.chars().count(), SUBJECT_LIMIT);
        assert!(m.subject.ends_with('…'));
    }

    #[test]
    fn minimal_event_renders_without_optional_rows() {
        let e = event(r#"{"id":"a","type":"t","severity":"low","title":"Disk"}"#);
        let m = render(&e, None, "Slack is down");
        assert_eq!(m.subject, "[LOW] Disk");
        for absent in ["Ticket:", "Assignee:", "Rule:", "Summary:", "Comment:"] {
            assert!(!m.text.contains(absent), "{absent} present");
        }
        assert!(m.text.contains("Sent by email because: Slack is down"));
    }

    #[tokio::test]
    async fn urls_choose_security_and_credentials() {
        for (url, server) in [
            ("smtp://127.0.0.1:1025", "127.0.0.1:1025"),
            ("smtp://mail.example.com", "mail.example.com:25"),
            ("smtp://mail.example.com:587", "mail.example.com:587"),
            ("smtps://mail.example.com", "mail.example.com:465"),
            (
                "smtp://u:p@mail.example.com:2525?tls=required",
                "mail.example.com:2525",
            ),
            ("smtp://u%40x:p%3Aw@localhost:1025", "localhost:1025"),
            ("smtp://u:p@[::1]:1025", "[::1]:1025"),
            ("smtp://u:p@127.0.0.1:1025", "127.0.0.1:1025"),
            ("smtp://u:p@127.1.2.3:1025", "127.1.2.3:1025"),
        ] {
            let sender = EmailSender::new(&settings(url)).unwrap();
            assert_eq!(sender.server(), server, "{url}");
        }
    }

    #[test]
    fn credentials_over_plain_text_to_a_remote_host_are_refused() {
        for url in [
            "smtp://u:hunter2@mail.example.com:25",
            "smtp://u:hunter2@10.0.0.1:25",
            "smtp://u:hunter2@localhost.example.com:25",
            "smtp://u:hunter2@mail.example.com:587?tls=none",
            "smtp://u:hunter2@mail.example.com:587?tls=opportunistic",
        ] {
            let err = EmailSender::new(&settings(url)).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("plain text"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!format!("{err:?}").contains("hunter2"));
            assert!(!err.is_transient());
        }
    }

    #[test]
    fn bad_urls_and_from_are_named() {
        for url in [
            "http://mail.example.com",
            "smtp://mail.example.com?tls=maybe",
            "smtp://mail.example.com?tsl=required",
            "smtps://mail.example.com?tls=required",
            "smtp://user@localhost",
            "smtp://localhost/path",
            "smtp://mail.example.com:465",
            "not a url",
        ] {
            let err = EmailSender::new(&settings(url)).unwrap_err();
            assert!(matches!(err, EmailError::InvalidUrl { .. }), "{url}: {err}");
        }
        let mut s = settings("smtp://localhost");
        s.from = "not an address".into();
        assert!(matches!(
            EmailSender::new(&s).unwrap_err(),
            EmailError::InvalidFrom { .. }
        ));
    }

    #[test]
    fn error_classes() {
        let server = String::from("s:25");
        let rejected = |code| EmailError::Rejected {
            server: server.clone(),
            code,
            text: String::new(),
        };
        for code in [421, 450, 451, 452] {
            assert!(rejected(code).is_transient(), "{code}");
        }
        for code in [550, 552, 553, 554] {
            assert!(!rejected(code).is_transient(), "{code}");
        }
        assert!(
            EmailError::Connection {
                server: server.clone(),
                detail: String::new()
            }
            .is_transient()
        );
        assert!(EmailError::Timeout { server }.is_transient());
        assert!(!EmailError::NoRecipients.is_transient());
    }

    #[test]
    fn a_sender_can_be_made_outside_a_runtime() {
        assert!(EmailSender::new(&settings("smtp://127.0.0.1:1025")).is_ok());
    }

    #[tokio::test]
    async fn bad_recipients_fail_before_connecting() {
        // Nothing listens on port 9 of a documentation address; no connection is tried.
        let sender = EmailSender::new(&settings("smtp://192.0.2.1:9")).unwrap();
        let mut m = render(&full_event(), None, "r");
        let err = sender.send(&m).await.unwrap_err();
        assert!(matches!(err, EmailError::NoRecipients));
        m.to = vec!["ok@example.com".into(), "not an address".into()];
        let err = sender.send(&m).await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("not an address"), "{err}");
        m.to = vec!["evil@example.com\r\nBcc: x@example.com".into()];
        assert!(matches!(
            sender.send(&m).await.unwrap_err(),
            EmailError::InvalidRecipient { .. }
        ));
    }

    #[test]
    fn an_smtp_url_reads_as_host_port_security_and_credentials() {
        let read = |url: &str| SmtpEndpoint::parse(&SecretUrl::new(url)).unwrap();
        let plain = read("smtp://mail.example.com");
        assert_eq!(
            (
                plain.host.as_str(),
                plain.port,
                plain.security,
                plain.loopback
            ),
            ("mail.example.com", 25, Security::Plain, false)
        );
        assert_eq!(
            read("smtp://mail.example.com:587").security,
            Security::StartTls
        );
        assert_eq!(read("smtps://mail.example.com").port, 465);
        let local = read("smtp://u%40x:p%3Aw@127.0.0.1:1025?tls=opportunistic");
        assert_eq!(local.security, Security::Opportunistic);
        assert!(local.loopback);
        let (user, password) = local.credentials.unwrap();
        assert_eq!((user.as_str(), password.expose()), ("u@x", "p:w"));
        assert_eq!(read("smtp://[::1]:1025").host, "::1");
        let refused =
            SmtpEndpoint::parse(&SecretUrl::new("smtp://u:hunter2@mail.example.com")).unwrap_err();
        assert!(!format!("{refused} {refused:?}").contains("hunter2"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b%3a").as_deref(), Some("a@b:"));
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(percent_decode("%ff"), None);
    }
}
