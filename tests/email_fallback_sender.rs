//! The email fallback sender against a real SMTP server (the in-process sink): delivery, faults, credentials.

mod support;

use std::time::Duration;

use alert_router::config::EmailSettings;
use alert_router::deliver::email::{EmailError, EmailMessage, EmailSender, render};
use alert_router::event::{DEFAULT_MAX_BODY_BYTES, Event};
use support::smtp_sink::SmtpSink;

const WAIT: Duration = Duration::from_secs(10);
const REASON: &str = "Slack is unavailable for workspace T1: token_revoked";

fn settings(url: &str) -> EmailSettings {
    EmailSettings {
        smtp_url: url.into(),
        from: "Alert Router <alert-router@example.com>".to_string(),
        ..EmailSettings::default()
    }
}

fn sender(url: &str) -> EmailSender {
    EmailSender::with_timeout(&settings(url), Duration::from_secs(2)).unwrap()
}

fn event() -> Event {
    let body = r#"{"id":"esc-2041-2","type":"escalation.escalated","severity":"critical",
        "title":"Checkout API error rate above SLO","workspace":"T1","source":"aexy",
        "summary":"5xx rate is 7% for 10 minutes. <b>not bold</b>","comment":"Rolling back",
        "ticket":{"number":"TCK-2041","form":"Incident report","url":"https://support.example.com/t/2041?tab=activity&view=full"},
        "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},"level":2}"#;
    Event::decode(body.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
}

fn message(to: &[&str]) -> EmailMessage {
    let mut message = render(&event(), Some("payments-critical"), REASON);
    message.to = to.iter().map(|s| s.to_string()).collect();
    message
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_rendered_event_arrives_with_recipients_subject_and_bodies() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    sender
        .send(&message(&["ana@example.com", "Ops Team <ops@example.com>"]))
        .await
        .unwrap();

    let mails = sink.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "alert-router@example.com");
    assert_eq!(mail.to, ["ana@example.com", "ops@example.com"]);
    assert_eq!(
        mail.subject.as_deref(),
        Some("[CRITICAL] Checkout API error rate above SLO (TCK-2041)")
    );
    assert_eq!(
        mail.header("Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    assert!(mail.header("Message-ID").is_some());
    assert!(mail.auth_user.is_none());

    let text = mail.text_body().expect("a text/plain part");
    for expected in [
        "Checkout API error rate above SLO",
        "Severity: CRITICAL",
        "TCK-2041",
        "Incident report",
        "https://support.example.com/t/2041?tab=activity&view=full",
        "Ana Ruiz <ana@example.com>",
        "aexy",
        "5xx rate is 7% for 10 minutes. <b>not bold</b>",
        "Rolling back",
        "esc-2041-2",
        "payments-critical",
        REASON,
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    let html = mail.html_body().expect("a text/html part");
    assert!(html.contains("&lt;b&gt;not bold&lt;/b&gt;"), "{html}");
    assert!(!html.contains("<b>not bold"));
    assert!(html.contains("tab=activity&amp;view=full"));
}

#[tokio::test]
async fn each_email_has_a_connection_of_its_own() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    for _ in 0..5 {
        sender.send(&message(&["ana@example.com"])).await.unwrap();
    }
    sink.wait_for_mails(5, WAIT).await.unwrap();
    // Not pooled: a connection abandoned mid-transaction is never reused.
    assert_eq!(sink.connections(), 5);
}

#[tokio::test]
async fn a_451_tempfail_is_transient_and_the_next_try_succeeds() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    sink.fail_next_rcpt(1, 451, "4.3.0 Greylisted, try again later");
    let err = sender
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.smtp_code(), Some(451));
    assert!(err.to_string().contains("Greylisted"), "{err}");

    sender.send(&message(&["ana@example.com"])).await.unwrap();
    assert_eq!(sink.wait_for_mails(1, WAIT).await.unwrap().len(), 1);
}

#[tokio::test]
async fn tempfails_at_mail_and_data_are_transient() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    for (fail, code) in [
        (SmtpSink::fail_next_mail as fn(&SmtpSink, usize, u16), 450),
        (SmtpSink::fail_next_data, 452),
        (SmtpSink::fail_next_mail, 421),
    ] {
        fail(&sink, 1, code);
        let err = sender
            .send(&message(&["ana@example.com"]))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{code}: {err}");
        assert_eq!(err.smtp_code(), Some(code));
    }
    assert!(sink.mails().is_empty());
}

#[tokio::test]
async fn a_550_is_permanent() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    sink.fail_next_rcpt(
        1,
        550,
        "5.1.1 <nobody@example.com>: Recipient address rejected",
    );
    let err = sender
        .send(&message(&["nobody@example.com"]))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(err.smtp_code(), Some(550));

    sink.fail_next_data(1, 554);
    let err = sender
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(sink.mails().is_empty());
}

#[tokio::test]
async fn reject_all_holds_until_cleared() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    sink.set_reject_all(553);
    for _ in 0..2 {
        let err = sender
            .send(&message(&["ana@example.com"]))
            .await
            .unwrap_err();
        assert_eq!(err.smtp_code(), Some(553));
        assert!(!err.is_transient());
    }
    sink.clear_faults();
    sender.send(&message(&["ana@example.com"])).await.unwrap();
    sink.wait_for_mails(1, WAIT).await.unwrap();
}

#[tokio::test]
async fn an_invalid_recipient_is_permanent_and_named() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    let err = sender
        .send(&message(&["ana@example.com", "ana at example dot com"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EmailError::InvalidRecipient { address, .. } if address == "ana at example dot com"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("ana at example dot com"));
    assert_eq!(sink.connections(), 0, "nothing was sent");
}

#[tokio::test]
async fn connection_refused_is_transient_and_never_shows_the_password() {
    let port = closed_port().await;
    let sender = sender(&format!("smtp://user:hunter2@127.0.0.1:{port}"));
    let err = sender
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(err, EmailError::Connection { .. }), "{err:?}");
    for shown in [err.to_string(), format!("{err:?}"), format!("{sender:?}")] {
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

#[tokio::test]
async fn a_silent_server_is_a_transient_timeout() {
    // Accepts the connection but never greets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let sender = EmailSender::with_timeout(
        &settings(&format!("smtp://127.0.0.1:{port}")),
        Duration::from_millis(300),
    )
    .unwrap();
    let err = sender
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(err, EmailError::Timeout { .. }), "{err:?}");
    hold.abort();
}

#[tokio::test]
async fn credentials_from_the_url_are_used_percent_decoded() {
    let sink = SmtpSink::start().await;
    sink.require_auth("alerts@example.com", "p@ss:w0rd/%");
    let sender = sender(&sink.url_with_credentials("alerts@example.com", "p@ss:w0rd/%"));
    sender.send(&message(&["ana@example.com"])).await.unwrap();
    let mails = sink.wait_for_mails(1, WAIT).await.unwrap();
    assert_eq!(mails[0].auth_user.as_deref(), Some("alerts@example.com"));
    let auths = sink.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].accepted);
    assert_eq!(auths[0].password, "p@ss:w0rd/%");
}

#[tokio::test]
async fn wrong_credentials_are_permanent_and_never_show_the_password() {
    let sink = SmtpSink::start().await;
    sink.require_auth("alerts", "right");
    let sender = sender(&sink.url_with_credentials("alerts", "hunter2"));
    let err = sender
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert_eq!(err.smtp_code(), Some(535), "{err:?}");
    assert!(!err.is_transient());
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    assert!(sink.mails().is_empty());
}

#[tokio::test]
async fn a_message_without_html_is_plain_text() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    let message = EmailMessage {
        to: vec!["ana@example.com".into()],
        subject: "Hello\r\nBcc: eve@example.com".into(),
        text: "Line one\r\n.leading dot\r\n.\r\nafter a lone dot".into(),
        html: None,
        about: None,
    };
    sender.send(&message).await.unwrap();
    let mail = &sink.wait_for_mails(1, WAIT).await.unwrap()[0];
    assert_eq!(mail.subject.as_deref(), Some("Hello Bcc: eve@example.com"));
    assert!(mail.header("Bcc").is_none());
    assert_eq!(mail.to, ["ana@example.com"]);
    assert!(mail.html_body().is_none());
    let text = mail.text_body().unwrap();
    assert!(
        text.contains("Line one\r\n.leading dot\r\n.\r\nafter a lone dot"),
        "{text:?}"
    );
}

#[tokio::test]
async fn unicode_subjects_survive_encoding() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    let mut message = message(&["ana@example.com"]);
    message.subject = "[HIGH] Paiement échoué — 支付失败 🔴".into();
    sender.send(&message).await.unwrap();
    let mail = &sink.wait_for_mails(1, WAIT).await.unwrap()[0];
    assert_eq!(mail.subject.as_deref(), Some(message.subject.as_str()));
}

#[tokio::test]
async fn required_starttls_that_the_server_lacks_sends_nothing() {
    let sink = SmtpSink::start().await;
    let url = format!(
        "{}?tls=required",
        sink.url_with_credentials("alerts", "hunter2")
    );
    let err = sender(&url)
        .send(&message(&["ana@example.com"]))
        .await
        .unwrap_err();
    assert!(matches!(err, EmailError::Tls { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(sink.auths().is_empty(), "credentials went out in clear");
    assert!(
        !sink.commands().iter().any(|c| c.starts_with("MAIL")),
        "{:?}",
        sink.commands()
    );
}

#[tokio::test]
async fn a_send_abandoned_at_its_timeout_does_not_make_the_next_refusal_look_accepted() {
    let sink = SmtpSink::start().await;
    let sender =
        EmailSender::with_timeout(&settings(&sink.url()), Duration::from_millis(200)).unwrap();
    // The server takes the first message but answers its end of data only
    // after the sender gave up; it refuses the second one.
    sink.delay_next_data_replies(1, Duration::from_secs(3));
    let first = sender.send(&message(&["ana@example.com"])).await;
    assert!(
        matches!(first, Err(EmailError::Timeout { .. })),
        "the slow answer is a timeout: {first:?}"
    );
    sink.fail_next_data(1, 554);
    let second = sender.send(&message(&["ops@example.com"])).await;
    assert!(
        matches!(second, Err(EmailError::Rejected { code: 554, .. })),
        "the refusal is read as a refusal, not as the late answer to the first: {second:?}"
    );
}

#[tokio::test]
async fn the_same_email_sent_again_has_the_same_message_id_and_another_has_its_own() {
    let sink = SmtpSink::start().await;
    let sender = sender(&sink.url());
    sender.send(&message(&["ana@example.com"])).await.unwrap();
    sender.send(&message(&["ANA@example.com"])).await.unwrap();
    sender.send(&message(&["ops@example.com"])).await.unwrap();
    let mut other_event = message(&["ana@example.com"]);
    other_event.about = Some("another-event".into());
    sender.send(&other_event).await.unwrap();

    let mails = sink.wait_for_mails(4, WAIT).await.unwrap();
    let ids: Vec<String> = mails
        .iter()
        .map(|m| m.header("Message-ID").expect("a Message-ID"))
        .collect();
    assert_eq!(ids[0], ids[1], "a second attempt of one email: {ids:?}");
    assert_ne!(ids[0], ids[2], "another recipient: {ids:?}");
    assert_ne!(ids[0], ids[3], "another event: {ids:?}");
    assert!(ids[0].ends_with(".alert-router@example.com>"), "{}", ids[0]);
}

#[tokio::test]
async fn no_more_than_max_connections_are_open_at_once() {
    let sink = SmtpSink::start().await;
    let mut limited = settings(&sink.url());
    limited.max_connections = 2;
    let sender = EmailSender::with_timeout(&limited, Duration::from_secs(10)).unwrap();
    // Each message is held at its end of data for a while, so senders pile up.
    sink.delay_next_data_replies(6, Duration::from_millis(300));
    let sends = (0..6).map(|i| {
        let sender = sender.clone();
        async move {
            sender
                .send(&message(&[&format!("person{i}@example.com")]))
                .await
        }
    });
    for sent in futures_util::future::join_all(sends).await {
        sent.unwrap();
    }
    assert_eq!(sink.mails().len(), 6);
    assert_eq!(
        sink.most_connections_at_once(),
        2,
        "connections open at once never exceed email.max_connections"
    );
}
