//! Several replicas on shared hot channels with one killed mid-burst, replicas sharing one
//! channel listing, and the crash window between Slack accepting a post and its worker
//! recording it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use alert_router::config::{Secret, SlackSettings};
use alert_router::deliver::limit::RateLimiter;
use alert_router::deliver::slack::SlackClient;
use alert_router::deliver::slack::channels::{ChannelDirectory, Resolution};
use alert_router::deliver::slack::tokens::WorkspaceToken;
use alert_router::worker::redis_connection;
use serde_json::json;
use support::fake_slack::{ChannelSpec, Fault, RecordedPost};
use support::{BASIC_RULES, ESCALATIONS, TestEnv, WAIT};

/// Channels by name and by id, DMs by id, by email and to the assignee, a
/// private channel, an archived one (→ the default channel).
const MIXED: &str = r##"version: 1
defaults:
  slack_channel: "#escalations"
  email: ["oncall@example.com"]
rules:
  - name: team-a
    matchers: ['team="a"']
    notify:
      - slack_channel: "#hot-a"
      - slack_user: U0ANA
  - name: team-b
    matchers: ['team="b"']
    notify:
      - slack_channel: C0HOTB
      - slack_email: bo@example.com
  - name: team-c
    matchers: ['team="c"']
    notify:
      - slack_channel: "secret"
      - slack_channel: "#old-news"
      - assignee
"##;

/// (event id, conversation id) of every post.
fn deliveries(posts: &[RecordedPost]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for post in posts {
        let id = post.metadata.as_ref().expect("metadata")["event_payload"]["event_id"]
            .as_str()
            .expect("event_id")
            .to_string();
        *counts.entry((id, post.channel_id.clone())).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn three_replicas_one_killed_mid_burst_deliver_every_destination_once_to_its_place() {
    let mut env = TestEnv::start(MIXED).await;
    // Slack's limits, in Slack and in the worker alike.
    let defaults = SlackSettings::default();
    env.settings.slack.channel_rate_per_second = defaults.channel_rate_per_second;
    env.settings.slack.channel_burst = defaults.channel_burst;
    env.settings.slack.workspace_rate_per_minute = defaults.workspace_rate_per_minute;
    env.settings.slack.workspace_burst = defaults.workspace_burst;
    env.slack.set_channel_rate_limit(1.0, 3);
    // A dead replica's claims free quickly.
    env.settings.delivery.claim_lease = Duration::from_secs(2);
    env.settings.delivery.retry_delays = vec![Duration::from_millis(500); 5];

    env.slack
        .add_channel("C0HOTA", "hot-a", ChannelSpec::member());
    env.slack
        .add_channel("C0HOTB", "hot-b", ChannelSpec::member());
    env.slack
        .add_channel("G0SECRET", "secret", ChannelSpec::private(true));
    env.slack
        .add_channel("C0OLDNEWS", "old-news", ChannelSpec::archived());
    env.slack.add_user("U0ANA", "ana@example.com");
    env.slack.add_user("U0BO", "bo@example.com");
    env.slack.add_user("U0CY", "cy@example.com");

    let started = std::time::Instant::now();
    let mut workers = vec![
        env.start_worker_process(),
        env.start_worker_process(),
        env.start_worker_process(),
    ];
    let events_per_team = 8;
    let mut expected = BTreeSet::new();
    for i in 0..events_per_team * 3 {
        let id = format!("mixed-{i}");
        let (team, destinations) = match i % 3 {
            0 => (
                "a",
                vec!["C0HOTA".to_string(), env.slack.dm_channel_id("U0ANA")],
            ),
            1 => (
                "b",
                vec!["C0HOTB".to_string(), env.slack.dm_channel_id("U0BO")],
            ),
            _ => (
                "c",
                vec![
                    "G0SECRET".to_string(),
                    ESCALATIONS.to_string(),
                    env.slack.dm_channel_id("U0CY"),
                ],
            ),
        };
        for destination in destinations {
            expected.insert((id.clone(), destination));
        }
        let event = env.event(
            &id,
            json!({
                "title": "Checkout down <!channel> <@U0BOSS> <!subteam^S0ALL>",
                "summary": "ping <!here> and <!everyone>",
                "labels": {"team": team},
                "assignee": {"name": "Cy", "email": "cy@example.com"},
            }),
        );
        env.publish(&event).await;
    }

    // Kill one replica mid-burst, with its deliveries in flight.
    env.slack
        .wait_for_posts(expected.len() / 4, WAIT)
        .await
        .unwrap();
    workers[0].child.kill().await.unwrap();
    let survivors = workers.split_off(1);

    env.slack
        .wait_for_posts(expected.len(), Duration::from_secs(120))
        .await
        .unwrap();
    for worker in survivors {
        assert!(worker.stop().await.success());
    }

    let posts = env.slack.posts();
    let delivered = deliveries(&posts);
    let duplicates: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "posted twice: {duplicates:?}");
    let places: BTreeSet<_> = delivered.keys().cloned().collect();
    assert_eq!(places, expected, "every destination at its intended place");
    // The archived channel's posts say where they were meant to go.
    for post in posts.iter().filter(|p| p.channel_id == ESCALATIONS) {
        let blocks = post.blocks.as_ref().expect("blocks").to_string();
        assert!(blocks.contains("old-news"), "{blocks}");
    }
    for post in &posts {
        let shown = format!(
            "{} {}",
            post.text.as_deref().unwrap_or_default(),
            post.blocks
                .as_ref()
                .map(|b| b.to_string())
                .unwrap_or_default()
        );
        for live in [
            "<!channel>",
            "<@U0BOSS>",
            "<!subteam^",
            "<!here>",
            "<!everyone>",
        ] {
            assert!(!shown.contains(live), "a live mention {live} in {shown}");
        }
    }
    assert_eq!(env.slack.rate_limited_count(), 0, "no 429 from Slack");
    // One listing serves every replica; a name it lacks (the archived
    // channel) lists again at most every 15 s.
    let listings = env.slack.requests_for("conversations.list").len();
    let allowed = 1 + (started.elapsed().as_secs() / 15) as usize;
    assert!(
        (1..=allowed).contains(&listings),
        "{listings} listings in {:?}",
        started.elapsed()
    );
    for channel in ["C0HOTA", "C0HOTB", "G0SECRET", ESCALATIONS] {
        assert!(
            env.slack
                .max_posts_in_window(channel, Duration::from_millis(999))
                <= 3,
            "{channel} over its limit"
        );
    }
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0,
        "no valid event dead-lettered"
    );
    assert!(env.smtp.mails().is_empty(), "nothing fell back to email");
    env.cleanup().await;
}

/// A replica whose Redis commands cross the network slowly: a loopback
/// relay to the real Redis that holds back any command naming `held` until
/// the test lets it through.
struct SlowRedisPath {
    url: String,
    holding: tokio::sync::watch::Receiver<bool>,
    release: tokio::sync::watch::Sender<bool>,
}

impl SlowRedisPath {
    async fn start(redis_port: u16, held: &'static [u8]) -> SlowRedisPath {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let (holding_tx, holding) = tokio::sync::watch::channel(false);
        let (release, release_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
                    .await
                    .unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let holding_tx = holding_tx.clone();
                let mut release_rx = release_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.windows(held.len()).any(|w| w == held) {
                            let _ = holding_tx.send(true);
                            let _ = release_rx.wait_for(|released| *released).await;
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowRedisPath {
            url,
            holding,
            release,
        }
    }
}

fn channel_directory(settings: &alert_router::config::Settings) -> ChannelDirectory {
    let redis = redis_connection(settings).expect("redis settings");
    let slack = SlackClient::new(&settings.slack).expect("http client");
    let limiter = RateLimiter::new(redis.clone(), &settings.redis.key_prefix, &settings.slack);
    ChannelDirectory::new(
        redis,
        &settings.redis.key_prefix,
        slack,
        limiter,
        settings.slack.channel_cache_ttl,
        1000,
    )
}

/// Replicas that miss a channel name together share one `conversations.list`
/// (Tier 2, about 20 a minute), even when one of them reaches for the listing
/// lock only after a peer has listed, stored the map and let go of the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_locks_after_a_peer_listed_uses_that_listing() {
    let env = TestEnv::start(BASIC_RULES).await;
    let token = WorkspaceToken {
        workspace: env.workspace.clone(),
        access_token: Secret::new(&env.token),
        expires_at: None,
        source: "redis",
        rotating: false,
    };
    let mut late_settings = env.settings.clone();
    let redis_port = env
        .settings
        .redis
        .url
        .expose()
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .expect("the tests' Redis URL ends in its port");
    let mut path = SlowRedisPath::start(redis_port, b"channels-lock").await;
    late_settings.redis.url = path.url.as_str().into();
    let late = std::sync::Arc::new(channel_directory(&late_settings));
    let prompt = channel_directory(&env.settings);

    // The late replica misses the name and is on its way to the lock.
    let late_resolve = {
        let (late, token) = (late.clone(), token.clone());
        tokio::spawn(async move { late.resolve(&token, "escalations").await })
    };
    path.holding.wait_for(|holding| *holding).await.unwrap();
    // Meanwhile a peer lists the workspace and lets go of the lock.
    let found = prompt.resolve(&token, "escalations").await.unwrap();
    assert_eq!(found, Resolution::Id(ESCALATIONS.to_string()));
    assert_eq!(env.slack.requests_for("conversations.list").len(), 1);

    path.release.send(true).unwrap();
    let found = late_resolve.await.unwrap().unwrap();
    assert_eq!(found, Resolution::Id(ESCALATIONS.to_string()));
    assert_eq!(
        env.slack.requests_for("conversations.list").len(),
        1,
        "the late replica used its peer's listing"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_post_slack_accepted_just_before_its_worker_died_is_found_and_not_sent_again() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    // The first worker waits for Slack's answer until it is killed.
    env.settings.slack.request_timeout = Duration::from_secs(60);
    env.slack.fail_channel(ESCALATIONS, Fault::AcceptThenHang);
    let first = env.start_worker_process();

    env.publish(&env.event("accepted-then-killed", json!({})))
        .await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    let mut first = first;
    first.child.kill().await.unwrap();
    env.slack.clear_faults();

    let mut second = env.start_worker_process();
    second.wait_for_log("had posted this", 1).await;
    assert!(second.stop().await.success());

    let history = env.slack.requests_for("conversations.history");
    assert_eq!(history.len(), 1, "looked once");
    assert_eq!(history[0].params["channel"], ESCALATIONS);
    assert_eq!(env.slack.posts().len(), 1, "not posted again");
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_lost_post_check_slack_keeps_rate_limiting_gives_way_to_the_post_after_the_deferral_limit()
 {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    env.settings.slack.request_timeout = Duration::from_secs(60);
    env.settings.delivery.max_rate_limit_deferral = Duration::from_secs(1);
    env.settings.slack.max_rate_limit_wait = Duration::from_secs(1);
    env.slack.fail_channel(ESCALATIONS, Fault::Hang);
    let mut first = env.start_worker_process();

    env.publish(&env.event("killed-then-unverifiable", json!({})))
        .await;
    env.slack
        .wait_for_requests("chat.postMessage", 1, WAIT)
        .await
        .unwrap();
    first.child.kill().await.unwrap();
    env.slack.clear_faults();
    // The history check never gets through: Slack's allowance for it
    // (one call a minute for many apps) is spent.
    env.slack.fail_next(
        "conversations.history",
        1000,
        Fault::RateLimited {
            retry_after_secs: 3,
        },
    );

    let mut second = env.start_worker_process();
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    second
        .wait_for_log("cannot check whether a crashed worker had posted this", 1)
        .await;
    assert!(second.stop().await.success());

    assert!(
        !env.slack.requests_for("conversations.history").is_empty(),
        "it tried to look first"
    );
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    assert_eq!(
        env.ready_count(&env.settings.amqp.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_before_slack_took_its_post_leaves_the_post_to_the_next_one() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    env.settings.slack.request_timeout = Duration::from_secs(60);
    // Slack never sees the post: the request hangs before it is processed.
    env.slack.fail_channel(ESCALATIONS, Fault::Hang);
    let mut first = env.start_worker_process();

    env.publish(&env.event("killed-before", json!({}))).await;
    env.slack
        .wait_for_requests("chat.postMessage", 1, WAIT)
        .await
        .unwrap();
    first.child.kill().await.unwrap();
    env.slack.clear_faults();

    let second = env.start_worker_process();
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    assert!(second.stop().await.success());

    assert_eq!(
        env.slack.requests_for("conversations.history").len(),
        1,
        "looked first, found nothing"
    );
    assert_eq!(env.slack.posts().len(), 1);
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_rerouted_post_accepted_before_its_worker_died_is_found_in_the_default_channel() {
    let mut env = TestEnv::start(
        r#"version: 1
defaults:
  slack_channel: C0ESCALATE
rules:
  - name: old
    matchers: ['team="old"']
    notify: [{slack_channel: C0OLDNEWS}]
"#,
    )
    .await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    env.settings.slack.request_timeout = Duration::from_secs(60);
    env.slack
        .add_channel("C0OLDNEWS", "old-news", ChannelSpec::archived());
    // The reroute to the default channel is accepted, and its answer lost.
    env.slack.fail_channel(ESCALATIONS, Fault::AcceptThenHang);
    let mut first = env.start_worker_process();

    env.publish(&env.event("rerouted-then-killed", json!({"labels": {"team": "old"}})))
        .await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    first.child.kill().await.unwrap();
    env.slack.clear_faults();

    let mut second = env.start_worker_process();
    second.wait_for_log("had posted this", 1).await;
    assert!(second.stop().await.success());

    let history = env.slack.requests_for("conversations.history");
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0].params["channel"], ESCALATIONS,
        "looked where it went"
    );
    assert_eq!(env.slack.posts().len(), 1, "not posted again");
    env.cleanup().await;
}

/// Messages another app posts after the crash: more than one page of history.
const CHATTER: usize = 1200;

#[tokio::test]
async fn a_lost_post_under_more_than_a_page_of_newer_messages_is_still_found() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    env.settings.slack.request_timeout = Duration::from_secs(60);
    env.slack.fail_channel(ESCALATIONS, Fault::AcceptThenHang);
    let mut first = env.start_worker_process();

    env.publish(&env.event("buried", json!({}))).await;
    env.slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();
    first.child.kill().await.unwrap();
    env.slack.clear_faults();
    // A busy channel: another app posts more than the largest page of
    // history Slack returns (999, newest first) before anyone looks.
    let other_app = format!("xox{}-other-app-{}", "b", env.id);
    env.slack
        .add_bot_token(&other_app, &env.workspace, "U0OTHERAPP");
    let client = reqwest::Client::new();
    for i in 0..CHATTER {
        let answer: serde_json::Value = client
            .post(env.slack.method_url("chat.postMessage"))
            .bearer_auth(&other_app)
            .form(&[("channel", ESCALATIONS), ("text", &format!("chatter {i}"))])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
    }

    let mut second = env.start_worker_process();
    second.wait_for_log("had posted this", 1).await;
    assert!(second.stop().await.success());
    assert_eq!(
        env.slack.posts_to(ESCALATIONS).len(),
        1 + CHATTER,
        "not posted again"
    );
    // The workspace's Tier 3 budget (50 calls a minute) is spent sparingly:
    // one page of at most 999 messages, then the next.
    assert_eq!(
        env.slack.request_count("conversations.history"),
        2,
        "two pages"
    );
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_thread_reply_slack_accepted_just_before_its_worker_died_is_found_and_not_sent_again() {
    let mut env = TestEnv::start(BASIC_RULES).await;
    env.settings.delivery.claim_lease = Duration::from_secs(1);
    env.settings.slack.request_timeout = Duration::from_secs(60);
    let incident = json!({"dedup_key": "checkout-down"});
    let mut first = env.start_worker_process();
    env.publish(&env.event("opened", incident.clone())).await;
    let opened = env
        .slack
        .wait_for_posts_to(ESCALATIONS, 1, WAIT)
        .await
        .unwrap();

    // The follow-up replies in the incident's thread; Slack takes the reply
    // and its worker dies before hearing back.
    env.slack.fail_channel(ESCALATIONS, Fault::AcceptThenHang);
    env.publish(&env.event("follow-up", incident)).await;
    let posts = env
        .slack
        .wait_for_posts_to(ESCALATIONS, 2, WAIT)
        .await
        .unwrap();
    assert_eq!(
        posts[1].thread_ts.as_deref(),
        Some(opened[0].ts.as_str()),
        "a reply in the thread, which conversations.history does not list"
    );
    first.child.kill().await.unwrap();
    env.slack.clear_faults();

    let mut second = env.start_worker_process();
    second.wait_for_log("had posted this", 1).await;
    assert!(second.stop().await.success());
    assert_eq!(env.slack.posts().len(), 2, "not posted again");
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}
