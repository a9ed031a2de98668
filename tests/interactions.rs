//! The Acknowledge button end to end: clicks signed as Slack signs them, to
//! `/slack/interactions` on a worker process; the incident in the real
//! Redis; `escalation.acknowledged` on a queue the test binds to the real
//! exchange, as a producer would; the clicker's answer at the fake Slack's
//! `response_url`. Refused requests change nothing.

mod support;

use std::time::{Duration, Instant};

use alert_router::deliver::incident::Incidents;
use alert_router::deliver::slack::message::AckButtonValue;
use alert_router::event::{Event, IncidentState};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use support::fake_slack::{Click, SignedClick, slack_signature};
use support::{BASIC_RULES, ESCALATIONS, TestEnv, WAIT, WorkerProcess};

const SECRET: &str = "interactions-test-signing-secret";
const ACK_ACTION: &str = "alert_router_ack";
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// A worker serving `/slack/interactions`, and a client to send clicks with.
struct Endpoint {
    worker: WorkerProcess,
    base: String,
    http: reqwest::Client,
}

impl Endpoint {
    /// Starts a worker process; `secret` is its `SLACK_SIGNING_SECRET`.
    async fn start(env: &TestEnv, secret: Option<&str>) -> Endpoint {
        // A free port (released just before the worker binds it).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut vars = vec![("ALERT_ROUTER__HTTP__LISTEN", listen.as_str())];
        if let Some(secret) = secret {
            vars.push(("SLACK_SIGNING_SECRET", secret));
        }
        let mut worker = env.start_worker_process_with(&vars);
        // Logged once the HTTP listener is bound.
        worker.wait_for_log("consuming", 1).await;
        Endpoint {
            worker,
            base: format!("http://{listen}"),
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("{}/slack/interactions", self.base)
    }

    /// Sends a click; its status and body, and how long the answer took.
    async fn send(&self, click: &SignedClick) -> (u16, String, Duration) {
        let started = Instant::now();
        let r = click.request(&self.http, &self.url()).send().await.unwrap();
        let took = started.elapsed();
        (r.status().as_u16(), r.text().await.unwrap(), took)
    }

    /// Posts `body` with exactly `headers`.
    async fn send_raw(&self, headers: &[(&str, &str)], body: &str) -> u16 {
        let mut request = self
            .http
            .post(self.url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap().status().as_u16()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the worker and returns everything it logged.
    async fn stop(self) -> String {
        let lines = self.worker.log_lines().join("\n");
        assert!(self.worker.stop().await.success());
        lines
    }
}

/// A queue bound to the test's exchange for `escalation.acknowledged`, as a
/// producer would bind one to learn of acknowledgements.
struct Acknowledgements {
    connection: lapin::Connection,
    channel: lapin::Channel,
    queue: String,
    exchange: String,
}

impl Acknowledgements {
    async fn bind(env: &TestEnv) -> Acknowledgements {
        let connection = alert_router::broker::connect(
            env.settings.amqp.url.expose(),
            "alert-router tests (acknowledgements)",
        )
        .await
        .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .name()
            .to_string();
        let bound = Acknowledgements {
            connection,
            channel,
            queue,
            exchange: env.settings.amqp.exchange.clone(),
        };
        bound.rebind().await;
        bound
    }

    async fn rebind(&self) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "escalation.acknowledged".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// The next acknowledgement waiting, and its AMQP message id. Publishes
    /// are confirmed before the clicker is answered, so one that happened is
    /// here by the time the answer is.
    async fn take(&self) -> Option<(Value, Option<String>)> {
        let got = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()?;
        let message_id = got
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        Some((
            serde_json::from_slice(&got.delivery.data).unwrap(),
            message_id,
        ))
    }

    async fn waiting(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn close(self) {
        let _ = self.connection.close(200, "".into()).await;
    }
}

async fn incidents(env: &TestEnv) -> Incidents {
    let redis = redis::Client::open(env.settings.redis.url.expose())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    Incidents::new(
        redis,
        &env.settings.redis.key_prefix,
        env.settings.delivery.incident_ttl,
    )
}

/// Starts incident `key` with a critical first event, as delivery does.
async fn open_incident(env: &TestEnv, incidents: &Incidents, key: &str) -> Event {
    let json = env.event(
        &format!("first-{key}"),
        json!({"dedup_key": key, "severity": "critical",
               "title": "Checkout API error rate above SLO"}),
    );
    let event = Event::decode(json.to_string().as_bytes(), MAX_EVENT_BYTES).unwrap();
    incidents
        .observe(&env.workspace, key, &event, &[])
        .await
        .unwrap();
    event
}

/// Event `id` of incident `key`, "Checkout down", with `extra` fields.
fn checkout_down(env: &TestEnv, key: &str, id: &str, extra: Value) -> Value {
    let mut event = env.event(
        id,
        json!({"dedup_key": key, "severity": "high", "title": "Checkout down"}),
    );
    if let (Some(base), Value::Object(extra)) = (event.as_object_mut(), extra) {
        base.extend(extra);
    }
    event
}

/// A click by `user` on the Acknowledge button of incident `key`.
fn ack_click(env: &TestEnv, key: &str, user: &str) -> Click {
    let value = serde_json::to_string(&AckButtonValue {
        w: env.workspace.clone(),
        k: key.to_string(),
        f: None,
    })
    .unwrap();
    Click::new(&env.workspace, user, ACK_ACTION, &value)
}

/// `body` signed now with `secret`, as Slack would sign it.
fn signed(body: &str, secret: &str) -> SignedClick {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    SignedClick {
        signature: slack_signature(secret, &timestamp, body),
        body: body.to_string(),
        timestamp,
        payload: Value::Null,
        response_url: String::new(),
    }
}

fn form(payload: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", payload)
        .finish()
}

fn counter(metrics: &str, result: &str) -> u64 {
    let prefix = format!("alert_router_slack_interactions_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn a_signed_click_acknowledges_the_incident_once_and_publishes_escalation_acknowledged() {
    let env = TestEnv::start(BASIC_RULES).await;
    let store = incidents(&env).await;
    let key = format!("chk-{}", env.id);
    let first = open_incident(&env, &store, &key).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;

    let click = env.slack.click(&ack_click(&env, &key, "U0ANA"), SECRET);
    let (status, _, took) = endpoint.send(&click).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(3), "Slack waits 3 s: {took:?}");
    let told = env.slack.wait_for_responses(1, WAIT).await.unwrap();
    assert!(told[0].is_ephemeral(), "{:?}", told[0].body);
    assert_eq!(
        told[0].text(),
        "You acknowledged *Checkout API error rate above SLO*. Its messages will say so in a moment."
    );

    let (published, message_id) = acks
        .take()
        .await
        .expect("escalation.acknowledged published");
    let event = Event::decode(published.to_string().as_bytes(), MAX_EVENT_BYTES).unwrap();
    assert_eq!(event.kind, "escalation.acknowledged");
    assert_eq!(event.dedup_key.as_deref(), Some(key.as_str()));
    assert_eq!(event.workspace.as_deref(), Some(env.workspace.as_str()));
    assert_eq!(event.severity, first.severity);
    assert_eq!(event.title, first.title);
    let by = event.acknowledged_by.clone().unwrap();
    assert_eq!(by.slack_user.as_deref(), Some("U0ANA"));
    assert_eq!(by.name.as_deref(), Some("u0ana"));
    assert_eq!(message_id.as_deref(), Some(event.id.as_str()));
    assert_eq!(
        event.incident_key(),
        key.as_str(),
        "maps back to the same incident"
    );

    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.state, IncidentState::Acknowledged);
    assert_eq!(incident.acknowledged_by.as_deref(), Some("U0ANA"));

    // Another person's click finds the incident acknowledged; the first
    // request replayed byte for byte (its timestamp still fresh) is refused.
    let second = env.slack.click(&ack_click(&env, &key, "U0BOB"), SECRET);
    assert_eq!(endpoint.send(&second).await.0, 200);
    assert_eq!(endpoint.send(&click).await.0, 401, "a replay");
    // Its signature's hex in upper case still verifies; it is still a replay.
    let shouting = SignedClick {
        signature: format!("v0={}", click.signature["v0=".len()..].to_uppercase()),
        ..click.clone()
    };
    assert_eq!(
        endpoint.send(&shouting).await.0,
        401,
        "a replay, upper case"
    );
    let told = env.slack.wait_for_responses(2, WAIT).await.unwrap();
    assert_eq!(told.len(), 2, "the replay is not answered");
    for answer in &told[1..] {
        assert!(answer.is_ephemeral());
        assert!(
            answer
                .text()
                .starts_with("This incident was already acknowledged by <@U0ANA> <!date^"),
            "{}",
            answer.text()
        );
    }
    assert_eq!(acks.waiting().await, 0, "nothing new published");
    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.acknowledged_by.as_deref(), Some("U0ANA"));

    // The event flows through the work queue like any other.
    let posts = env.slack.wait_for_posts(1, WAIT).await.unwrap();
    assert_eq!(support::event_id(&posts[0]), event.id);
    assert_eq!(posts[0].channel_id, ESCALATIONS);

    let metrics = endpoint.metrics().await;
    assert_eq!(counter(&metrics, "acknowledged"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "already"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "replayed"), 2, "{metrics}");
    assert!(!metrics.contains(SECRET));
    let log = endpoint.stop().await;
    assert!(
        log.contains("Slack interactivity is on at /slack/interactions"),
        "{log}"
    );
    assert!(log.contains("incident acknowledged in Slack"), "{log}");
    assert!(!log.contains(SECRET), "the log shows the signing secret");
    assert!(!log.contains("/actions/"), "the log shows a response_url");
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn forged_stale_and_unsigned_clicks_are_refused_and_change_nothing() {
    let env = TestEnv::start(BASIC_RULES).await;
    let store = incidents(&env).await;
    let key = format!("chk-{}", env.id);
    open_incident(&env, &store, &key).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;
    let click = ack_click(&env, &key, "U0MALLORY");
    let genuine = env.slack.click(&click, SECRET);
    let now = chrono::Utc::now().timestamp();

    let mut forged = genuine.signature.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let other_body = genuine.body.replace("U0MALLORY", "U0ANA");
    let refused = [
        ("a forged signature", genuine.with_signature(&forged)),
        (
            "another app's secret",
            env.slack.click(&click, "another-apps-signing-secret"),
        ),
        (
            "a body changed after signing",
            SignedClick {
                body: other_body,
                ..genuine.clone()
            },
        ),
        (
            "a request signed 6 minutes ago",
            env.slack.click_at(&click, SECRET, now - 360),
        ),
        (
            "a request dated 6 minutes ahead",
            env.slack.click_at(&click, SECRET, now + 360),
        ),
    ];
    for (what, request) in &refused {
        let (status, body, _) = endpoint.send(request).await;
        assert_eq!(status, 401, "{what}: {body}");
    }
    let timestamp = genuine.timestamp.as_str();
    let signature = genuine.signature.as_str();
    for (what, headers) in [
        ("no timestamp", vec![("x-slack-signature", signature)]),
        (
            "no signature",
            vec![("x-slack-request-timestamp", timestamp)],
        ),
        ("no headers", vec![]),
        (
            "a timestamp that is not one",
            vec![
                ("x-slack-request-timestamp", "soon"),
                ("x-slack-signature", signature),
            ],
        ),
    ] {
        assert_eq!(
            endpoint.send_raw(&headers, &genuine.body).await,
            401,
            "{what}"
        );
    }
    let huge = signed(
        &form(&"x".repeat(alert_router::interactions::MAX_BODY_BYTES + 1)),
        SECRET,
    );
    assert_eq!(endpoint.send(&huge).await.0, 413);

    // The refusals are answered before anything is done: nothing to wait for.
    assert_eq!(acks.waiting().await, 0, "nothing published");
    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.state, IncidentState::Open);
    assert_eq!(incident.acknowledged_by, None);
    assert!(env.slack.responses().is_empty(), "no one was answered");

    let metrics = endpoint.metrics().await;
    assert_eq!(counter(&metrics, "bad_signature"), 7, "{metrics}");
    assert_eq!(counter(&metrics, "stale"), 2, "{metrics}");
    assert_eq!(counter(&metrics, "bad_request"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "acknowledged"), 0, "{metrics}");

    // The genuine request still works: the refusals left the incident alone.
    assert_eq!(endpoint.send(&genuine).await.0, 200);
    let told = env.slack.wait_for_responses(1, WAIT).await.unwrap();
    assert!(
        told[0].text().starts_with("You acknowledged"),
        "{}",
        told[0].text()
    );
    assert!(acks.take().await.is_some());
    env.slack.wait_for_posts(1, WAIT).await.unwrap();

    let log = endpoint.stop().await;
    assert!(log.contains("Slack interaction refused"), "{log}");
    assert!(!log.contains(SECRET));
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn bad_payloads_are_refused_other_interactions_ignored_and_untracked_incidents_said_so() {
    let env = TestEnv::start(BASIC_RULES).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;

    let (status, body, _) = endpoint.send(&signed(&form("{not json"), SECRET)).await;
    assert_eq!(status, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (status, body, _) = endpoint.send(&signed("command=%2Fack", SECRET)).await;
    assert_eq!(status, 400);
    assert!(body.contains("payload"), "{body}");

    // Signed interactions that are not a click on our button: 200, nothing else.
    let modal = json!({"type": "view_submission", "user": {"id": "U0ANA"}, "view": {"id": "V1"}});
    assert_eq!(
        endpoint
            .send(&signed(&form(&modal.to_string()), SECRET))
            .await
            .0,
        200
    );
    let other_button = env.slack.click(
        &Click::new(&env.workspace, "U0ANA", "open_ticket", "x"),
        SECRET,
    );
    assert_eq!(endpoint.send(&other_button).await.0, 200);

    // Clicks for incidents the store does not keep (expired, or a message
    // from before buttons named their incident).
    let gone = env
        .slack
        .click(&ack_click(&env, "expired-incident", "U0ANA"), SECRET);
    assert_eq!(endpoint.send(&gone).await.0, 200);
    let old_button = env.slack.click(
        &Click::new(&env.workspace, "U0ANA", ACK_ACTION, "esc-2041-2"),
        SECRET,
    );
    assert_eq!(endpoint.send(&old_button).await.0, 200);
    let told = env.slack.wait_for_responses(2, WAIT).await.unwrap();
    for answer in &told {
        assert!(answer.is_ephemeral());
        assert_eq!(
            answer.text(),
            "This incident is no longer tracked (resolved and begun again since, or older than delivery.incident_ttl, 7days); nothing was changed."
        );
    }
    assert_eq!(told.len(), 2, "the ignored interactions got no answer");
    assert_eq!(acks.waiting().await, 0);

    let metrics = endpoint.metrics().await;
    assert_eq!(counter(&metrics, "bad_request"), 2, "{metrics}");
    assert_eq!(counter(&metrics, "accepted"), 2, "{metrics}");
    assert_eq!(counter(&metrics, "not_tracked"), 2, "{metrics}");
    endpoint.stop().await;
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn without_a_signing_secret_the_endpoint_says_interactivity_is_off() {
    let env = TestEnv::start(BASIC_RULES).await;
    let store = incidents(&env).await;
    let key = format!("chk-{}", env.id);
    open_incident(&env, &store, &key).await;
    let endpoint = Endpoint::start(&env, None).await;

    let click = env.slack.click(&ack_click(&env, &key, "U0ANA"), SECRET);
    let (status, body, _) = endpoint.send(&click).await;
    assert_eq!(status, 503);
    assert!(body.contains("set SLACK_SIGNING_SECRET"), "{body}");
    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.state, IncidentState::Open);
    assert!(env.slack.responses().is_empty());
    assert_eq!(counter(&endpoint.metrics().await, "not_configured"), 1);

    let log = endpoint.stop().await;
    assert_eq!(
        log.matches("Slack interactivity is off").count(),
        1,
        "said once, at start:\n{log}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_acknowledgement_the_broker_does_not_take_is_taken_back_and_a_second_click_succeeds() {
    let env = TestEnv::start(BASIC_RULES).await;
    let store = incidents(&env).await;
    let key = format!("chk-{}", env.id);
    open_incident(&env, &store, &key).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;

    // Without the exchange the publish fails (the broker closes the channel).
    acks.channel
        .exchange_delete(
            env.settings.amqp.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let click = ack_click(&env, &key, "U0ANA");
    assert_eq!(endpoint.send(&env.slack.click(&click, SECRET)).await.0, 200);
    let told = env.slack.wait_for_responses(1, WAIT).await.unwrap();
    assert!(
        told[0]
            .text()
            .starts_with("Your acknowledgement did not go through"),
        "{}",
        told[0].text()
    );
    // Taken back before the clicker was told.
    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.state, IncidentState::Open);
    assert_eq!(incident.acknowledged_by, None);

    // The exchange is back (as after a broker that lost it): the endpoint
    // opens a new channel for the next click.
    support::topology(&env.settings)
        .declare(&acks.channel)
        .await
        .unwrap();
    acks.rebind().await;
    assert_eq!(endpoint.send(&env.slack.click(&click, SECRET)).await.0, 200);
    let told = env.slack.wait_for_responses(2, WAIT).await.unwrap();
    assert!(
        told[1].text().starts_with("You acknowledged"),
        "{}",
        told[1].text()
    );
    let (published, _) = acks.take().await.expect("published on a new channel");
    assert_eq!(published["dedup_key"], key.as_str());
    assert_eq!(published["acknowledged_by"]["slack_user"], "U0ANA");
    let incident = store.get(&env.workspace, &key).await.unwrap().unwrap();
    assert_eq!(incident.state, IncidentState::Acknowledged);
    env.slack.wait_for_posts(1, WAIT).await.unwrap();

    let metrics = endpoint.metrics().await;
    assert_eq!(counter(&metrics, "publish_failed"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "acknowledged"), 1, "{metrics}");
    let log = endpoint.stop().await;
    assert!(log.contains("the acknowledgement is taken back"), "{log}");
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_button_of_an_earlier_incident_does_not_acknowledge_a_new_one_under_the_same_key() {
    let env = TestEnv::start(BASIC_RULES).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;
    let key = format!("chk-{}", env.id);
    let incident = |id: &str, extra: Value| checkout_down(&env, &key, id, extra);
    env.publish(&incident("first", json!({}))).await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    env.publish(&incident("follow-up", json!({"comment": "still failing"})))
        .await;
    let reply = env.slack.wait_for_posts(2, WAIT).await.unwrap().remove(1);
    assert!(
        reply.thread_ts.is_some(),
        "a reply in the incident's thread"
    );
    env.publish(&incident(
        "resolved",
        json!({"type": "escalation.resolved", "severity": "info"}),
    ))
    .await;
    env.slack.wait_for_updates(1, WAIT).await.unwrap();
    // The resolution's own reply, then the key fires again: a new incident
    // with a first message of its own.
    env.slack.wait_for_posts(3, WAIT).await.unwrap();
    env.publish(&incident("again", json!({}))).await;
    let again = env.slack.wait_for_posts(4, WAIT).await.unwrap().remove(3);
    assert_eq!(support::event_id(&again), "again");
    assert_eq!(again.thread_ts, None, "a new incident starts a new thread");

    // Yesterday's reply still shows its button; it names the old incident.
    let old = Click::on_post(&reply, ACK_ACTION, "U0ANA").expect("the reply has a button");
    assert_eq!(endpoint.send(&env.slack.click(&old, SECRET)).await.0, 200);
    let told = env.slack.wait_for_responses(1, WAIT).await.unwrap();
    assert!(
        told[0]
            .text()
            .starts_with("This incident is no longer tracked"),
        "{}",
        told[0].text()
    );
    assert_eq!(
        acks.waiting().await,
        0,
        "the new incident was not acknowledged"
    );

    // The new incident's own button does.
    let new = Click::on_post(&again, ACK_ACTION, "U0ANA").expect("the new message has a button");
    assert_eq!(endpoint.send(&env.slack.click(&new, SECRET)).await.0, 200);
    let (published, _) = acks.take().await.expect("published");
    assert_eq!(published["dedup_key"], key.as_str());
    let updates = env.slack.wait_for_updates(2, WAIT).await.unwrap();
    assert_eq!(updates[1].ts, again.ts, "the new first message shows it");

    endpoint.stop().await;
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_click_on_the_largest_message_in_a_non_latin_script_is_taken() {
    let env = TestEnv::start(BASIC_RULES).await;
    let acks = Acknowledgements::bind(&env).await;
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;
    let key = format!("big-{}", env.id);
    // Every text at its longest, three bytes a character.
    env.publish(&env.event(
        "largest",
        json!({"dedup_key": key, "title": "障".repeat(1000), "summary": "障".repeat(10_000),
               "comment": "障".repeat(4000)}),
    ))
    .await;
    let posted = env.slack.wait_for_posts(1, WAIT).await.unwrap().remove(0);
    let click = Click::on_post(&posted, ACK_ACTION, "U0ANA").expect("an Acknowledge button");
    let signed = env.slack.click(&click, SECRET);
    assert!(
        signed.body.len() > 64 * 1024,
        "Slack sends the whole message with the click: {} bytes",
        signed.body.len()
    );
    assert_eq!(endpoint.send(&signed).await.0, 200);
    let (published, _) = acks.take().await.expect("published");
    assert_eq!(published["dedup_key"], key.as_str());

    env.slack.wait_for_updates(1, WAIT).await.unwrap();
    endpoint.stop().await;
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_post_reply_take_a_click_update_the_message_and_turn_it_green_when_resolved() {
    let env = TestEnv::start(BASIC_RULES).await;
    let acks = Acknowledgements::bind(&env).await;
    // Two replicas consume; one of them also serves the interactivity endpoint.
    let endpoint = Endpoint::start(&env, Some(SECRET)).await;
    let mut other = env.start_worker_process();
    other.wait_for_log("consuming", 1).await;
    let key = format!("chk-{}", env.id);
    let incident = |id: &str, extra: Value| checkout_down(&env, &key, id, extra);
    env.publish(&incident("first", json!({}))).await;
    let posted = env.slack.wait_for_posts(1, WAIT).await.unwrap().remove(0);
    assert_eq!(posted.thread_ts, None);

    // A follow-up, whichever replica takes it, replies in the thread.
    env.publish(&incident("follow-up", json!({"comment": "still failing"})))
        .await;
    let posts = env.slack.wait_for_posts(2, WAIT).await.unwrap();
    assert_eq!(posts[1].thread_ts.as_deref(), Some(posted.ts.as_str()));
    assert_eq!(posts[1].channel, posted.channel_id);

    // The click Slack sends for the first message's button.
    let click = Click::on_post(&posted, ACK_ACTION, "U0ANA").expect("an Acknowledge button");
    let (status, _, took) = endpoint.send(&env.slack.click(&click, SECRET)).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let (published, _) = acks.take().await.expect("published");
    assert_eq!(published["dedup_key"], key.as_str());
    assert_eq!(published["title"], "Checkout down");

    // The event comes back through the work queue and updates the message.
    let updates = env.slack.wait_for_updates(1, WAIT).await.unwrap();
    assert_eq!(updates[0].channel_id, posted.channel_id);
    assert_eq!(updates[0].ts, posted.ts);
    assert_eq!(
        support::fake_slack::button_value(&updates[0], ACK_ACTION),
        None,
        "the button is gone"
    );
    let updated = updates[0].blocks.as_ref().unwrap().to_string();
    assert!(updated.contains("<@U0ANA>"), "{updated}");
    env.slack.wait_for_responses(1, WAIT).await.unwrap();

    // Resolved: the first message turns green.
    env.publish(&incident(
        "resolved",
        json!({"type": "escalation.resolved", "severity": "info"}),
    ))
    .await;
    let updates = env.slack.wait_for_updates(2, WAIT).await.unwrap();
    assert_eq!(updates[1].ts, posted.ts);
    assert_eq!(
        updates[1].attachments.as_ref().unwrap()[0]["color"],
        "#2EB67D"
    );
    assert!(
        updates[1]
            .blocks
            .as_ref()
            .unwrap()
            .to_string()
            .contains("Resolved")
    );

    endpoint.stop().await;
    assert!(other.stop().await.success());
    acks.close().await;
    env.assert_nothing_pending().await;
    env.cleanup().await;
}
