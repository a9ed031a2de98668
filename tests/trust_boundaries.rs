//! Trust boundaries through the real broker: events naming a workspace or an
//! email domain the operator did not allow are dead-lettered unsent, and
//! recipient addresses show as `a***@example.com` in dead-letter headers and logs.

mod support;

use alert_router::broker::{HEADER_DETAIL, HEADER_REASON};
use serde_json::json;
use support::{BASIC_RULES, ESCALATIONS, TestEnv, WAIT};

#[tokio::test]
async fn an_event_for_a_workspace_outside_the_allowed_list_is_dead_lettered_unsent() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.slack.allowed_workspaces = vec!["T0PARTNER".into()];
    let worker = env.spawn_worker();
    let mut dead = env.dead_letters().await;

    env.publish(&env.event("elsewhere", json!({"workspace": "T0ELSEWHERE"})))
        .await;
    let letter = dead.next().await;
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("forbidden_target")
    );
    assert_eq!(
        letter.header(HEADER_DETAIL).as_deref(),
        Some(
            "workspace `T0ELSEWHERE` is not in slack.allowed_workspaces; add it there to allow events for it"
        )
    );
    assert_eq!(letter.attempts(), Some(1), "refused at once, not retried");

    // The default workspace is the operator's own and stays allowed; once
    // its event is posted, the refused one (ahead of it in the queue) was
    // settled without a post.
    env.publish(&env.event("home", json!({}))).await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(posts.len(), 1);
    assert_eq!(
        posts[0].metadata.as_ref().unwrap()["event_payload"]["event_id"],
        "home"
    );
    assert_eq!(env.slack.posts().len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_targeting_a_domain_outside_the_allowed_list_is_dead_lettered_unsent() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.email.allowed_domains = vec!["example.com".into()];
    let worker = env.spawn_worker();
    let mut dead = env.dead_letters().await;

    let targets = json!({"targets": [
        {"slack_channel": ESCALATIONS},
        {"email": "ops@example.com"},
        {"email": "someone@evil.example"},
    ]});
    env.publish(&env.event("exfiltrate", targets)).await;
    let letter = dead.next().await;
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("forbidden_target")
    );
    assert_eq!(
        letter.header(HEADER_DETAIL).as_deref(),
        Some(
            "targets[2].email `s***@evil.example` is outside email.allowed_domains; add `evil.example` there to allow it"
        )
    );
    assert_eq!(letter.attempts(), Some(1));

    // One forbidden target refuses the whole event: not even its allowed
    // targets were sent. A later allowed event proves the worker moved on.
    env.publish(&env.event(
        "allowed",
        json!({"targets": [{"email": "Ops@Example.COM"}]}),
    ))
    .await;
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(mails.len(), 1);
    // Allowed whatever its case (the email phase sends to the lowercase form).
    assert_eq!(mails[0].to, ["ops@example.com"]);
    assert!(
        mails[0]
            .subject
            .as_deref()
            .is_some_and(|s| s.contains("Test event allowed")),
        "{:?}",
        mails[0].subject
    );
    assert!(
        env.slack.posts().is_empty(),
        "nothing of the refused event was posted"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_within_the_allowed_lists_is_delivered_as_before() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.slack.allowed_workspaces = vec![env.workspace.clone()];
    env.settings.email.allowed_domains = vec!["example.com".into()];
    let worker = env.spawn_worker();

    env.publish(&env.event(
        "fine",
        json!({"labels": {"team": "payments"}, "targets": [{"email": "lead@example.com"}]}),
    ))
    .await;
    let posts = env
        .slack
        .wait_for_posts_to(support::PAYMENTS, 1, WAIT)
        .await
        .unwrap();
    let mails = env.smtp.wait_for_mails(1, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(posts.len(), 1);
    assert_eq!(mails[0].to, ["lead@example.com"]);
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

/// Runs a worker process on an event whose only target is an address the
/// mail server refuses for good (550, echoing the address, as servers do),
/// and returns the dead letter's detail and every log line of the worker.
async fn refused_address_run(show_addresses: bool) -> (String, Vec<String>) {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.log.show_addresses = show_addresses;
    env.smtp.fail_next_rcpt(
        1,
        550,
        "5.1.1 <alice@example.com>: Recipient address rejected",
    );
    let mut worker = env.start_worker_process();
    worker.wait_for_log("consuming", 1).await;
    let mut dead = env.dead_letters().await;

    env.publish(&env.event(
        "refused",
        json!({"targets": [{"email": "alice@example.com"}]}),
    ))
    .await;
    let letter = dead.next().await;
    assert_eq!(
        letter.header(HEADER_REASON).as_deref(),
        Some("undeliverable")
    );
    let detail = letter.header(HEADER_DETAIL).unwrap_or_default();
    // The dead letter is published before the worker logs it.
    worker.wait_for_log("dead-lettered", 1).await;
    let lines = worker.log_lines();
    assert!(worker.stop().await.success());
    env.cleanup().await;
    (detail, lines)
}

#[tokio::test]
async fn dead_letter_headers_and_logs_show_recipient_addresses_redacted() {
    let (detail, lines) = refused_address_run(false).await;
    assert!(detail.contains("email:a***@example.com"), "{detail}");
    assert!(
        detail.contains("<a***@example.com>"),
        "the server's echo too: {detail}"
    );
    assert!(!detail.contains("alice@"), "{detail}");

    let leaking: Vec<&String> = lines.iter().filter(|l| l.contains("alice@")).collect();
    assert!(leaking.is_empty(), "full address in the log: {leaking:#?}");
    for needle in ["not delivered", "dead-lettered"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(needle) && l.contains("a***@example.com")),
            "no redacted `{needle}` line in {lines:#?}"
        );
    }
}

#[tokio::test]
async fn log_show_addresses_puts_full_addresses_in_headers_and_logs() {
    let (detail, lines) = refused_address_run(true).await;
    assert!(detail.contains("email:alice@example.com"), "{detail}");
    assert!(!detail.contains("***"), "{detail}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("dead-lettered") && l.contains("alice@example.com")),
        "{lines:#?}"
    );
}
