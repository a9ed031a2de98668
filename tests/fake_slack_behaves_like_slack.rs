//! Proves the wire behaviour of the fake Slack Web API (tests/support/fake_slack.rs)
//! with a real HTTP client, so product tests can rely on it behaving like Slack.

#[path = "support/fake_slack.rs"]
mod fake_slack;

use std::time::{Duration, Instant};

use fake_slack::*;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde_json::{Value, json};

const TEAM: &str = "T0TEST";
const BOT: &str = "U0BOT";
const TOKEN: &str = "xoxb-test-1-valid";
const WAIT: Duration = Duration::from_secs(5);

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Value,
    raw: String,
}

impl Resp {
    fn error(&self) -> Option<&str> {
        self.body.get("error").and_then(|e| e.as_str())
    }
    fn ok(&self) -> bool {
        self.body.get("ok") == Some(&Value::Bool(true))
    }
}

async fn setup() -> (FakeSlack, reqwest::Client) {
    let slack = FakeSlack::start().await;
    slack.add_token(TOKEN, TokenSpec::bot(TEAM, BOT));
    slack.add_channel("C0GENERAL", "general", ChannelSpec::member());
    slack.add_channel("C0OTHER", "other", ChannelSpec::member());
    slack.add_channel("C0PUBLIC", "public-not-member", ChannelSpec::not_member());
    slack.add_channel("C0ARCHIVED", "old", ChannelSpec::archived());
    slack.add_channel("G0PRIVATE", "secret", ChannelSpec::private(false));
    slack.add_channel("G0PRIVMEM", "secret-member", ChannelSpec::private(true));
    slack.add_user("U0ANA", "ana@example.com");
    slack.add_user("U0BOB", "bob@example.com");
    (slack, reqwest::Client::new())
}

async fn into_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let raw = r.text().await.expect("body");
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        raw,
    }
}

/// JSON body with `Content-Type: application/json; charset=utf-8` and a Bearer token.
async fn post_json(
    c: &reqwest::Client,
    s: &FakeSlack,
    method: &str,
    token: Option<&str>,
    body: Value,
) -> Resp {
    let mut rb = c
        .post(s.method_url(method))
        .header(CONTENT_TYPE, "application/json; charset=utf-8")
        .body(body.to_string());
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    into_resp(rb.send().await.expect("send")).await
}

async fn post_form(
    c: &reqwest::Client,
    s: &FakeSlack,
    method: &str,
    token: Option<&str>,
    form: &[(&str, &str)],
) -> Resp {
    let mut rb = c.post(s.method_url(method)).form(form);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    into_resp(rb.send().await.expect("send")).await
}

async fn post_text(c: &reqwest::Client, s: &FakeSlack, token: &str, channel: &str) -> Resp {
    post_json(
        c,
        s,
        "chat.postMessage",
        Some(token),
        json!({"channel": channel, "text": "hello"}),
    )
    .await
}

fn ts_value(ts: &str) -> (u64, u64) {
    let (a, b) = ts.split_once('.').expect("ts has a dot");
    assert_eq!(b.len(), 6, "ts {ts} has 6 decimals");
    (a.parse().unwrap(), b.parse().unwrap())
}

#[tokio::test]
async fn post_message_json_is_recorded_and_answered_like_slack() {
    let (s, c) = setup().await;
    let blocks = json!([{"type":"section","text":{"type":"mrkdwn","text":"*hi*"}}]);
    let metadata = json!({"event_type":"alert_router_notification","event_payload":{"event_id":"e1","rule":"r"}});
    let r = post_json(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","text":"fallback","blocks":blocks,"metadata":metadata}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["channel"], "C0GENERAL");
    assert!(
        r.headers[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let ts1 = r.body["ts"].as_str().unwrap().to_string();
    assert_eq!(r.body["message"]["text"], "fallback");
    assert_eq!(r.body["message"]["ts"], ts1.as_str());
    assert!(r.body.get("warning").is_none(), "{}", r.raw);

    let r2 = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    let ts2 = r2.body["ts"].as_str().unwrap().to_string();
    assert!(ts_value(&ts2) > ts_value(&ts1), "{ts2} > {ts1}");

    let posts = s.posts();
    assert_eq!(posts.len(), 2);
    let p = &posts[0];
    assert_eq!(p.method, "chat.postMessage");
    assert_eq!(p.channel, "C0GENERAL");
    assert_eq!(p.channel_id, "C0GENERAL");
    assert_eq!(p.team_id, TEAM);
    assert_eq!(p.text.as_deref(), Some("fallback"));
    assert_eq!(p.blocks.as_ref(), Some(&blocks));
    assert_eq!(p.metadata.as_ref(), Some(&metadata));
    assert_eq!(p.token, TOKEN);
    assert_eq!(p.ts, ts1);
    assert_eq!(p.body["channel"], "C0GENERAL");
    assert_eq!(s.posts_to("C0GENERAL").len(), 2);
    assert!(s.posts_to("C0OTHER").is_empty());
}

#[tokio::test]
async fn json_without_charset_gets_missing_charset_warning() {
    let (s, c) = setup().await;
    let r = into_resp(
        c.post(s.method_url("chat.postMessage"))
            .bearer_auth(TOKEN)
            .json(&json!({"channel":"C0GENERAL","text":"x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["warning"], "missing_charset");
    assert_eq!(
        r.body["response_metadata"]["warnings"],
        json!(["missing_charset"])
    );
}

#[tokio::test]
async fn post_message_form_encoded_with_channel_names() {
    let (s, c) = setup().await;
    let blocks = r#"[{"type":"section","text":{"type":"plain_text","text":"hi"}}]"#;
    let r = post_form(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        &[
            ("channel", "#general"),
            ("text", "a & b"),
            ("blocks", blocks),
        ],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["channel"], "C0GENERAL");
    let r = post_form(
        &c,
        &s,
        "chat.postMessage",
        None,
        &[("token", TOKEN), ("channel", "other"), ("text", "x")],
    )
    .await;
    assert!(r.ok(), "token as form field: {}", r.raw);
    assert_eq!(r.body["channel"], "C0OTHER");
    let posts = s.posts();
    assert_eq!(posts[0].channel, "#general");
    assert_eq!(posts[0].channel_id, "C0GENERAL");
    assert_eq!(posts[0].text.as_deref(), Some("a & b"));
    assert_eq!(posts[0].blocks.as_ref().unwrap()[0]["type"], "section");
    assert_eq!(posts[1].channel_id, "C0OTHER");
}

#[tokio::test]
async fn token_errors() {
    let (s, c) = setup().await;
    s.add_token("xoxb-test-revoked", TokenSpec::bot(TEAM, BOT));
    s.revoke("xoxb-test-revoked");
    s.add_token("xoxb-test-expired", TokenSpec::bot(TEAM, BOT));
    s.expire("xoxb-test-expired");
    s.add_token(
        "xoxb-test-inactive",
        TokenSpec::bot(TEAM, BOT).with_state(TokenState::AccountInactive),
    );
    let cases = [
        (None, "not_authed"),
        (Some("xoxb-test-unknown"), "invalid_auth"),
        (Some("xoxb-test-revoked"), "token_revoked"),
        (Some("xoxb-test-expired"), "token_expired"),
        (Some("xoxb-test-inactive"), "account_inactive"),
    ];
    for (token, code) in cases {
        for method in ["chat.postMessage", "auth.test"] {
            let r = post_json(
                &c,
                &s,
                method,
                token,
                json!({"channel":"C0GENERAL","text":"x"}),
            )
            .await;
            assert_eq!(r.status, 200, "{method} {token:?}");
            assert_eq!(r.body["ok"], false);
            assert_eq!(r.error(), Some(code), "{method} {token:?}: {}", r.raw);
        }
    }
    // Slack does not read a token from a JSON body: it must be a header.
    let r = post_json(
        &c,
        &s,
        "chat.postMessage",
        None,
        json!({"token": TOKEN, "channel":"C0GENERAL","text":"x"}),
    )
    .await;
    assert_eq!(r.error(), Some("not_authed"));
    assert!(s.posts().is_empty());
    let reqs = s.requests_for("chat.postMessage");
    assert_eq!(reqs[0].error.as_deref(), Some("not_authed"));
    assert_eq!(reqs[0].status, Some(200));
}

#[tokio::test]
async fn missing_scope_names_needed_and_provided() {
    let (s, c) = setup().await;
    s.add_token(
        "xoxb-test-noscope",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["users:read", "channels:join"]),
    );
    let r = post_text(&c, &s, "xoxb-test-noscope", "C0GENERAL").await;
    assert_eq!(r.error(), Some("missing_scope"));
    assert_eq!(r.body["needed"], "chat:write");
    assert_eq!(r.body["provided"], "users:read,channels:join");
    let r = post_form(
        &c,
        &s,
        "users.lookupByEmail",
        Some("xoxb-test-noscope"),
        &[("email", "ana@example.com")],
    )
    .await;
    assert_eq!(r.error(), Some("missing_scope"));
    assert_eq!(r.body["needed"], "users:read.email");
}

#[tokio::test]
async fn channel_errors() {
    let (s, c) = setup().await;
    s.add_token(
        "xoxb-test-nopublic",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write"]),
    );
    let cases = [
        ("C0NOPE", TOKEN, Some("channel_not_found")),
        ("#nope", TOKEN, Some("channel_not_found")),
        ("C0ARCHIVED", TOKEN, Some("is_archived")),
        ("C0PUBLIC", "xoxb-test-nopublic", Some("not_in_channel")),
        (
            "#public-not-member",
            "xoxb-test-nopublic",
            Some("not_in_channel"),
        ),
        ("C0PUBLIC", TOKEN, None), // chat:write.public
        ("G0PRIVATE", TOKEN, Some("channel_not_found")),
        ("G0PRIVMEM", TOKEN, None),
        ("C0GENERAL", "xoxb-test-nopublic", None),
    ];
    for (channel, token, want) in cases {
        let r = post_text(&c, &s, token, channel).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.error(), want, "{channel} with {token}: {}", r.raw);
    }
    let r = post_json(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        json!({"text":"no channel"}),
    )
    .await;
    assert_eq!(r.error(), Some("channel_not_found"));
    assert_eq!(s.posts().len(), 3);
}

#[tokio::test]
async fn payload_errors() {
    let (s, c) = setup().await;
    let post = |body: Value| post_json(&c, &s, "chat.postMessage", Some(TOKEN), body);
    assert_eq!(
        post(json!({"channel":"C0GENERAL"})).await.error(),
        Some("no_text")
    );
    assert_eq!(
        post(json!({"channel":"C0GENERAL","text":""})).await.error(),
        Some("no_text")
    );
    assert_eq!(
        post(json!({"channel":"C0GENERAL","blocks":{"type":"section"}}))
            .await
            .error(),
        Some("invalid_blocks_format")
    );
    let section = json!({"type":"section","text":{"type":"mrkdwn","text":"x"}});
    let too_many: Vec<Value> = (0..51).map(|_| section.clone()).collect();
    let r = post(json!({"channel":"C0GENERAL","text":"t","blocks":too_many})).await;
    assert_eq!(r.error(), Some("invalid_blocks"), "{}", r.raw);
    let fifty: Vec<Value> = (0..50).map(|_| section.clone()).collect();
    assert!(
        post(json!({"channel":"C0GENERAL","text":"t","blocks":fifty}))
            .await
            .ok()
    );
    let long = "x".repeat(2900);
    let big: Vec<Value> = (0..5)
        .map(|_| json!({"type":"section","text":{"type":"mrkdwn","text":long}}))
        .collect();
    let r = post(json!({"channel":"C0GENERAL","text":"t","blocks":big})).await;
    assert_eq!(r.error(), Some("msg_blocks_too_long"), "{}", r.raw);
    let r = post(json!({"channel":"C0GENERAL","text":"t","blocks":[{"type":"section","text":{"type":"mrkdwn","text":"y".repeat(3001)}}]})).await;
    assert_eq!(r.error(), Some("invalid_blocks"));
    // blocks alone or attachments alone are enough content
    assert!(
        post(json!({"channel":"C0GENERAL","blocks":[section.clone()]}))
            .await
            .ok()
    );
    assert!(
        post(json!({"channel":"C0GENERAL","attachments":[{"color":"danger","text":"a"}]}))
            .await
            .ok()
    );
    assert_eq!(s.posts().len(), 3);
    assert!(s.posts()[2].attachments.is_some());
}

#[tokio::test]
async fn direct_messages_use_stable_d_ids() {
    let (s, c) = setup().await;
    let r1 = post_text(&c, &s, TOKEN, "U0ANA").await;
    assert!(r1.ok(), "{}", r1.raw);
    let d = r1.body["channel"].as_str().unwrap().to_string();
    assert!(d.starts_with('D'), "{d}");
    let r2 = post_text(&c, &s, TOKEN, "U0ANA").await;
    assert_eq!(r2.body["channel"], d.as_str());
    let rb = post_text(&c, &s, TOKEN, "U0BOB").await;
    assert_ne!(rb.body["channel"], d.as_str());
    assert_eq!(s.dm_channel_id("U0ANA"), d);

    let open = post_json(
        &c,
        &s,
        "conversations.open",
        Some(TOKEN),
        json!({"users":"U0ANA"}),
    )
    .await;
    assert!(open.ok(), "{}", open.raw);
    assert_eq!(open.body["channel"]["id"], d.as_str());

    // posting to the D id works too
    assert!(post_text(&c, &s, TOKEN, &d).await.ok());
    let posts = s.posts_to(&d);
    assert_eq!(posts.len(), 3);
    assert_eq!(posts[0].channel, "U0ANA");

    // unknown or deactivated user
    assert_eq!(
        post_text(&c, &s, TOKEN, "U0NOBODY").await.error(),
        Some("channel_not_found")
    );
    let r = post_json(
        &c,
        &s,
        "conversations.open",
        Some(TOKEN),
        json!({"users":"U0NOBODY"}),
    )
    .await;
    assert_eq!(r.error(), Some("user_not_found"));

    // chat.update needs the D id, not the user id
    let ts = r1.body["ts"].as_str().unwrap();
    let up = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel": d, "ts": ts, "text":"acknowledged"}),
    )
    .await;
    assert!(up.ok(), "{}", up.raw);
    let up = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel": "U0ANA", "ts": ts, "text":"acknowledged"}),
    )
    .await;
    assert_eq!(up.error(), Some("channel_not_found"));
}

#[tokio::test]
async fn chat_update_records_updates() {
    let (s, c) = setup().await;
    let r = post_text(&c, &s, TOKEN, "#general").await;
    let ts = r.body["ts"].as_str().unwrap().to_string();
    let up = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","ts":ts,"text":"resolved","blocks":[{"type":"divider"}]}),
    )
    .await;
    assert!(up.ok(), "{}", up.raw);
    assert_eq!(up.body["ts"], ts.as_str());
    assert_eq!(up.body["channel"], "C0GENERAL");
    let ups = s.wait_for_updates(1, WAIT).await.unwrap();
    assert_eq!(ups[0].ts, ts);
    assert_eq!(ups[0].text.as_deref(), Some("resolved"));
    assert_eq!(s.posts().len(), 1, "updates are not posts");
    let missing = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","ts":"1.000001","text":"x"}),
    )
    .await;
    assert_eq!(missing.error(), Some("message_not_found"));
    let long = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","ts":ts,"text":"x".repeat(4001)}),
    )
    .await;
    assert_eq!(long.error(), Some("msg_too_long"));

    // The bot removed from a private channel: its message there is out of
    // reach, and the channel reads as not found.
    let private = post_text(&c, &s, TOKEN, "G0PRIVMEM").await;
    assert!(private.ok(), "{}", private.raw);
    s.set_channel("G0PRIVMEM", ChannelSpec::private(false));
    let removed = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel": "G0PRIVMEM", "ts": private.body["ts"], "text": "resolved"}),
    )
    .await;
    assert_eq!(removed.error(), Some("channel_not_found"));
}

#[tokio::test]
async fn conversations_join() {
    let (s, c) = setup().await;
    s.add_token(
        "xoxb-test-nopublic",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write", "channels:join"]),
    );
    assert_eq!(
        post_text(&c, &s, "xoxb-test-nopublic", "C0PUBLIC")
            .await
            .error(),
        Some("not_in_channel")
    );
    let join = |ch: &'static str| {
        post_json(
            &c,
            &s,
            "conversations.join",
            Some("xoxb-test-nopublic"),
            json!({ "channel": ch }),
        )
    };
    let r = join("C0PUBLIC").await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["channel"]["id"], "C0PUBLIC");
    assert_eq!(r.body["channel"]["is_member"], true);
    assert!(r.body.get("warning").is_none());
    assert!(s.bot_is_member("C0PUBLIC"));
    assert!(
        post_text(&c, &s, "xoxb-test-nopublic", "C0PUBLIC")
            .await
            .ok()
    );

    let again = join("C0PUBLIC").await;
    assert!(again.ok());
    assert_eq!(again.body["warning"], "already_in_channel");
    assert_eq!(
        again.body["response_metadata"]["warnings"],
        json!(["already_in_channel"])
    );
    assert_eq!(join("C0ARCHIVED").await.error(), Some("is_archived"));
    assert_eq!(join("C0NOPE").await.error(), Some("channel_not_found"));
    assert_eq!(
        join("G0PRIVMEM").await.error(),
        Some("method_not_supported_for_channel_type")
    );
    s.add_token(
        "xoxb-test-nojoin",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write"]),
    );
    let r = post_json(
        &c,
        &s,
        "conversations.join",
        Some("xoxb-test-nojoin"),
        json!({"channel":"C0OTHER"}),
    )
    .await;
    assert_eq!(r.error(), Some("missing_scope"));
    assert_eq!(r.body["needed"], "channels:join");
}

#[tokio::test]
async fn lookup_by_email_reads_form_bodies_only() {
    let (s, c) = setup().await;
    let r = post_form(
        &c,
        &s,
        "users.lookupByEmail",
        Some(TOKEN),
        &[("email", "Ana@Example.com")],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["user"]["id"], "U0ANA");
    assert_eq!(r.body["user"]["profile"]["email"], "ana@example.com");

    // A JSON body is not read by this method: the email is missing.
    let r = post_json(
        &c,
        &s,
        "users.lookupByEmail",
        Some(TOKEN),
        json!({"email":"ana@example.com"}),
    )
    .await;
    assert!(!r.ok(), "{}", r.raw);
    assert_eq!(r.error(), Some("invalid_arguments"));

    let r = post_form(
        &c,
        &s,
        "users.lookupByEmail",
        Some(TOKEN),
        &[("email", "nobody@example.com")],
    )
    .await;
    assert_eq!(r.error(), Some("users_not_found"));

    s.deactivate_user("U0BOB");
    let r = post_form(
        &c,
        &s,
        "users.lookupByEmail",
        Some(TOKEN),
        &[("email", "bob@example.com")],
    )
    .await;
    assert_eq!(r.error(), Some("users_not_found"));
    assert_eq!(
        post_text(&c, &s, TOKEN, "U0BOB").await.error(),
        Some("channel_not_found")
    );
}

#[tokio::test]
async fn auth_test_describes_the_token() {
    let (s, c) = setup().await;
    let r = post_form(&c, &s, "auth.test", Some(TOKEN), &[]).await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["team_id"], TEAM);
    assert_eq!(r.body["user_id"], BOT);
    assert!(r.body["bot_id"].as_str().unwrap().starts_with('B'));
    assert!(r.body["url"].as_str().unwrap().starts_with("https://"));
    assert!(r.body["team"].is_string());
}

#[tokio::test]
async fn auth_revoke_ends_the_token_unless_only_testing() {
    let (s, c) = setup().await;
    let r = post_form(&c, &s, "auth.revoke", Some(TOKEN), &[("test", "1")]).await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["revoked"], false);
    assert!(post_form(&c, &s, "auth.test", Some(TOKEN), &[]).await.ok());

    let r = post_form(&c, &s, "auth.revoke", Some(TOKEN), &[]).await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["revoked"], true);
    let after = post_form(&c, &s, "auth.test", Some(TOKEN), &[]).await;
    assert_eq!(after.error(), Some("token_revoked"));
    let again = post_form(&c, &s, "auth.revoke", Some(TOKEN), &[]).await;
    assert_eq!(again.error(), Some("token_revoked"));
}

#[tokio::test]
async fn unknown_method_is_404() {
    let (s, c) = setup().await;
    let r = post_form(&c, &s, "chat.postMessagee", Some(TOKEN), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error(), Some("unknown_method"));
    assert_eq!(s.requests()[0].status, Some(404));
}

async fn refresh(
    c: &reqwest::Client,
    s: &FakeSlack,
    id: &str,
    secret: &str,
    refresh_token: &str,
) -> Resp {
    post_form(
        c,
        s,
        "oauth.v2.access",
        None,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", id),
            ("client_secret", secret),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

#[tokio::test]
async fn refresh_token_rotation_revokes_the_used_refresh_token() {
    let (s, c) = setup().await;
    s.set_oauth_client("123.456", "shh");
    s.add_refresh_token("xoxe-test-first", TEAM, BOT);

    let r = refresh(&c, &s, "123.456", "shh", "xoxe-test-first").await;
    assert!(r.ok(), "{}", r.raw);
    let access = r.body["access_token"].as_str().unwrap().to_string();
    let new_refresh = r.body["refresh_token"].as_str().unwrap().to_string();
    assert!(access.starts_with("xoxe.xoxb-"), "{access}");
    assert!(new_refresh.starts_with("xoxe-1-"), "{new_refresh}");
    assert_ne!(new_refresh, "xoxe-test-first");
    assert_eq!(r.body["expires_in"], 43200);
    assert_eq!(r.body["token_type"], "bot");
    assert_eq!(r.body["team"]["id"], TEAM);
    assert_eq!(r.body["bot_user_id"], BOT);
    assert_eq!(s.refresh_count(), 1);

    // the new access token works
    let t = post_form(&c, &s, "auth.test", Some(&access), &[]).await;
    assert!(t.ok(), "{}", t.raw);
    assert!(post_text(&c, &s, &access, "C0GENERAL").await.ok());

    // the used refresh token is revoked
    let again = refresh(&c, &s, "123.456", "shh", "xoxe-test-first").await;
    assert_eq!(again.error(), Some("invalid_refresh_token"));
    assert_eq!(s.refresh_count(), 1);

    // the new one works, once, and rotates again
    let r2 = refresh(&c, &s, "123.456", "shh", &new_refresh).await;
    assert!(r2.ok(), "{}", r2.raw);
    assert_ne!(r2.body["access_token"], access.as_str());
    assert_ne!(r2.body["refresh_token"], new_refresh.as_str());
    assert_eq!(s.refresh_count(), 2);
    let issued = s.issued_tokens();
    assert_eq!(issued.len(), 2);
    assert_eq!(issued[1].used_refresh_token, new_refresh);

    assert_eq!(
        refresh(&c, &s, "123.456", "shh", "xoxe-test-unknown")
            .await
            .error(),
        Some("invalid_refresh_token")
    );
    assert_eq!(
        refresh(&c, &s, "999.999", "shh", &new_refresh)
            .await
            .error(),
        Some("invalid_client_id")
    );
    assert_eq!(
        refresh(&c, &s, "123.456", "wrong", &new_refresh)
            .await
            .error(),
        Some("bad_client_secret")
    );
    let r = post_form(
        &c,
        &s,
        "oauth.v2.access",
        None,
        &[
            ("grant_type", "password"),
            ("client_id", "123.456"),
            ("client_secret", "shh"),
        ],
    )
    .await;
    assert_eq!(r.error(), Some("invalid_grant_type"));
}

#[tokio::test]
async fn refresh_accepts_basic_auth_and_configurable_grace() {
    let (s, c) = setup().await;
    s.set_oauth_client("123.456", "shh");
    s.add_refresh_token("xoxe-test-first", TEAM, BOT);
    s.set_refresh_grace(Duration::from_secs(60));
    let call = || {
        c.post(s.method_url("oauth.v2.access"))
            .basic_auth("123.456", Some("shh"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", "xoxe-test-first"),
            ])
            .send()
    };
    let r = into_resp(call().await.unwrap()).await;
    assert!(r.ok(), "{}", r.raw);
    let r = into_resp(call().await.unwrap()).await;
    assert!(r.ok(), "reuse within the grace period: {}", r.raw);
    assert_eq!(s.refresh_count(), 2);

    // JSON bodies are not read by oauth.v2.access
    let r = post_json(
        &c,
        &s,
        "oauth.v2.access",
        None,
        json!({"grant_type":"refresh_token","client_id":"123.456","client_secret":"shh","refresh_token":"xoxe-test-first"}),
    )
    .await;
    assert!(!r.ok());
}

#[tokio::test]
async fn channel_rate_limit_is_per_channel_with_retry_after() {
    let (s, c) = setup().await;
    s.add_token("xoxb-test-other-team", TokenSpec::bot("T0OTHER", "U0BOT2"));
    s.set_channel_rate_limit(1.0, 2);
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert!(post_text(&c, &s, TOKEN, "#general").await.ok());
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert_eq!(r.status, 429, "{}", r.raw);
    assert_eq!(r.error(), Some("ratelimited"));
    let retry: u64 = r.headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // another channel, and the same channel in another workspace, are independent
    assert!(post_text(&c, &s, TOKEN, "C0OTHER").await.ok());
    assert!(
        post_text(&c, &s, "xoxb-test-other-team", "C0GENERAL")
            .await
            .ok()
    );
    assert_eq!(s.rate_limited_count(), 1);
    assert_eq!(s.posts_to("C0GENERAL").len(), 3);
    let limited: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.status == Some(429))
        .collect();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].error.as_deref(), Some("ratelimited"));
    // other methods are not limited by the channel limit
    for _ in 0..5 {
        assert!(post_form(&c, &s, "auth.test", Some(TOKEN), &[]).await.ok());
    }
    s.clear_channel_rate_limit();
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
}

#[tokio::test]
async fn fail_next_injects_http_api_and_ratelimit_faults() {
    let (s, c) = setup().await;
    s.fail_next("chat.postMessage", 1, Fault::Http(503));
    s.fail_next("chat.postMessage", 1, Fault::api("internal_error"));
    s.fail_next(
        "chat.postMessage",
        1,
        Fault::RateLimited {
            retry_after_secs: 7,
        },
    );
    s.fail_next(
        "chat.postMessage",
        1,
        Fault::HttpJson(500, "fatal_error".into()),
    );
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert_eq!(r.status, 503);
    assert!(r.raw.contains("<html>"), "HTML body: {}", r.raw);
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.error(), Some("internal_error"));
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers[RETRY_AFTER], "7");
    assert_eq!(r.error(), Some("ratelimited"));
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.error(), Some("fatal_error"));
    // faults are used up
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert_eq!(s.posts().len(), 1);
    assert_eq!(s.rate_limited_count(), 1);
    let statuses: Vec<_> = s.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![Some(503), Some(200), Some(429), Some(500), Some(200)]
    );
    // other methods were not affected
    s.fail_next("users.lookupByEmail", 2, Fault::api("internal_error"));
    assert!(post_form(&c, &s, "auth.test", Some(TOKEN), &[]).await.ok());
}

#[tokio::test]
async fn hang_never_answers_until_the_client_gives_up() {
    let (s, c) = setup().await;
    s.fail_next("chat.postMessage", 1, Fault::Hang);
    let started = Instant::now();
    let err = c
        .post(s.method_url("chat.postMessage"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_millis(300))
        .json(&json!({"channel":"C0GENERAL","text":"x"}))
        .send()
        .await
        .expect_err("the fake must not answer");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(s.posts().is_empty(), "a hung request is not a post");
    let reqs = s
        .wait_for_requests("chat.postMessage", 1, WAIT)
        .await
        .unwrap();
    assert_eq!(reqs[0].status, None);
    // the next request is served normally
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert_eq!(s.posts().len(), 1);
}

#[tokio::test]
async fn delay_then_normal_processing() {
    let (s, c) = setup().await;
    s.fail_next(
        "chat.postMessage",
        1,
        Fault::Delay(Duration::from_millis(250)),
    );
    let started = Instant::now();
    let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
    assert!(r.ok());
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(s.posts().len(), 1);
}

#[tokio::test]
async fn fail_channel_is_persistent_until_cleared() {
    let (s, c) = setup().await;
    s.fail_channel("#general", Fault::api("channel_not_found"));
    s.fail_channel("U0ANA", Fault::Http(500));
    for ch in ["C0GENERAL", "general", "#general"] {
        assert_eq!(
            post_text(&c, &s, TOKEN, ch).await.error(),
            Some("channel_not_found"),
            "{ch}"
        );
    }
    assert_eq!(post_text(&c, &s, TOKEN, "U0ANA").await.status, 500);
    assert!(post_text(&c, &s, TOKEN, "C0OTHER").await.ok());
    s.clear_faults();
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert!(post_text(&c, &s, TOKEN, "U0ANA").await.ok());
}

#[tokio::test]
async fn outage_answers_503_for_every_method() {
    let (s, c) = setup().await;
    s.set_outage(true);
    assert_eq!(post_text(&c, &s, TOKEN, "C0GENERAL").await.status, 503);
    assert_eq!(
        post_form(&c, &s, "auth.test", Some(TOKEN), &[])
            .await
            .status,
        503
    );
    assert_eq!(
        post_form(
            &c,
            &s,
            "users.lookupByEmail",
            Some(TOKEN),
            &[("email", "ana@example.com")]
        )
        .await
        .status,
        503
    );
    s.set_outage(false);
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert_eq!(s.posts().len(), 1);
}

#[tokio::test]
async fn a_slow_answer_comes_after_the_post_is_already_in_the_channel() {
    let (s, c) = setup().await;
    s.fail_next(
        "chat.postMessage",
        1,
        Fault::AcceptThenDelay(Duration::from_millis(300)),
    );
    let (s2, c2) = (s.clone(), c.clone());
    let answer = tokio::spawn(async move { post_text(&c2, &s2, TOKEN, "C0GENERAL").await });
    let posts = s.wait_for_posts(1, WAIT).await.expect("the post is in");
    assert!(!answer.is_finished(), "posted before it was answered");
    assert!(answer.await.unwrap().ok());
    assert_eq!(posts[0].channel_id, "C0GENERAL");
    assert_eq!(s.request_count("chat.postMessage"), 1);
}

#[tokio::test]
async fn an_unreachable_slack_resets_new_and_open_connections_and_processes_nothing() {
    let (s, c) = setup().await;
    // A connection kept alive from before the outage, and new ones.
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    s.set_unreachable(true);
    for fresh in [false, true] {
        let client = if fresh {
            reqwest::Client::new()
        } else {
            c.clone()
        };
        let error = client
            .post(s.method_url("chat.postMessage"))
            .bearer_auth(TOKEN)
            .form(&[("channel", "C0GENERAL"), ("text", "lost")])
            .send()
            .await
            .expect_err("no answer while unreachable");
        assert!(
            error.is_connect() || error.is_request(),
            "a connection error, not an answer: {error:?}"
        );
    }
    assert!(s.reset_count() >= 2, "{}", s.reset_count());
    assert_eq!(s.posts().len(), 1, "nothing processed while unreachable");

    s.set_unreachable(false);
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert_eq!(s.posts().len(), 2);
}

#[tokio::test]
async fn wait_for_posts_returns_when_posts_arrive_and_explains_timeouts() {
    let (s, c) = setup().await;
    let (s2, c2) = (s.clone(), c.clone());
    let poster = tokio::spawn(async move {
        for ch in ["C0GENERAL", "C0OTHER", "U0ANA"] {
            assert!(post_text(&c2, &s2, TOKEN, ch).await.ok());
        }
    });
    let posts = s.wait_for_posts(3, WAIT).await.expect("three posts");
    assert!(posts.len() >= 3);
    poster.await.unwrap();
    let to_other = s.wait_for_posts_to("C0OTHER", 1, WAIT).await.unwrap();
    assert_eq!(to_other.len(), 1);

    let err = s
        .wait_for_posts(4, Duration::from_millis(100))
        .await
        .expect_err("only three posts");
    assert!(err.contains("waiting for 4 post(s)"), "{err}");
    assert!(err.contains("C0OTHER"), "lists what was received: {err}");
    let _ = c;
}

#[tokio::test]
async fn wait_for_requests_counts_failed_requests_too() {
    let (s, c) = setup().await;
    let (s2, c2) = (s.clone(), c.clone());
    tokio::spawn(async move {
        post_form(
            &c2,
            &s2,
            "users.lookupByEmail",
            Some(TOKEN),
            &[("email", "x@example.com")],
        )
        .await;
        post_form(
            &c2,
            &s2,
            "users.lookupByEmail",
            Some(TOKEN),
            &[("email", "ana@example.com")],
        )
        .await;
    });
    let reqs = s
        .wait_for_requests("users.lookupByEmail", 2, WAIT)
        .await
        .unwrap();
    assert_eq!(reqs[0].error.as_deref(), Some("users_not_found"));
    assert_eq!(reqs[1].error, None);
    assert_eq!(reqs[1].params["email"], "ana@example.com");
    let err = s
        .wait_for_requests("chat.postMessage", 1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.contains("users.lookupByEmail"), "{err}");
}

#[tokio::test]
async fn authorization_header_is_what_slack_reads_first() {
    let (s, c) = setup().await;
    // A Bearer header wins over a form token.
    let r = into_resp(
        c.post(s.method_url("auth.test"))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .form(&[("token", "xoxb-test-garbage")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    // query-string arguments are read as well
    let r = into_resp(
        c.get(format!("{}?token={TOKEN}", s.method_url("auth.test")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
}

#[tokio::test]
async fn workspace_rate_limit_spans_channels() {
    let (s, c) = setup().await;
    s.add_token("xoxb-test-other-team", TokenSpec::bot("T0OTHER", "U0BOT2"));
    // Slow enough that no token refills between the posts on a loaded runner.
    s.set_workspace_rate_limit(0.01, 3);
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert!(post_text(&c, &s, TOKEN, "C0OTHER").await.ok());
    assert!(post_text(&c, &s, TOKEN, "U0ANA").await.ok());
    let r = post_text(&c, &s, TOKEN, "C0PUBLIC").await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(
        post_text(&c, &s, "xoxb-test-other-team", "C0PUBLIC")
            .await
            .ok()
    );
    assert_eq!(
        s.max_posts_in_window("C0GENERAL", Duration::from_secs(1)),
        1
    );
    assert_eq!(s.rate_limited_count(), 1);
}

// ---------------------------------------------------------------------------
// conversations.list / conversations.history / method rate limits / lifecycle
// ---------------------------------------------------------------------------

/// GET with the arguments in the query string and a Bearer token.
async fn get_query(
    c: &reqwest::Client,
    s: &FakeSlack,
    method: &str,
    token: &str,
    query: &[(&str, &str)],
) -> Resp {
    into_resp(
        c.get(reqwest::Url::parse_with_params(&s.method_url(method), query).expect("url"))
            .bearer_auth(token)
            .send()
            .await
            .expect("send"),
    )
    .await
}

fn ids(r: &Resp, key: &str) -> Vec<String> {
    r.body[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {}", r.raw))
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn next_cursor(r: &Resp) -> String {
    r.body["response_metadata"]["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no next_cursor in {}", r.raw))
        .to_string()
}

/// Follows `next_cursor` to the end; returns the ids and the number of pages.
async fn list_all(
    c: &reqwest::Client,
    s: &FakeSlack,
    token: &str,
    args: &[(&str, &str)],
) -> (Vec<String>, usize) {
    let mut all = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let mut form: Vec<(&str, &str)> = args.to_vec();
        if !cursor.is_empty() {
            form.push(("cursor", &cursor));
        }
        let r = post_form(c, s, "conversations.list", Some(token), &form).await;
        assert!(r.ok(), "{}", r.raw);
        pages += 1;
        all.extend(ids(&r, "channels"));
        cursor = next_cursor(&r);
        if cursor.is_empty() {
            return (all, pages);
        }
        assert!(pages < 100, "pagination does not end");
    }
}

fn history_ts(r: &Resp) -> Vec<String> {
    r.body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {}", r.raw))
        .iter()
        .map(|m| m["ts"].as_str().unwrap().to_string())
        .collect()
}

async fn history(c: &reqwest::Client, s: &FakeSlack, token: &str, args: &[(&str, &str)]) -> Resp {
    post_form(c, s, "conversations.history", Some(token), args).await
}

/// `team_id` is "required if token belongs to org-wide app"; a
/// workspace's token may name only its own workspace.
#[tokio::test]
async fn conversations_list_needs_team_id_from_an_org_wide_token() {
    let (s, c) = setup().await;
    s.add_token("xoxb-test-org", TokenSpec::bot(TEAM, BOT).org_wide());
    let list = |token: &'static str, args: &'static [(&'static str, &'static str)]| {
        post_form(&c, &s, "conversations.list", Some(token), args)
    };
    assert_eq!(
        list("xoxb-test-org", &[]).await.error(),
        Some("missing_argument")
    );
    assert!(list("xoxb-test-org", &[("team_id", TEAM)]).await.ok());
    assert!(list(TOKEN, &[]).await.ok());
    assert!(list(TOKEN, &[("team_id", TEAM)]).await.ok());
    assert_eq!(
        list(TOKEN, &[("team_id", "T0ELSEWHERE")]).await.error(),
        Some("team_access_not_granted")
    );
}

#[tokio::test]
async fn conversations_list_defaults_to_public_channels() {
    let (s, c) = setup().await;
    let r = post_form(&c, &s, "conversations.list", Some(TOKEN), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(
        ids(&r, "channels"),
        ["C0ARCHIVED", "C0GENERAL", "C0OTHER", "C0PUBLIC"]
    );
    assert_eq!(next_cursor(&r), "", "one page: empty next_cursor");
    let general = &r.body["channels"][1];
    assert_eq!(general["name"], "general");
    assert_eq!(general["name_normalized"], "general");
    assert_eq!(general["is_channel"], true);
    assert_eq!(general["is_group"], false);
    assert_eq!(general["is_im"], false);
    assert_eq!(general["is_private"], false);
    assert_eq!(general["is_archived"], false);
    assert_eq!(general["is_member"], true);
    assert_eq!(r.body["channels"][0]["is_archived"], true);
    assert_eq!(r.body["channels"][3]["is_member"], false);

    // query-string arguments (GET) work as well
    let r = get_query(
        &c,
        &s,
        "conversations.list",
        TOKEN,
        &[("types", "private_channel")],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(ids(&r, "channels"), ["G0PRIVMEM"]);
    assert_eq!(r.body["channels"][0]["is_private"], true);
    assert_eq!(r.body["channels"][0]["is_group"], true);
    assert_eq!(r.body["channels"][0]["is_channel"], false);

    // a JSON body is ignored, as for Slack's other read methods
    let r = post_json(
        &c,
        &s,
        "conversations.list",
        Some(TOKEN),
        json!({"types":"private_channel","limit":1}),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(ids(&r, "channels").len(), 4);
    assert!(!ids(&r, "channels").contains(&"G0PRIVMEM".to_string()));
}

#[tokio::test]
async fn conversations_list_types_scopes_and_private_membership() {
    let (s, c) = setup().await;
    let (cr, sr) = (&c, &s);
    let list = move |token: &'static str, types: &'static str| async move {
        post_form(
            cr,
            sr,
            "conversations.list",
            Some(token),
            &[("types", types)],
        )
        .await
    };
    let r = list(TOKEN, "public_channel,private_channel").await;
    let got = ids(&r, "channels");
    assert!(got.contains(&"G0PRIVMEM".to_string()), "{got:?}");
    assert!(!got.contains(&"G0PRIVATE".to_string()), "{got:?}");
    assert_eq!(got.len(), 5);

    let r = post_form(
        &c,
        &s,
        "conversations.list",
        Some(TOKEN),
        &[
            ("types", "public_channel,private_channel"),
            ("exclude_archived", "true"),
        ],
    )
    .await;
    assert!(!ids(&r, "channels").contains(&"C0ARCHIVED".to_string()));
    assert_eq!(ids(&r, "channels").len(), 4);

    assert_eq!(
        list(TOKEN, "public_channel,bogus").await.error(),
        Some("invalid_types")
    );

    s.add_token(
        "xoxb-test-public-only",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write", "channels:read"]),
    );
    s.add_token(
        "xoxb-test-noread",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write"]),
    );
    assert!(list("xoxb-test-public-only", "public_channel").await.ok());
    let r = list("xoxb-test-public-only", "public_channel,private_channel").await;
    assert_eq!(r.error(), Some("missing_scope"), "{}", r.raw);
    assert_eq!(r.body["needed"], "groups:read");
    assert_eq!(r.body["provided"], "chat:write,channels:read");
    let r = post_form(&c, &s, "conversations.list", Some("xoxb-test-noread"), &[]).await;
    assert_eq!(r.error(), Some("missing_scope"));
    assert_eq!(r.body["needed"], "channels:read");
    let r = list("xoxb-test-noread", "public_channel,private_channel").await;
    assert_eq!(r.body["needed"], "channels:read,groups:read");
    // DMs need im:read, which the default bot scopes do not have
    let r = list(TOKEN, "im").await;
    assert_eq!(r.error(), Some("missing_scope"));
    assert_eq!(r.body["needed"], "im:read");
    s.add_token(
        "xoxb-test-im",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["im:read"]),
    );
    let d = s.dm_channel_id("U0ANA");
    let r = list("xoxb-test-im", "im").await;
    assert_eq!(ids(&r, "channels"), [d]);
    assert_eq!(r.body["channels"][0]["is_im"], true);
    assert_eq!(r.body["channels"][0]["user"], "U0ANA");
}

#[tokio::test]
async fn conversations_list_paginates_with_opaque_cursors() {
    let (s, c) = setup().await;
    for i in 0..10 {
        s.add_channel(
            &format!("C1CH{i:02}"),
            &format!("ch-{i}"),
            ChannelSpec::member(),
        );
    }
    let mut expected: Vec<String> = ["C0ARCHIVED", "C0GENERAL", "C0OTHER", "C0PUBLIC"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..10).map(|i| format!("C1CH{i:02}")))
        .collect();
    expected.sort();

    // `limit` is honoured
    let (got, pages) = list_all(&c, &s, TOKEN, &[("limit", "4")]).await;
    assert_eq!(got, expected);
    assert_eq!(pages, 4);

    // the page cap forces small pages whatever the client asks
    s.set_list_page_cap(3);
    let (got, pages) = list_all(&c, &s, TOKEN, &[("limit", "1000")]).await;
    assert_eq!(got, expected);
    assert_eq!(pages, 5);
    let first = post_form(&c, &s, "conversations.list", Some(TOKEN), &[]).await;
    assert_eq!(ids(&first, "channels").len(), 3);
    let cursor = next_cursor(&first);
    assert!(!cursor.is_empty());
    assert!(
        cursor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "base64 cursor {cursor}"
    );

    // exclude_archived filters after the page is cut: a page may be short
    s.set_list_page_cap(1);
    let r = post_form(
        &c,
        &s,
        "conversations.list",
        Some(TOKEN),
        &[("exclude_archived", "true")],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert!(ids(&r, "channels").is_empty(), "{}", r.raw);
    assert!(!next_cursor(&r).is_empty());
    let (got, _) = list_all(&c, &s, TOKEN, &[("exclude_archived", "1")]).await;
    assert_eq!(got.len(), expected.len() - 1);
    s.clear_list_page_cap();
    let (_, pages) = list_all(&c, &s, TOKEN, &[]).await;
    assert_eq!(pages, 1);

    let bad = |args: &'static [(&'static str, &'static str)]| {
        post_form(&c, &s, "conversations.list", Some(TOKEN), args)
    };
    assert_eq!(
        bad(&[("cursor", "bm90IGEgY3Vyc29y")]).await.error(),
        Some("invalid_cursor")
    );
    assert_eq!(
        bad(&[("cursor", "%%%")]).await.error(),
        Some("invalid_cursor")
    );
    assert_eq!(
        bad(&[("limit", "1001")]).await.error(),
        Some("invalid_limit")
    );
    assert_eq!(
        bad(&[("limit", "ten")]).await.error(),
        Some("invalid_limit")
    );
    assert!(bad(&[("limit", "1000")]).await.ok());
    // a history cursor is not a list cursor
    for _ in 0..3 {
        assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    }
    let h = history(&c, &s, TOKEN, &[("channel", "C0GENERAL"), ("limit", "1")]).await;
    let hc = next_cursor(&h);
    let r = post_form(
        &c,
        &s,
        "conversations.list",
        Some(TOKEN),
        &[("cursor", &hc)],
    )
    .await;
    assert_eq!(r.error(), Some("invalid_cursor"));
}

#[tokio::test]
async fn conversations_history_takes_conversation_ids_only() {
    let (s, c) = setup().await;
    for ch in ["C0GENERAL", "C0ARCHIVED", "G0PRIVMEM", "U0ANA"] {
        if ch == "C0ARCHIVED" {
            s.unarchive_channel(ch);
        }
        assert!(post_text(&c, &s, TOKEN, ch).await.ok(), "post to {ch}");
    }
    s.archive_channel("C0ARCHIVED");
    let dm = s.dm_channel_id("U0ANA");
    s.add_channel("C0DOOMED", "doomed", ChannelSpec::member());
    assert!(post_text(&c, &s, TOKEN, "C0DOOMED").await.ok());
    s.delete_channel("C0DOOMED");
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("C0GENERAL", None),
        ("#general", Some("channel_not_found")),
        ("general", Some("channel_not_found")),
        ("C0PUBLIC", Some("not_in_channel")),
        ("#public-not-member", Some("channel_not_found")),
        ("C0ARCHIVED", None), // archived channels keep their history
        ("#old", Some("channel_not_found")),
        ("G0PRIVMEM", None),
        ("#secret-member", Some("channel_not_found")),
        ("G0PRIVATE", Some("channel_not_found")),
        ("#secret", Some("channel_not_found")),
        ("C0DOOMED", Some("channel_not_found")),
        ("C0NOPE", Some("channel_not_found")),
        ("U0ANA", Some("channel_not_found")),
        (dm.as_str(), None),
        ("", Some("channel_not_found")),
    ];
    for (channel, want) in cases {
        let r = history(&c, &s, TOKEN, &[("channel", channel)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.error(), want, "history of {channel:?}: {}", r.raw);
        if want.is_none() {
            assert_eq!(history_ts(&r).len(), 1, "{channel}: {}", r.raw);
            assert_eq!(r.body["has_more"], false);
        }
    }
    // the DM's history is the post addressed to the user id
    let r = history(&c, &s, TOKEN, &[("channel", &dm)]).await;
    assert_eq!(r.body["messages"][0]["text"], "hello");
    // a JSON body is ignored: the channel is then missing
    let r = post_json(
        &c,
        &s,
        "conversations.history",
        Some(TOKEN),
        json!({"channel":"C0GENERAL"}),
    )
    .await;
    assert_eq!(r.error(), Some("channel_not_found"));
    let r = get_query(
        &c,
        &s,
        "conversations.history",
        TOKEN,
        &[("channel", "C0GENERAL")],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
}

#[tokio::test]
async fn conversations_history_scopes_depend_on_the_conversation_type() {
    let (s, c) = setup().await;
    let dm = s.dm_channel_id("U0ANA");
    s.add_token(
        "xoxb-test-public-history",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["channels:history"]),
    );
    s.add_token(
        "xoxb-test-nohistory",
        TokenSpec::bot(TEAM, BOT).with_scopes(&["chat:write", "channels:read"]),
    );
    let cases = [
        ("xoxb-test-public-history", "C0GENERAL", None),
        (
            "xoxb-test-public-history",
            "G0PRIVMEM",
            Some("groups:history"),
        ),
        ("xoxb-test-public-history", dm.as_str(), Some("im:history")),
        ("xoxb-test-nohistory", "C0GENERAL", Some("channels:history")),
        ("xoxb-test-nohistory", "G0PRIVMEM", Some("groups:history")),
    ];
    for (token, channel, needed) in cases {
        let r = history(&c, &s, token, &[("channel", channel)]).await;
        match needed {
            None => assert!(r.ok(), "{token} {channel}: {}", r.raw),
            Some(n) => {
                assert_eq!(r.error(), Some("missing_scope"), "{token} {channel}");
                assert_eq!(r.body["needed"], n);
                assert!(r.body["provided"].is_string());
            }
        }
    }
    // a private channel the bot is not in does not exist for it, scopes or not
    let r = history(&c, &s, "xoxb-test-nohistory", &[("channel", "G0PRIVATE")]).await;
    assert_eq!(r.error(), Some("channel_not_found"));
}

#[tokio::test]
async fn conversations_history_is_newest_first_with_time_range_and_cursor() {
    let (s, c) = setup().await;
    let mut sent = Vec::new();
    for _ in 0..5 {
        let r = post_text(&c, &s, TOKEN, "C0GENERAL").await;
        sent.push(r.body["ts"].as_str().unwrap().to_string());
    }
    post_text(&c, &s, TOKEN, "C0OTHER").await;
    let newest_first: Vec<String> = sent.iter().rev().cloned().collect();

    let r = history(&c, &s, TOKEN, &[("channel", "C0GENERAL")]).await;
    assert_eq!(history_ts(&r), newest_first);
    assert_eq!(r.body["has_more"], false);
    assert!(
        r.body.get("response_metadata").is_none(),
        "no cursor on the last page: {}",
        r.raw
    );
    let m = &r.body["messages"][0];
    assert_eq!(m["type"], "message");
    assert_eq!(m["user"], BOT);
    assert_eq!(m["bot_id"], "B0BOT");
    assert_eq!(m["text"], "hello");

    // cursor pagination
    let mut got = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let mut args = vec![("channel", "C0GENERAL"), ("limit", "2")];
        if !cursor.is_empty() {
            args.push(("cursor", &cursor));
        }
        let r = history(&c, &s, TOKEN, &args).await;
        assert!(r.ok(), "{}", r.raw);
        pages += 1;
        got.extend(history_ts(&r));
        if r.body["has_more"] == true {
            cursor = next_cursor(&r);
            assert!(!cursor.is_empty());
        } else {
            break;
        }
    }
    assert_eq!(got, newest_first);
    assert_eq!(pages, 3);

    // oldest / latest are exclusive unless inclusive is set
    let r = history(
        &c,
        &s,
        TOKEN,
        &[("channel", "C0GENERAL"), ("oldest", &sent[1])],
    )
    .await;
    assert_eq!(history_ts(&r), newest_first[..3]);
    let r = history(
        &c,
        &s,
        TOKEN,
        &[
            ("channel", "C0GENERAL"),
            ("oldest", &sent[1]),
            ("inclusive", "true"),
        ],
    )
    .await;
    assert_eq!(history_ts(&r), newest_first[..4]);
    let r = history(
        &c,
        &s,
        TOKEN,
        &[
            ("channel", "C0GENERAL"),
            ("oldest", &sent[1]),
            ("latest", &sent[3]),
        ],
    )
    .await;
    assert_eq!(history_ts(&r), [sent[2].clone()]);
    assert_eq!(r.body["latest"], sent[3].as_str());
    let r = history(
        &c,
        &s,
        TOKEN,
        &[
            ("channel", "C0GENERAL"),
            ("oldest", &sent[1]),
            ("latest", &sent[3]),
            ("inclusive", "1"),
        ],
    )
    .await;
    assert_eq!(
        history_ts(&r),
        [&sent[1..4]].concat().into_iter().rev().collect::<Vec<_>>()
    );
    // oldest with limit: the newest messages of the range come first
    let r = history(
        &c,
        &s,
        TOKEN,
        &[("channel", "C0GENERAL"), ("oldest", "0"), ("limit", "1")],
    )
    .await;
    assert_eq!(history_ts(&r), [sent[4].clone()]);
    assert_eq!(r.body["has_more"], true);

    let (cr, sr) = (&c, &s);
    let err = move |args: Vec<(&'static str, &'static str)>| async move {
        history(cr, sr, TOKEN, &args).await
    };
    assert_eq!(
        err(vec![("channel", "C0GENERAL"), ("oldest", "yesterday")])
            .await
            .error(),
        Some("invalid_ts_oldest")
    );
    assert_eq!(
        err(vec![("channel", "C0GENERAL"), ("latest", "1.2.3")])
            .await
            .error(),
        Some("invalid_ts_latest")
    );
    assert_eq!(
        err(vec![("channel", "C0GENERAL"), ("cursor", "dGVhbTpDMDAx")])
            .await
            .error(),
        Some("invalid_cursor")
    );
    // limit above 999 is capped, not refused
    assert!(
        err(vec![("channel", "C0GENERAL"), ("limit", "5000")])
            .await
            .ok()
    );
}

#[tokio::test]
async fn conversations_history_metadata_only_with_include_all_metadata() {
    let (s, c) = setup().await;
    let metadata =
        json!({"event_type":"alert_router_notification","event_payload":{"event_id":"e1"}});
    let blocks = json!([{"type":"section","text":{"type":"mrkdwn","text":"*hi*"}}]);
    let r = post_json(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","text":"t","blocks":blocks,"metadata":metadata}),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    for (flag, want) in [
        (None, false),
        (Some("false"), false),
        (Some("0"), false),
        (Some("true"), true),
        (Some("1"), true),
    ] {
        let mut args = vec![("channel", "C0GENERAL")];
        if let Some(f) = flag {
            args.push(("include_all_metadata", f));
        }
        let r = history(&c, &s, TOKEN, &args).await;
        let m = &r.body["messages"][0];
        assert_eq!(m["blocks"], blocks, "{flag:?}");
        if want {
            assert_eq!(m["metadata"], metadata, "{flag:?}: {}", r.raw);
        } else {
            assert!(m.get("metadata").is_none(), "{flag:?}: {}", r.raw);
        }
    }
}

#[tokio::test]
async fn conversations_history_shows_parents_broadcasts_and_updates() {
    let (s, c) = setup().await;
    let parent = post_text(&c, &s, TOKEN, "C0GENERAL").await.body["ts"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = post_json(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","text":"in thread","thread_ts":parent}),
    )
    .await;
    assert!(reply.ok(), "{}", reply.raw);
    let broadcast = post_form(
        &c,
        &s,
        "chat.postMessage",
        Some(TOKEN),
        &[
            ("channel", "C0GENERAL"),
            ("text", "also in channel"),
            ("thread_ts", &parent),
            ("reply_broadcast", "true"),
        ],
    )
    .await;
    assert!(broadcast.ok(), "{}", broadcast.raw);
    let broadcast_ts = broadcast.body["ts"].as_str().unwrap().to_string();
    let up = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel":"C0GENERAL","ts":parent,"text":"resolved"}),
    )
    .await;
    assert!(up.ok(), "{}", up.raw);

    let r = history(&c, &s, TOKEN, &[("channel", "C0GENERAL")]).await;
    assert_eq!(history_ts(&r), [broadcast_ts.clone(), parent.clone()]);
    let b = &r.body["messages"][0];
    assert_eq!(b["subtype"], "thread_broadcast");
    assert_eq!(b["thread_ts"], parent.as_str());
    let p = &r.body["messages"][1];
    assert_eq!(p["text"], "resolved", "history shows the updated message");
    assert_eq!(p["thread_ts"], parent.as_str());
    assert_eq!(p["reply_count"], 2);
    assert_eq!(p["latest_reply"], broadcast_ts.as_str());
    assert_eq!(p["reply_users"], json!([BOT]));
}

#[tokio::test]
async fn conversations_replies_lists_a_thread_parent_first_then_replies_oldest_first() {
    let (s, c) = setup().await;
    let ts = |r: Resp| r.body["ts"].as_str().unwrap().to_string();
    let parent = ts(post_text(&c, &s, TOKEN, "C0GENERAL").await);
    let mut replies = Vec::new();
    for i in 0..3 {
        let reply = post_json(
            &c,
            &s,
            "chat.postMessage",
            Some(TOKEN),
            json!({"channel": "C0GENERAL", "text": format!("reply {i}"), "thread_ts": parent,
                   "metadata": {"event_type": "e", "event_payload": {"n": i}}}),
        )
        .await;
        assert!(reply.ok(), "{}", reply.raw);
        replies.push(ts(reply));
    }
    let replies_of = |args: Vec<(&'static str, String)>| {
        let (s, c) = (s.clone(), c.clone());
        async move {
            let args: Vec<(&str, &str)> = args.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(&c, &s, "conversations.replies", Some(TOKEN), &args).await
        }
    };
    let thread = |extra: Vec<(&'static str, String)>| {
        let mut args = vec![("channel", "C0GENERAL".to_string()), ("ts", parent.clone())];
        args.extend(extra);
        args
    };

    let r = replies_of(thread(vec![])).await;
    assert!(r.ok(), "{}", r.raw);
    let mut expected = vec![parent.clone()];
    expected.extend(replies.iter().cloned());
    assert_eq!(history_ts(&r), expected);
    assert_eq!(r.body["has_more"], false);
    assert_eq!(r.body["messages"][1]["thread_ts"], parent.as_str());
    assert!(r.body["messages"][1].get("subtype").is_none(), "{}", r.raw);
    assert!(
        r.body["messages"][1].get("metadata").is_none(),
        "metadata only when asked for"
    );
    let r = replies_of(thread(vec![("include_all_metadata", "true".into())])).await;
    assert_eq!(r.body["messages"][1]["metadata"]["event_payload"]["n"], 0);

    // A page at a time, then `oldest` (exclusive) bounds the replies.
    let r = replies_of(thread(vec![("limit", "2".into())])).await;
    assert_eq!(history_ts(&r), expected[..3]);
    assert_eq!(r.body["has_more"], true);
    let r = replies_of(thread(vec![
        ("limit", "2".into()),
        ("cursor", next_cursor(&r)),
    ]))
    .await;
    assert_eq!(history_ts(&r), [replies[2].clone()]);
    let r = replies_of(thread(vec![("oldest", replies[0].clone())])).await;
    assert_eq!(
        history_ts(&r),
        [parent.clone(), replies[1].clone(), replies[2].clone()]
    );

    // Only a message's own thread; not a reply's, not another channel's.
    let r = replies_of(vec![
        ("channel", "C0GENERAL".into()),
        ("ts", replies[0].clone()),
    ])
    .await;
    assert_eq!(r.error(), Some("thread_not_found"));
    let r = replies_of(vec![("channel", "C0OTHER".into()), ("ts", parent.clone())]).await;
    assert_eq!(r.error(), Some("thread_not_found"));
    let r = replies_of(vec![("channel", "C0PUBLIC".into()), ("ts", parent.clone())]).await;
    assert_eq!(r.error(), Some("not_in_channel"));
    // conversations.history still lists the parent alone.
    let r = history(&c, &s, TOKEN, &[("channel", "C0GENERAL")]).await;
    assert_eq!(history_ts(&r), std::slice::from_ref(&parent));
}

/// A person's reply under the app's message: the parent shows `thread_ts`
/// equal to its own `ts` in the history (as in Slack's `conversations.replies`
/// example), the reply is a person's message (`user`, no `bot_id`), and
/// neither shows in `posts()`.
#[tokio::test]
async fn a_persons_reply_makes_the_message_a_thread_parent() {
    let (s, c) = setup().await;
    let parent = post_text(&c, &s, TOKEN, "C0GENERAL").await.body["ts"]
        .as_str()
        .unwrap()
        .to_string();
    s.reply_as_person("C0GENERAL", &parent, "U0PERSON", "on it");
    assert_eq!(s.post_count(), 1, "a person's reply is not the app's post");

    let r = history(&c, &s, TOKEN, &[("channel", "C0GENERAL")]).await;
    assert_eq!(history_ts(&r), std::slice::from_ref(&parent));
    let p = &r.body["messages"][0];
    assert_eq!(p["thread_ts"], parent.as_str());
    assert_eq!(p["reply_count"], 1);
    assert_eq!(p["reply_users"], json!(["U0PERSON"]));

    let r = post_form(
        &c,
        &s,
        "conversations.replies",
        Some(TOKEN),
        &[("channel", "C0GENERAL"), ("ts", &parent)],
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    assert_eq!(r.body["messages"][0]["thread_ts"], parent.as_str());
    let reply = &r.body["messages"][1];
    assert_eq!(reply["user"], "U0PERSON");
    assert_eq!(reply["thread_ts"], parent.as_str());
    assert!(reply.get("bot_id").is_none(), "{}", r.raw);
}

#[tokio::test]
async fn method_rate_limit_is_per_team_and_method_with_retry_after() {
    let (s, c) = setup().await;
    s.add_token("xoxb-test-other-team", TokenSpec::bot("T0OTHER", "U0BOT2"));
    let list = |token: &'static str| post_form(&c, &s, "conversations.list", Some(token), &[]);
    // off by default
    for _ in 0..5 {
        assert!(list(TOKEN).await.ok());
    }
    // 1 per minute after a burst of 2: the third call cannot have earned a
    // token back unless a minute passed.
    s.set_method_rate_limit("conversations.list", 1, 2);
    assert!(list(TOKEN).await.ok());
    assert!(list(TOKEN).await.ok());
    let r = list(TOKEN).await;
    assert_eq!(r.status, 429, "{}", r.raw);
    assert_eq!(r.error(), Some("ratelimited"));
    let retry: u64 = r.headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // failed calls count too
    let r = post_form(
        &c,
        &s,
        "conversations.list",
        Some(TOKEN),
        &[("types", "bogus")],
    )
    .await;
    assert_eq!(r.status, 429);
    // another workspace and another method are independent
    assert!(list("xoxb-test-other-team").await.ok());
    assert!(
        history(&c, &s, TOKEN, &[("channel", "C0GENERAL")])
            .await
            .ok()
    );
    assert!(post_text(&c, &s, TOKEN, "C0GENERAL").await.ok());
    assert_eq!(s.rate_limited_count(), 2);
    let limited = s.requests_for("conversations.list");
    assert_eq!(limited.iter().filter(|r| r.status == Some(429)).count(), 2);
    s.clear_method_rate_limit("conversations.list");
    assert!(list(TOKEN).await.ok());
}

#[tokio::test]
async fn channel_lifecycle_rename_archive_unarchive_delete() {
    let (s, c) = setup().await;
    // rename: the id keeps working, the old name does not
    s.rename_channel("C0GENERAL", "#incidents");
    assert_eq!(
        post_text(&c, &s, TOKEN, "#general").await.error(),
        Some("channel_not_found")
    );
    let r = post_text(&c, &s, TOKEN, "#incidents").await;
    assert_eq!(r.body["channel"], "C0GENERAL");
    let l = post_form(&c, &s, "conversations.list", Some(TOKEN), &[]).await;
    let ch = l.body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "C0GENERAL")
        .unwrap()
        .clone();
    assert_eq!(ch["name"], "incidents");
    assert_eq!(ch["name_normalized"], "incidents");
    assert_eq!(ch["previous_names"], json!(["general"]));

    // archive / unarchive: a post is `is_archived`, an update of a message
    // there `is_inactive` ("a frozen, archived or deleted channel").
    let before = post_text(&c, &s, TOKEN, "C0OTHER").await.body["ts"]
        .as_str()
        .unwrap()
        .to_string();
    s.archive_channel("C0OTHER");
    assert_eq!(
        post_text(&c, &s, TOKEN, "C0OTHER").await.error(),
        Some("is_archived")
    );
    let update = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel": "C0OTHER", "ts": before, "text": "resolved"}),
    )
    .await;
    assert_eq!(update.error(), Some("is_inactive"));
    s.unarchive_channel("C0OTHER");
    let ts = post_text(&c, &s, TOKEN, "C0OTHER").await.body["ts"]
        .as_str()
        .unwrap()
        .to_string();
    let (listed, _) = list_all(&c, &s, TOKEN, &[("exclude_archived", "true")]).await;
    assert!(listed.contains(&"C0OTHER".to_string()));

    // delete: the id is gone everywhere
    s.delete_channel("C0OTHER");
    assert_eq!(
        post_text(&c, &s, TOKEN, "C0OTHER").await.error(),
        Some("channel_not_found")
    );
    assert_eq!(
        post_text(&c, &s, TOKEN, "#other").await.error(),
        Some("channel_not_found")
    );
    assert_eq!(
        history(&c, &s, TOKEN, &[("channel", "C0OTHER")])
            .await
            .error(),
        Some("channel_not_found")
    );
    let up = post_json(
        &c,
        &s,
        "chat.update",
        Some(TOKEN),
        json!({"channel":"C0OTHER","ts":ts,"text":"x"}),
    )
    .await;
    assert_eq!(up.error(), Some("channel_not_found"));
    let join = post_json(
        &c,
        &s,
        "conversations.join",
        Some(TOKEN),
        json!({"channel":"C0OTHER"}),
    )
    .await;
    assert_eq!(join.error(), Some("channel_not_found"));
    let (listed, _) = list_all(&c, &s, TOKEN, &[]).await;
    assert!(!listed.contains(&"C0OTHER".to_string()));

    // a private channel appears in list and history once the bot is a member
    s.set_channel("G0PRIVATE", ChannelSpec::private(true));
    let (listed, _) = list_all(&c, &s, TOKEN, &[("types", "private_channel")]).await;
    assert_eq!(listed, ["G0PRIVATE", "G0PRIVMEM"]);
    assert!(
        history(&c, &s, TOKEN, &[("channel", "G0PRIVATE")])
            .await
            .ok()
    );
}

async fn exchange(
    c: &reqwest::Client,
    s: &FakeSlack,
    id: &str,
    secret: &str,
    code: &str,
    redirect_uri: &str,
) -> Resp {
    post_form(
        c,
        s,
        "oauth.v2.access",
        None,
        &[
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", id),
            ("client_secret", secret),
        ],
    )
    .await
}

const REDIRECT: &str = "https://alerts.example.com/slack/oauth/callback";

#[tokio::test]
async fn an_authorization_code_is_exchanged_once_for_a_bot_token_shaped_as_slack_documents() {
    let (s, c) = setup().await;
    s.set_oauth_client("123.456", "shh");
    let code = s.authorization_code("T0NEW", REDIRECT);

    let r = exchange(&c, &s, "123.456", "shh", &code, REDIRECT).await;
    assert!(r.ok(), "{}", r.raw);
    let access = r.body["access_token"].as_str().unwrap().to_string();
    assert!(access.starts_with("xoxb-"), "{access}");
    assert_eq!(r.body["token_type"], "bot");
    assert_eq!(r.body["scope"], DEFAULT_BOT_SCOPES.join(","));
    assert!(r.body["bot_user_id"].as_str().unwrap().starts_with('U'));
    assert!(r.body["app_id"].as_str().unwrap().starts_with('A'));
    assert_eq!(r.body["team"]["id"], "T0NEW");
    assert!(r.body["team"]["name"].is_string());
    assert!(r.body["enterprise"].is_null());
    assert_eq!(r.body["is_enterprise_install"], false);
    assert!(r.body["authed_user"]["id"].is_string());
    assert!(
        r.body.get("refresh_token").is_none() && r.body.get("expires_in").is_none(),
        "no rotation: the token does not expire: {}",
        r.raw
    );
    // The token works, for its workspace.
    let t = post_form(&c, &s, "auth.test", Some(&access), &[]).await;
    assert!(t.ok(), "{}", t.raw);
    assert_eq!(t.body["team_id"], "T0NEW");
    let installs = s.installs();
    assert_eq!(installs.len(), 1);
    assert_eq!(installs[0].access_token, access);
    assert_eq!(installs[0].code, code);

    // Once only.
    let again = exchange(&c, &s, "123.456", "shh", &code, REDIRECT).await;
    assert_eq!(again.error(), Some("invalid_code"), "{}", again.raw);
    assert_eq!(s.installs().len(), 1);
    // A code never issued, and none at all.
    assert_eq!(
        exchange(&c, &s, "123.456", "shh", "1.nope", REDIRECT)
            .await
            .error(),
        Some("invalid_code")
    );
    let r = post_form(
        &c,
        &s,
        "oauth.v2.access",
        None,
        &[("client_id", "123.456"), ("client_secret", "shh")],
    )
    .await;
    assert_eq!(r.error(), Some("invalid_code"));
}

#[tokio::test]
async fn a_code_exchange_checks_the_client_and_the_redirect_uri() {
    let (s, c) = setup().await;
    s.set_oauth_client("123.456", "shh");
    let code = s.authorization_code("T0NEW", REDIRECT);
    assert_eq!(
        exchange(&c, &s, "999.999", "shh", &code, REDIRECT)
            .await
            .error(),
        Some("invalid_client_id")
    );
    assert_eq!(
        exchange(&c, &s, "123.456", "wrong", &code, REDIRECT)
            .await
            .error(),
        Some("bad_client_secret")
    );
    assert_eq!(
        exchange(
            &c,
            &s,
            "123.456",
            "shh",
            &code,
            "https://evil.example/slack/oauth/callback"
        )
        .await
        .error(),
        Some("bad_redirect_uri")
    );
    let r = post_form(
        &c,
        &s,
        "oauth.v2.access",
        None,
        &[
            ("code", &code),
            ("client_id", "123.456"),
            ("client_secret", "shh"),
        ],
    )
    .await;
    assert_eq!(
        r.error(),
        Some("bad_redirect_uri"),
        "it was sent at authorize time"
    );
    // Refused attempts did not spend the code; HTTP Basic and an explicit grant_type work too.
    let r = into_resp(
        c.post(s.method_url("oauth.v2.access"))
            .basic_auth("123.456", Some("shh"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
}

#[tokio::test]
async fn with_rotation_on_an_install_mints_an_expiring_token_and_a_refresh_token_that_works() {
    let (s, c) = setup().await;
    s.set_oauth_client("123.456", "shh");
    s.set_token_rotation(true);
    let code = s.authorization_code("T0NEW", REDIRECT);
    let r = exchange(&c, &s, "123.456", "shh", &code, REDIRECT).await;
    assert!(r.ok(), "{}", r.raw);
    let access = r.body["access_token"].as_str().unwrap();
    assert!(access.starts_with("xoxe.xoxb-"), "{access}");
    assert_eq!(r.body["expires_in"], ACCESS_TOKEN_EXPIRES_IN);
    let refresh_token = r.body["refresh_token"].as_str().unwrap();
    assert!(refresh_token.starts_with("xoxe-1-"), "{refresh_token}");
    assert!(post_form(&c, &s, "auth.test", Some(access), &[]).await.ok());
    let refreshed = refresh(&c, &s, "123.456", "shh", refresh_token).await;
    assert!(refreshed.ok(), "{}", refreshed.raw);
    assert_eq!(refreshed.body["team"]["id"], "T0NEW");
}

#[tokio::test]
async fn the_consent_page_sends_the_browser_back_with_a_code_or_access_denied() {
    let (s, _) = setup().await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    s.set_oauth_client("123.456", "shh");
    let visit = |client_id: &str, scope: &str| {
        let mut url = url::Url::parse(&s.authorize_url()).unwrap();
        url.query_pairs_mut()
            .append_pair("client_id", client_id)
            .append_pair("scope", scope)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("state", "s-1");
        c.get(url).send()
    };
    let r = visit("123.456", "chat:write,im:write").await.unwrap();
    assert_eq!(r.status(), 400, "no one signed in yet");

    s.approve_installs_as("T0NEW", "New Team");
    let r = visit("999.999", "chat:write").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid_client_id"));
    let r = visit("123.456", "").await.unwrap();
    assert_eq!(r.status(), 400, "no scopes");

    let r = visit("123.456", "chat:write,im:write").await.unwrap();
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert!(back.as_str().starts_with(REDIRECT), "{back}");
    let query: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
    assert_eq!(query["state"], "s-1");
    let granted = exchange(&c, &s, "123.456", "shh", &query["code"], REDIRECT).await;
    assert!(granted.ok(), "{}", granted.raw);
    assert_eq!(
        granted.body["scope"], "chat:write,im:write",
        "what was asked"
    );
    assert_eq!(granted.body["team"]["name"], "New Team");
    assert_eq!(s.authorize_requests().len(), 4);

    s.deny_installs();
    let r = visit("123.456", "chat:write").await.unwrap();
    assert_eq!(r.status(), 302);
    let back = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let query: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
    assert_eq!(
        query.get("error").map(String::as_str),
        Some("access_denied")
    );
    assert_eq!(query["state"], "s-1");
    assert!(!query.contains_key("code"));
}

// The worked example in Slack's "Verifying requests from Slack".
const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";

#[test]
fn clicks_are_signed_as_in_slacks_worked_example() {
    assert_eq!(
        slack_signature(DOC_SECRET, "1531420618", DOC_BODY),
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    );
}

#[tokio::test]
async fn a_click_is_a_signed_form_post_of_a_block_actions_payload_with_the_whole_message() {
    let (slack, c) = setup().await;
    let value = r#"{"w":"T0TEST","k":"chk-1"}"#;
    let blocks = json!([
        {"type": "section", "text": {"type": "mrkdwn", "text": "Checkout down"}},
        {"type": "actions", "elements": [
            {"type": "button", "action_id": "alert_router_ack", "text": {"type": "plain_text", "text": "Acknowledge"}, "value": value},
            {"type": "button", "action_id": "open", "text": {"type": "plain_text", "text": "Open"}, "url": "https://example.com/t/1"},
        ]},
    ]);
    let r = post_json(
        &c,
        &slack,
        "chat.postMessage",
        Some(TOKEN),
        json!({"channel": "C0GENERAL", "text": "Checkout down", "blocks": blocks}),
    )
    .await;
    assert!(r.ok(), "{}", r.raw);
    let post = slack.posts().pop().unwrap();
    assert_eq!(
        button_value(&post, "alert_router_ack").as_deref(),
        Some(value)
    );
    assert_eq!(button_value(&post, "missing"), None);
    assert!(Click::on_post(&post, "missing", "U0ANA").is_none());

    let click = Click::on_post(&post, "alert_router_ack", "U0ANA").unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signed = slack.click(&click, "the-signing-secret");
    let at: i64 = signed.timestamp.parse().unwrap();
    assert!((at - before).abs() <= 1, "now: {at} vs {before}");
    assert_eq!(
        signed.signature,
        slack_signature("the-signing-secret", &signed.timestamp, &signed.body)
    );

    // One form field, `payload`, holding JSON whose slashes are escaped as Slack's are.
    let fields: Vec<(String, String)> = url::form_urlencoded::parse(signed.body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].0, "payload");
    assert!(
        fields[0].1.contains(r"http:\/\/127.0.0.1"),
        "{}",
        fields[0].1
    );
    let payload: Value = serde_json::from_str(&fields[0].1).unwrap();
    assert_eq!(payload, signed.payload);
    assert_eq!(payload["type"], "block_actions");
    assert_eq!(payload["user"]["id"], "U0ANA");
    assert_eq!(payload["user"]["team_id"], TEAM);
    assert_eq!(payload["team"]["id"], TEAM);
    assert_eq!(payload["container"]["type"], "message");
    assert_eq!(payload["container"]["channel_id"], "C0GENERAL");
    assert_eq!(payload["container"]["message_ts"], post.ts.as_str());
    assert_eq!(payload["message"]["ts"], post.ts.as_str());
    assert_eq!(payload["message"]["blocks"], blocks);
    assert_eq!(payload["actions"][0]["type"], "button");
    assert_eq!(payload["actions"][0]["action_id"], "alert_router_ack");
    assert_eq!(payload["actions"][0]["value"], value);
    assert!(payload["trigger_id"].as_str().unwrap().contains('.'));
    assert_eq!(payload["response_url"], signed.response_url.as_str());
    assert!(
        signed
            .response_url
            .starts_with(&format!("{}/actions/{TEAM}/", slack.base_url()))
    );
    let again = slack.click(&click, "the-signing-secret");
    assert_ne!(again.response_url, signed.response_url, "one per click");

    let old = slack.click_at(&click, "the-signing-secret", 1_700_000_000);
    assert_eq!(old.timestamp, "1700000000");
    assert_eq!(
        old.signature,
        slack_signature("the-signing-secret", "1700000000", &old.body)
    );
}

#[tokio::test]
async fn a_response_url_takes_json_messages_and_records_them() {
    let (slack, c) = setup().await;
    let signed = slack.click(
        &Click::new(TEAM, "U0ANA", "alert_router_ack", "v"),
        "secret",
    );
    let message = json!({"response_type": "ephemeral", "replace_original": false, "text": "Done."});
    let r = c
        .post(&signed.response_url)
        .json(&message)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let responses = slack.wait_for_responses(1, WAIT).await.unwrap();
    assert_eq!(responses[0].text(), "Done.");
    assert!(responses[0].is_ephemeral());
    assert!(signed.response_url.ends_with(&responses[0].path));
    assert_eq!(
        responses[0].content_type.as_deref(),
        Some("application/json")
    );

    let r = c
        .post(&signed.response_url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("text=hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), "invalid_payload");

    let r = c
        .post(format!(
            "{}/actions/{TEAM}/1/never-issued",
            slack.base_url()
        ))
        .json(&message)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "no_service");
    assert_eq!(
        slack.responses().len(),
        2,
        "a URL no click had is not recorded"
    );
}
