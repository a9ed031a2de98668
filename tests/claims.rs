//! Idempotency claims against the real Redis: a claim in use outlives its lease, a dropped one frees; the claim taken with the incident's record; the record through an incident's life.

use std::time::Duration;

use alert_router::config::SlackSettings;
use alert_router::deliver::idempotency::{Claim, Idempotency};
use alert_router::deliver::incident::{FirstMessage, FirstPost, Incidents, Observed, Preclaim};
use alert_router::deliver::limit::{RateLimiter, Slot};
use alert_router::event::Event;
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379";

async fn store(prefix: &str, lease: Duration) -> Idempotency {
    let client = redis::Client::open(REDIS).unwrap();
    let redis = redis::aio::ConnectionManager::new(client).await.unwrap();
    Idempotency::new(redis, prefix, Duration::from_secs(60), lease)
}

/// Deletes what a test wrote (attempt markers live for a day).
async fn cleanup(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

fn unique_prefix(name: &str) -> String {
    format!("test-claims-{name}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_claim_held_past_its_lease_stays_held_and_frees_once_its_keeper_is_dropped() {
    let lease = Duration::from_millis(1500);
    let prefix = unique_prefix("renew");
    let holder = store(&prefix, lease).await;
    let peer = store(&prefix, lease).await;

    let Claim::Acquired(ticket) = holder.claim("event-1", "slack:T1:C1").await.unwrap() else {
        panic!("the first claim is ours");
    };
    let keeper = holder.keep_alive(&ticket);
    // Three leases long: without renewals it would have lapsed twice.
    tokio::time::sleep(lease * 3).await;
    assert!(
        matches!(
            peer.claim("event-1", "slack:T1:C1").await.unwrap(),
            Claim::HeldElsewhere { .. }
        ),
        "a claim in use is renewed"
    );

    drop(keeper);
    let deadline = Instant::now() + lease * 4;
    loop {
        match peer.claim("event-1", "slack:T1:C1").await.unwrap() {
            // The holder never recorded an outcome: the peer is told to look first.
            Claim::AcquiredAfterCrash { .. } => break,
            Claim::HeldElsewhere { .. } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a dropped claim frees within its lease, got {other:?}"),
        }
    }
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_completed_claim_is_done_for_every_replica() {
    let prefix = unique_prefix("done");
    let holder = store(&prefix, Duration::from_secs(5)).await;
    let peer = store(&prefix, Duration::from_secs(5)).await;
    let Claim::Acquired(ticket) = holder.claim("event-2", "slack:T1:C1").await.unwrap() else {
        panic!("the first claim is ours");
    };
    let _keeper = holder.keep_alive(&ticket);
    holder.complete(&ticket).await.unwrap();
    assert_eq!(
        peer.claim("event-2", "slack:T1:C1").await.unwrap(),
        Claim::AlreadyDone
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_claim_sets_its_attempt_marker_and_keeps_an_earlier_one() {
    let prefix = unique_prefix("marker");
    let store = store(&prefix, Duration::from_secs(5)).await;
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let marker = |event: &str| format!("{}:attempt", store.key(event, "slack:T1:C1"));

    // No earlier attempt: the claim is plain, and its marker holds when it began.
    let Claim::Acquired(ticket) = store.claim("fresh", "slack:T1:C1").await.unwrap() else {
        panic!("a first claim is plain");
    };
    let since: String = redis::cmd("GET")
        .arg(marker("fresh"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let since: u64 = since.parse().unwrap();
    assert!(
        since > 1_700_000_000_000,
        "Redis's clock in ms, got {since}"
    );
    store.release(&ticket, false).await.unwrap();

    // An attempt that crashed after rerouting to the default channel: the
    // claim says so, and leaves the earlier marker as it was.
    let earlier = "1700000000123:C0DEFAULT";
    let _: () = redis::cmd("SET")
        .arg(marker("crashed"))
        .arg(earlier)
        .query_async(&mut redis)
        .await
        .unwrap();
    match store.claim("crashed", "slack:T1:C1").await.unwrap() {
        Claim::AcquiredAfterCrash {
            since_ms,
            rerouted_to,
            ..
        } => {
            assert_eq!(since_ms, 1_700_000_000_123);
            assert_eq!(rerouted_to.as_deref(), Some("C0DEFAULT"));
        }
        other => panic!("an earlier attempt's marker is reported, got {other:?}"),
    }
    let kept: String = redis::cmd("GET")
        .arg(marker("crashed"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(kept, earlier);
    cleanup(&prefix).await;
}

/// The incident store and the limiter under one prefix, as the worker builds them.
async fn incident_parts(prefix: &str) -> (Incidents, Idempotency, RateLimiter) {
    let client = redis::Client::open(REDIS).unwrap();
    let redis = redis::aio::ConnectionManager::new(client).await.unwrap();
    (
        Incidents::new(redis.clone(), prefix, Duration::from_secs(600)),
        Idempotency::new(
            redis.clone(),
            prefix,
            Duration::from_secs(60),
            Duration::from_secs(5),
        ),
        // Slack's own per-channel limit: a burst of 3, then one a second.
        RateLimiter::new(redis, prefix, &SlackSettings::default()),
    )
}

fn incident_event(id: &str, incident: &str) -> Event {
    incident_event_of(id, incident, "escalation.triggered", "high")
}

fn incident_event_of(id: &str, incident: &str, kind: &str, severity: &str) -> Event {
    let json = serde_json::json!({
        "id": id, "type": kind, "severity": severity,
        "title": "Checkout API error rate above SLO", "dedup_key": incident,
    });
    Event::decode(json.to_string().as_bytes(), 256 * 1024).unwrap()
}

/// Observes `event` for the destination `slack:T1:<channel>`, claiming its
/// post to `channel` and, with `slot`, taking that channel's first slot:
/// what delivery does for an event with one Slack target.
async fn observe_claiming(
    (incidents, claims, limiter): &(Incidents, Idempotency, RateLimiter),
    event: &Event,
    channel: &str,
    slot: bool,
) -> (Observed, Option<(Claim, Slot)>) {
    let destination = format!("slack:T1:{channel}");
    let destination = destination.as_str();
    let preclaim = Preclaim {
        ticket: claims.ticket(&event.id, destination),
        lease_ms: claims.lease_ms(),
        slot: slot.then(|| limiter.slot_request("T1", channel)),
        channel,
    };
    incidents
        .observe_and_claim("T1", &event.incident_key(), event, destination, preclaim)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_first_event_of_an_incident_is_observed_claimed_and_given_a_slot_in_one_call() {
    let prefix = unique_prefix("observe-first");
    let parts = incident_parts(&prefix).await;
    let event = incident_event("ev-1", "db-down");

    let (observed, claimed) = observe_claiming(&parts, &event, "C1", true).await;
    assert!(observed.is_first);
    assert_eq!(observed.first_posts, vec![FirstPost::Ours]);
    let Some((Claim::Acquired(ticket), Slot::Taken)) = claimed else {
        panic!("a new incident's post is claimed with its slot, got {claimed:?}");
    };

    // A copy of the same event meanwhile (another replica) finds it held;
    // once the post is recorded, done: no second post either way.
    let (_, again) = observe_claiming(&parts, &event, "C1", true).await;
    assert!(
        matches!(again, Some((Claim::HeldElsewhere { .. }, Slot::Ask))),
        "got {again:?}"
    );
    parts.1.complete(&ticket).await.unwrap();
    let (observed, again) = observe_claiming(&parts, &event, "C1", true).await;
    assert!(
        observed.is_first,
        "a redelivery is judged as it was the first time"
    );
    assert!(
        matches!(again, Some((Claim::AlreadyDone, Slot::Ask))),
        "got {again:?}"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_new_incident_observed_with_its_claim_reads_as_the_whole_observation_does() {
    let prefix = unique_prefix("observe-compact");
    let parts = incident_parts(&prefix).await;
    let (incidents, ..) = &parts;
    let severities = ["critical", "high", "medium", "low", "info"];
    let levels = [
        None,
        Some(0),
        Some(3),
        Some(i64::MAX as u64),
        Some(u64::MAX),
    ];
    for (n, (severity, level)) in severities.iter().zip(levels).enumerate() {
        let mut event = incident_event_of(
            &format!("ev-{n}"),
            "set-below",
            "escalation.triggered",
            severity,
        );
        event.level = level;
        // One incident observed with the claim (the compact answer), one
        // without it (the whole observation), from the same event.
        event.dedup_key = Some(format!("claimed-{n}"));
        let (claimed_view, claimed) = observe_claiming(&parts, &event, "C1", false).await;
        event.dedup_key = Some(format!("whole-{n}"));
        let whole_view = incidents
            .observe("T1", &event.incident_key(), &event, &["slack:T1:C1"])
            .await
            .unwrap();

        assert!(
            matches!(claimed, Some((Claim::Acquired(_), Slot::Ask))),
            "got {claimed:?}"
        );
        assert!(claimed_view.incident.first_at_ms > 1_700_000_000_000);
        let same_clock = Observed {
            incident: alert_router::deliver::incident::Incident {
                first_at_ms: whole_view.incident.first_at_ms,
                ..claimed_view.incident.clone()
            },
            ..claimed_view
        };
        assert_eq!(same_clock, whole_view, "{severity}, level {level:?}");
    }
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_reply_is_claimed_with_the_observation_only_where_its_first_message_is() {
    let prefix = unique_prefix("observe-reply");
    let parts = incident_parts(&prefix).await;
    let (incidents, ..) = &parts;
    let first = FirstMessage {
        channel: "C1".into(),
        ts: "1700000000.000100".into(),
    };
    observe_claiming(&parts, &incident_event("ev-1", "db-down"), "C1", true).await;
    incidents
        .record_first("T1", "db-down", "slack:T1:C1", &first)
        .await
        .unwrap();
    // A DM's first message sits in a `D…` conversation, not at the user id posted to.
    observe_claiming(&parts, &incident_event("ev-2", "db-down"), "U7", true).await;
    incidents
        .record_first(
            "T1",
            "db-down",
            "slack:T1:U7",
            &FirstMessage {
                channel: "D9".into(),
                ts: "1700000000.000200".into(),
            },
        )
        .await
        .unwrap();

    let (observed, claimed) =
        observe_claiming(&parts, &incident_event("ev-3", "db-down"), "C1", true).await;
    assert_eq!(observed.first_posts, vec![FirstPost::Exists(first)]);
    assert!(
        matches!(claimed, Some((Claim::Acquired(_), Slot::Taken))),
        "a reply in the channel it was routed to is claimed at once, got {claimed:?}"
    );

    let (observed, claimed) =
        observe_claiming(&parts, &incident_event("ev-4", "db-down"), "U7", true).await;
    assert!(matches!(&observed.first_posts[..], [FirstPost::Exists(m)] if m.channel == "D9"));
    assert_eq!(
        claimed, None,
        "a reply going to another channel than routed is claimed by the post itself"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_first_message_being_posted_by_another_delivery_is_waited_for_not_claimed() {
    let prefix = unique_prefix("observe-inflight");
    let parts = incident_parts(&prefix).await;
    let (_, first) = observe_claiming(&parts, &incident_event("ev-1", "db-down"), "C1", true).await;
    assert!(first.is_some());

    let (observed, claimed) =
        observe_claiming(&parts, &incident_event("ev-2", "db-down"), "C1", true).await;
    assert_eq!(observed.first_posts, vec![FirstPost::InFlight]);
    assert_eq!(claimed, None);
    cleanup(&prefix).await;
}

#[tokio::test]
async fn the_slot_taken_with_the_claim_follows_the_channel_limit() {
    let prefix = unique_prefix("observe-slots");
    let parts = incident_parts(&prefix).await;
    // Separate incidents, one channel: its burst of three, then a wait.
    let mut slots = Vec::new();
    for n in 0..4 {
        let event = incident_event(&format!("ev-{n}"), &format!("incident-{n}"));
        let (_, claimed) = observe_claiming(&parts, &event, "C1", true).await;
        let Some((Claim::Acquired(_), slot)) = claimed else {
            panic!("each new incident's post is claimed, got {claimed:?}");
        };
        slots.push(slot);
    }
    // The burst's last post is held back a quarter second (jitter allowance);
    // a post asked for too soon waits, and takes nothing meanwhile.
    assert_eq!(slots[..2], [Slot::Taken, Slot::Taken], "got {slots:?}");
    for slot in &slots[2..] {
        assert!(
            matches!(slot, Slot::WaitFor(wait) if *wait > Duration::ZERO && *wait <= Duration::from_millis(300)),
            "past the burst a post waits for the channel's next slot, got {slots:?}"
        );
    }

    // Without a slot request (posts already queue for the channel), the
    // claim alone: the post asks for its slot in its turn.
    let event = incident_event("ev-9", "incident-9");
    let (_, claimed) = observe_claiming(&parts, &event, "C1", false).await;
    assert!(
        matches!(claimed, Some((Claim::Acquired(_), Slot::Ask))),
        "got {claimed:?}"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn the_incident_record_follows_its_events_through_rise_redelivery_resolution_and_a_new_start()
{
    use alert_router::event::{IncidentState, Severity};
    let prefix = unique_prefix("observe-life");
    let (incidents, ..) = incident_parts(&prefix).await;
    let to = ["slack:T1:C1"];
    // An event of the `db` incident, observed for the one destination.
    let observe = |id: &str, kind: &str, severity: &str| {
        let event = incident_event_of(id, "db", kind, severity);
        let incidents = &incidents;
        async move {
            incidents
                .observe("T1", &event.incident_key(), &event, &to)
                .await
                .unwrap()
        }
    };

    let opened = observe("ev-1", "escalation.triggered", "medium").await;
    assert!(opened.is_first && !opened.rose);
    assert_eq!(opened.incident.state, IncidentState::Open);
    assert_eq!(opened.incident.severity, Some(Severity::Medium));
    assert!(opened.incident.first_at_ms > 0);
    assert_eq!(opened.first_posts, vec![FirstPost::Ours]);

    // More severe: a rise; the first message is still being posted by ev-1.
    let rose = observe("ev-2", "escalation.triggered", "critical").await;
    assert!(!rose.is_first && rose.rose);
    assert_eq!(rose.incident.severity, Some(Severity::Critical));
    assert_eq!(rose.first_posts, vec![FirstPost::InFlight]);
    // Less severe after that: no rise, and the incident keeps its worst.
    let calmer = observe("ev-3", "escalation.triggered", "low").await;
    assert!(!calmer.is_first && !calmer.rose);
    assert_eq!(calmer.incident.severity, Some(Severity::Critical));
    // A redelivery is judged as it was the first time.
    let again = observe("ev-2", "escalation.triggered", "critical").await;
    assert!(!again.is_first && again.rose);

    let first = FirstMessage {
        channel: "C1".into(),
        ts: "1700000000.000100".into(),
    };
    incidents
        .record_first("T1", "db", to[0], &first)
        .await
        .unwrap();
    let resolved = observe("ev-4", "escalation.resolved", "info").await;
    assert_eq!(resolved.incident.state, IncidentState::Resolved);
    assert!(resolved.incident.resolved_at_ms.is_some());
    assert!(
        resolved.incident.first_event.is_some(),
        "a resolution reads the whole record"
    );
    assert_eq!(resolved.first_posts, vec![FirstPost::Exists(first)]);

    // A new problem after the resolution starts a new incident, without the old one's fields.
    let reopened = observe("ev-5", "escalation.triggered", "low").await;
    assert!(reopened.is_first && !reopened.rose);
    assert_eq!(reopened.incident.state, IncidentState::Open);
    assert_eq!(reopened.incident.severity, Some(Severity::Low));
    assert_eq!(reopened.incident.resolved_at_ms, None);
    assert_eq!(reopened.first_posts, vec![FirstPost::Ours]);
    cleanup(&prefix).await;
}

#[tokio::test]
async fn an_email_note_left_where_no_incident_is_stays_with_the_incident_that_starts_there() {
    let prefix = unique_prefix("observe-emailed");
    let (incidents, ..) = incident_parts(&prefix).await;
    let to = ["slack:T1:C1"];
    // A delivery gave up its first post to email after the record was gone.
    incidents
        .abandon_first("T1", "db", to[0], true)
        .await
        .unwrap();

    let event = incident_event_of("ev-1", "db", "escalation.triggered", "high");
    let observed = incidents.observe("T1", "db", &event, &to).await.unwrap();
    assert!(observed.is_first);
    assert!(
        observed.incident.emailed.contains_key(to[0]),
        "the email note is answered with the new incident, got {:?}",
        observed.incident
    );
    cleanup(&prefix).await;
}
