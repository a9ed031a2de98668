//! Idempotency claims against the real Redis: a claim in use outlives its lease, a dropped one frees.

use std::time::Duration;

use alert_router::deliver::idempotency::{Claim, Idempotency};
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
