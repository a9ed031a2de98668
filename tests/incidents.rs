//! Incidents in Slack: later events reply in the first message's thread, a rise is broadcast, acknowledged and resolved events update every first message.

mod support;

use serde_json::{Value, json};
use support::fake_slack::{Fault, RecordedPost};
use support::{ESCALATIONS, PAYMENTS, TestEnv, WAIT, event_id};

/// Payments events go to the payments channel by id, by name, to a user by
/// id and to a user by email; everything else to the default channel.
const RULES: &str = r#"version: 1
defaults:
  slack_channel: "C0ESCALATE"
unmatched: default
rules:
  - name: payments
    matchers:
      - team="payments"
    notify:
      - slack_channel: C0PAYMENTS
      - slack_user: U0LEAD
      - slack_email: second@example.com
"#;

const LEAD: &str = "U0LEAD";
const SECOND: &str = "U0SECOND";

async fn env() -> TestEnv {
    let env = TestEnv::start(RULES).await;
    env.slack.add_user(LEAD, "lead@example.com");
    env.slack.add_user(SECOND, "second@example.com");
    env
}

/// The Acknowledge button's value in a post, if it has one.
fn ack_button(post: &RecordedPost) -> Option<String> {
    post.blocks
        .as_ref()?
        .as_array()?
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
        .find(|e| e["action_id"] == "alert_router_ack")
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

fn posts_of(env: &TestEnv, id: &str) -> Vec<RecordedPost> {
    env.slack
        .posts()
        .into_iter()
        .filter(|p| event_id(p) == id)
        .collect()
}

fn color(post: &RecordedPost) -> String {
    post.attachments.as_ref().map_or(String::new(), |a| {
        a[0]["color"].as_str().unwrap_or_default().to_string()
    })
}

#[tokio::test]
async fn later_events_reply_in_the_thread_at_every_destination_and_acknowledged_then_resolved_update_the_first_messages()
 {
    let env = env().await;
    let worker = env.spawn_worker();

    // The first event: a new message at each of the three destinations.
    env.publish(&env.checkout_incident("first", json!({"severity": "high"})))
        .await;
    env.slack.wait_for_posts(3, WAIT).await.unwrap();
    let firsts = posts_of(&env, "first");
    assert_eq!(firsts.len(), 3);
    for post in &firsts {
        assert_eq!(post.thread_ts, None, "a first message is top-level");
        let value: Value = serde_json::from_str(&ack_button(post).expect("a button")).unwrap();
        assert_eq!(value["k"], "checkout-down");
        assert_eq!(value["w"], env.workspace.as_str());
    }
    let first_at = |channel_id: &str| {
        firsts
            .iter()
            .find(|p| p.channel_id == channel_id)
            .unwrap_or_else(|| panic!("a first message in {channel_id}"))
            .clone()
    };
    let channel_first = first_at(PAYMENTS);
    let lead_dm = firsts
        .iter()
        .find(|p| p.channel == LEAD)
        .expect("posted to the lead by user id")
        .clone();
    let second_dm = firsts
        .iter()
        .find(|p| p.channel == SECOND)
        .expect("posted to the second by the id their email resolved to")
        .clone();
    assert!(lead_dm.channel_id.starts_with('D') && second_dm.channel_id.starts_with('D'));

    // A follow-up of the same severity: replies, not broadcast, each in its
    // own destination's thread, sent to the conversation id Slack answered.
    env.publish(&env.checkout_incident("second", json!({"severity": "high"})))
        .await;
    env.slack.wait_for_posts(6, WAIT).await.unwrap();
    for parent in [&channel_first, &lead_dm, &second_dm] {
        let reply = posts_of(&env, "second")
            .into_iter()
            .find(|p| p.channel_id == parent.channel_id)
            .unwrap_or_else(|| panic!("a reply in {}", parent.channel_id));
        assert_eq!(reply.channel, parent.channel_id, "replies go to the id");
        assert_eq!(reply.thread_ts.as_deref(), Some(parent.ts.as_str()));
        assert!(reply.body.get("reply_broadcast").is_none());
    }

    // More severe: still in the thread, and broadcast to the channel.
    env.publish(&env.checkout_incident("worse", json!({"severity": "critical"})))
        .await;
    env.slack.wait_for_posts(9, WAIT).await.unwrap();
    let worse = posts_of(&env, "worse")
        .into_iter()
        .find(|p| p.channel_id == PAYMENTS)
        .unwrap();
    assert_eq!(worse.thread_ts.as_deref(), Some(channel_first.ts.as_str()));
    assert_eq!(worse.body["reply_broadcast"], true);

    // Acknowledged: every first message updated, by its id, button gone.
    env.publish(&env.checkout_incident(
        "ack",
        json!({"type": "escalation.acknowledged", "severity": "critical",
               "acknowledged_by": {"slack_user": LEAD, "name": "Lead"}}),
    ))
    .await;
    let updates = env.slack.wait_for_updates(3, WAIT).await.unwrap();
    for parent in [&channel_first, &lead_dm, &second_dm] {
        let update = updates
            .iter()
            .find(|u| u.channel_id == parent.channel_id)
            .unwrap_or_else(|| panic!("{} updated", parent.channel_id));
        assert_eq!(update.ts, parent.ts);
        assert_eq!(
            update.channel, parent.channel_id,
            "chat.update takes the id"
        );
        assert!(ack_button(update).is_none(), "the button is gone");
        let status = update.blocks.as_ref().unwrap()[0]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            status.contains("Acknowledged") && status.contains("<@U0LEAD>"),
            "{status}"
        );
        assert_eq!(
            color(update),
            color(parent),
            "acknowledged keeps its colour"
        );
    }

    // Resolved: green.
    env.publish(&env.checkout_incident(
        "resolved",
        json!({"type": "escalation.resolved", "severity": "info"}),
    ))
    .await;
    let updates = env.slack.wait_for_updates(6, WAIT).await.unwrap();
    let resolved: Vec<&RecordedPost> = updates[3..].iter().collect();
    assert_eq!(resolved.len(), 3);
    for update in resolved {
        assert_eq!(color(update), "#2EB67D");
        assert!(ack_button(update).is_none());
        assert!(
            update.blocks.as_ref().unwrap()[0]["elements"][0]["text"]
                .as_str()
                .unwrap()
                .contains("Resolved")
        );
    }

    worker.stop().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn events_of_one_incident_published_together_make_one_first_message_and_replies() {
    let env = env().await;
    for i in 0..5 {
        env.publish(&env.event(
            &format!("burst-{i}"),
            json!({"ticket": {"number": "TCK-7"}}),
        ))
        .await;
    }
    // All five are in the queue (and in the worker's window) at once.
    let worker = env.spawn_worker();
    let posts = env.slack.wait_for_posts(5, WAIT).await.unwrap();
    worker.stop().await;

    let top_level: Vec<&RecordedPost> = posts.iter().filter(|p| p.thread_ts.is_none()).collect();
    assert_eq!(top_level.len(), 1, "one first message: {posts:#?}");
    for reply in posts.iter().filter(|p| p.thread_ts.is_some()) {
        assert_eq!(reply.thread_ts.as_deref(), Some(top_level[0].ts.as_str()));
        assert_eq!(reply.channel_id, ESCALATIONS);
    }
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn events_of_different_incidents_and_standalone_events_each_start_their_own_message() {
    let env = env().await;
    let worker = env.spawn_worker();
    env.publish(&env.event("a", json!({"dedup_key": "a"})))
        .await;
    env.publish(&env.event("b", json!({"dedup_key": "b"})))
        .await;
    env.publish(&env.event("c", json!({}))).await;
    env.publish(&env.event("d", json!({}))).await;
    let posts = env.slack.wait_for_posts(4, WAIT).await.unwrap();
    worker.stop().await;
    assert!(posts.iter().all(|p| p.thread_ts.is_none()), "{posts:#?}");
    // A standalone event can be acknowledged too: its button names it.
    let standalone = posts.iter().find(|p| event_id(p) == "c").unwrap();
    let value: Value = serde_json::from_str(&ack_button(standalone).unwrap()).unwrap();
    assert_eq!(value["k"], "event:c");
    env.cleanup().await;
}

#[tokio::test]
async fn a_follow_up_whose_first_message_was_deleted_becomes_the_new_first_message() {
    a_follow_up_after_the_first_message_was_deleted(false).await;
}

#[tokio::test]
async fn a_follow_up_slack_posts_to_the_channel_for_a_deleted_parent_becomes_the_new_first_message()
{
    a_follow_up_after_the_first_message_was_deleted(true).await;
}

/// Slack refuses a reply under a deleted message (`thread_not_found`), or
/// takes it as a channel message (`ok`, no `thread_ts`): either way that
/// post is the incident's first message from then on.
async fn a_follow_up_after_the_first_message_was_deleted(slack_posts_to_the_channel: bool) {
    let env = env().await;
    env.slack
        .set_orphan_replies_to_channel(slack_posts_to_the_channel);
    let worker = env.spawn_worker();
    env.publish(&env.event("one", json!({"dedup_key": "disk"})))
        .await;
    let first = env.slack.wait_for_posts(1, WAIT).await.unwrap()[0].clone();
    // Somebody deletes the alert in Slack.
    env.slack.delete_message(&first.channel_id, &first.ts);

    env.publish(&env.event("two", json!({"dedup_key": "disk"})))
        .await;
    let posts = env.slack.wait_for_posts(2, WAIT).await.unwrap();
    let second = &posts[1];
    assert_eq!(second.thread_ts, None, "Slack had no thread: a new message");
    let refused = env
        .slack
        .requests_for("chat.postMessage")
        .into_iter()
        .filter(|r| r.error.as_deref() == Some("thread_not_found"))
        .count();
    let expected_refusals = if slack_posts_to_the_channel { 0 } else { 1 };
    assert_eq!(refused, expected_refusals, "the reply was tried first");

    env.publish(&env.event("three", json!({"dedup_key": "disk"})))
        .await;
    let posts = env.slack.wait_for_posts(3, WAIT).await.unwrap();
    assert_eq!(
        posts[2].thread_ts.as_deref(),
        Some(second.ts.as_str()),
        "later events reply under the new first message"
    );
    worker.stop().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

/// Each answer Slack may give a reply it will not thread (the parent gone,
/// the `thread_ts` refused, the thread locked, a parent that takes no
/// replies): the event is posted once more, to the channel, not emailed.
#[tokio::test]
async fn a_reply_slack_will_not_thread_is_posted_to_the_channel() {
    for code in [
        "thread_not_found",
        "invalid_thread_ts",
        "message_not_found",
        "restricted_action_thread_locked",
        "cannot_reply_to_message",
    ] {
        let env = env().await;
        let worker = env.spawn_worker();
        env.publish(&env.event("one", json!({"dedup_key": "refused"})))
            .await;
        env.slack.wait_for_posts(1, WAIT).await.unwrap();
        env.slack.fail_next("chat.postMessage", 1, Fault::api(code));
        env.publish(&env.event("two", json!({"dedup_key": "refused"})))
            .await;
        let posts = env
            .slack
            .wait_for_posts(2, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        worker.stop().await;

        let refused = env.slack.requests_for("chat.postMessage");
        assert_eq!(
            refused.len(),
            3,
            "{code}: the post, the refused reply, the post again"
        );
        assert!(
            refused[1].params["thread_ts"].is_string(),
            "{code}: a reply first"
        );
        assert_eq!(posts[1].thread_ts, None, "{code}: then to the channel");
        assert_eq!(event_id(&posts[1]), "two", "{code}");
        assert!(env.smtp.mails().is_empty(), "{code}: nothing emailed");
        env.assert_nothing_pending().await;
        env.cleanup().await;
    }
}

#[tokio::test]
async fn a_first_message_found_in_the_history_after_an_unsure_answer_keeps_its_thread() {
    a_first_message_found_in_the_history(false).await;
}

#[tokio::test]
async fn a_first_message_found_in_the_history_after_a_person_replied_to_it_keeps_its_thread() {
    a_first_message_found_in_the_history(true).await;
}

/// Slack took the incident's first message but answered `internal_error`,
/// so the worker looks for it in the channel's history before posting
/// again. It finds it, and it is the first message whether or not somebody
/// replied under it meanwhile: Slack then shows it with `thread_ts` equal
/// to its own `ts`, which is not the mark of a reply. The incident's next
/// event replies in that thread.
async fn a_first_message_found_in_the_history(person_replied: bool) {
    let env = env().await;
    let history_held = tokio_util::sync::CancellationToken::new();
    env.slack.fail_next(
        "chat.postMessage",
        1,
        Fault::AcceptThenFail(Box::new(Fault::api("internal_error"))),
    );
    env.slack.fail_next(
        "conversations.history",
        1,
        Fault::HoldUntil(history_held.clone()),
    );
    let worker = env.spawn_worker();
    env.publish(&env.event("one", json!({"dedup_key": "db"})))
        .await;
    env.slack
        .wait_for_requests("conversations.history", 1, WAIT)
        .await
        .unwrap();
    let first = env.slack.posts()[0].clone();
    if person_replied {
        env.slack
            .reply_as_person(&first.channel_id, &first.ts, "U0ONCALL", "looking");
    }
    history_held.cancel();
    // The graceful stop waits for the event to be settled.
    worker.stop().await;
    env.assert_nothing_pending().await;

    let worker = env.spawn_worker();
    env.publish(&env.event("two", json!({"dedup_key": "db"})))
        .await;
    let posts = env.slack.wait_for_posts(2, WAIT).await.unwrap();
    worker.stop().await;
    assert_eq!(posts.len(), 2, "the first message was not posted again");
    assert_eq!(
        posts[1].thread_ts.as_deref(),
        Some(first.ts.as_str()),
        "the next event replies under the first message found in the history"
    );
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_first_message_slack_took_only_as_plain_text_is_updated_as_plain_text() {
    let env = env().await;
    // Slack refuses the layout: the first post, then the update.
    env.slack
        .fail_next("chat.postMessage", 1, Fault::Api("invalid_blocks".into()));
    env.slack
        .fail_next("chat.update", 1, Fault::Api("invalid_blocks".into()));
    let worker = env.spawn_worker();
    env.publish(&env.event("plain", json!({"dedup_key": "layout"})))
        .await;
    let first = env.slack.wait_for_posts(1, WAIT).await.unwrap()[0].clone();
    assert_eq!(first.blocks, None, "posted as plain text");

    env.publish(&env.event(
        "plain-resolved",
        json!({"dedup_key": "layout", "type": "escalation.resolved"}),
    ))
    .await;
    let updates = env.slack.wait_for_updates(1, WAIT).await.unwrap();
    worker.stop().await;

    assert_eq!(updates.len(), 1);
    let update = &updates[0];
    assert_eq!(update.ts, first.ts, "the first message, updated");
    assert_eq!(update.body["blocks"], json!([]), "no layout left to keep");
    assert_eq!(update.body["attachments"], json!([]));
    let text = update.text.as_deref().unwrap_or_default();
    assert!(text.contains("Resolved"), "{text}");
    let refused = env
        .slack
        .requests_for("chat.update")
        .into_iter()
        .filter(|r| r.error.as_deref() == Some("invalid_blocks"))
        .count();
    assert_eq!(refused, 1, "the layout was tried first");
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_first_post_after_slack_comes_back_says_the_incident_went_to_email_meanwhile() {
    let env = TestEnv::start(support::RULES_WITH_EMAIL).await;
    env.slack.set_outage(true);
    let worker = env.spawn_worker();
    env.publish(&env.event("during", json!({"dedup_key": "db"})))
        .await;
    env.smtp.wait_for_mails(1, WAIT).await.unwrap();

    env.slack.set_outage(false);
    env.publish(&env.event("after", json!({"dedup_key": "db"})))
        .await;
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    let note = posts[0].blocks.as_ref().unwrap().to_string();
    assert!(
        note.contains("could not take earlier notifications") && note.contains("went by email"),
        "{note}"
    );

    // Said once: the next post of the incident replies without it.
    env.publish(&env.event("later", json!({"dedup_key": "db"})))
        .await;
    let posts = env.slack.wait_for_posts(2, WAIT).await.unwrap();
    assert_eq!(posts[1].thread_ts.as_deref(), Some(posts[0].ts.as_str()));
    assert!(
        !posts[1]
            .blocks
            .as_ref()
            .unwrap()
            .to_string()
            .contains("went by email")
    );
    worker.stop().await;
    env.cleanup().await;
}
