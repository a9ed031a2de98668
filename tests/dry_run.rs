//! `alert-router run --dry-run` as a process: the whole pipeline runs with
//! Slack answered in process, each message is logged, and `/preview` shows
//! it; the page is loaded in headless Chromium as a person would see it.

mod support;

use std::time::Duration;

use serde_json::json;
use support::metrics::free_port;
use support::{BASIC_RULES, TestEnv, WAIT};

/// Where Debian's `chromium` package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Polls `url` until its body contains `needle`; returns the body.
async fn wait_for_page(url: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(response) = reqwest::get(url).await
            && let Ok(body) = response.text().await
        {
            if body.contains(needle) {
                return body;
            }
            last = body;
        }
        // Polling a local page: a short pause between looks, not a wait for an outcome.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not show {needle:?} in time; last body:\n{last}");
}

#[tokio::test]
async fn a_dry_run_needs_no_token_logs_each_message_and_shows_it_at_preview() {
    let env = TestEnv::start(BASIC_RULES).await;
    // No token anywhere: a dry run must not fall back to email for want of one.
    env.delete_token(&env.workspace.clone()).await;
    env.slack.shutdown();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut worker = env.start_worker_process_args(
        &["run", "--dry-run"],
        &[("ALERT_ROUTER__HTTP__LISTEN", listen.as_str())],
    );
    worker.wait_for_log("consuming", 1).await;

    let title = format!("Checkout <b>down</b> {}", env.id);
    env.publish(&env.checkout_incident(
        "dry-1",
        json!({"severity": "high", "title": title, "labels": {"team": "payments"}}),
    ))
    .await;
    let line = worker
        .wait_for_log(
            "dry run: would post to C0PAYMENTS: [HIGH] Checkout <b>down</b>",
            1,
        )
        .await;
    assert!(line.contains(&env.id), "{line}");

    // A workspace with no token and not the default one: served too.
    env.publish(&env.event(
        "dry-other",
        json!({"workspace": "T0OTHER", "severity": "low", "title": "Other workspace"}),
    ))
    .await;
    worker
        .wait_for_log(
            "dry run: would post to C0ESCALATE: [LOW] Other workspace",
            1,
        )
        .await;

    // A later event of the incident replies in the first message's thread:
    // the stand-in's channel ids and `ts` work as Slack's do.
    env.publish(&env.checkout_incident(
        "dry-2",
        json!({"severity": "high", "title": "Still failing"}),
    ))
    .await;
    worker
        .wait_for_log("dry run: would reply in C0PAYMENTS (thread ", 1)
        .await;

    // The page, HTML-escaped, newest first.
    let url = format!("http://{listen}/preview");
    let body = wait_for_page(&url, &env.id).await;
    // The header is plain text with a word joiner after each `<` (so it
    // never pages anyone), shown escaped.
    let header = format!(
        "Checkout &lt;\u{2060}b&gt;down&lt;\u{2060}/b&gt; {}",
        env.id
    );
    assert!(body.contains(&header), "{body}");
    assert!(!body.contains("<b>down</b>"));
    assert!(
        body.find("Still failing").unwrap() < body.find(&header).unwrap(),
        "newest first: {body}"
    );

    // As people would see it: the browser's DOM shows the title.
    if std::path::Path::new(CHROMIUM).exists() {
        let output = tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--dump-dom",
                url.as_str(),
            ])
            .output()
            .await
            .unwrap();
        let dom = String::from_utf8_lossy(&output.stdout);
        assert!(
            dom.contains(&header),
            "{dom}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(dom.contains("Acknowledge"), "{dom}");
    } else if std::env::var_os("ALERT_ROUTER_TESTS_NO_CHROMIUM").is_none() {
        // Set by .ci/run only when the Debian archive is unreachable.
        panic!("{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does)");
    }

    let status = worker.stop().await;
    assert!(status.success());
    // Delivered, not emailed, retried or dead-lettered.
    assert!(env.smtp.mails().is_empty());
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_takes_email_targets_itself_so_nothing_waits_for_a_mail_server() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.shutdown();
    let mut worker = env.start_worker_process_args(&["run", "--dry-run"], &[]);
    worker.wait_for_log("consuming", 1).await;

    env.publish(&env.event(
        "dry-mail",
        json!({"targets": [{"email": "oncall@example.com"}]}),
    ))
    .await;
    let line = worker.wait_for_log("dry run: would email", 1).await;
    assert!(
        line.contains("o***@example.com"),
        "addresses redacted: {line}"
    );
    worker.wait_for_log(r#"acked outcome="acked""#, 1).await;
    assert!(worker.stop().await.success());
    assert!(
        env.smtp.mails().is_empty(),
        "the configured SMTP server saw nothing"
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}
