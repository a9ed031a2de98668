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
