//! The dead-letter ledger against the real Redis: how it dates dead letters and squares itself with the queue's depth.

use std::time::Duration;

use alert_router::broker::dlq_ledger::DeadLetterLedger;

/// Each test its own ledger.
async fn ledger() -> (DeadLetterLedger, String) {
    let prefix = format!("test-ledger-{}", uuid::Uuid::new_v4().simple());
    let redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    (DeadLetterLedger::new(redis, &prefix, "alerts.dead"), prefix)
}

/// Records `entry` in a millisecond of its own, so entries never tie;
/// returns its date.
async fn record_alone(ledger: &DeadLetterLedger, entry: &str) -> u64 {
    let before = ledger.now_ms().await.unwrap();
    while ledger.now_ms().await.unwrap() == before {}
    let at = ledger.record(entry).await.unwrap();
    while ledger.now_ms().await.unwrap() == at {}
    at
}

async fn age_ms(ledger: &DeadLetterLedger, depth: u32, settle: Duration) -> Option<u64> {
    ledger
        .oldest_age(depth, settle)
        .await
        .unwrap()
        .map(|age| u64::try_from(age.as_millis()).unwrap())
}

/// The date of the entry the ledger takes as the queue's head.
async fn head(ledger: &DeadLetterLedger, depth: u32, settle: Duration) -> Option<u64> {
    ledger.head(depth, settle).await.unwrap().oldest_ms
}

async fn cleanup(prefix: &str) {
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:dead-letters:alerts.dead"))
        .arg(format!("{prefix}:dead-letters:alerts.dead:mismatch"))
        .query_async(&mut redis)
        .await
        .unwrap();
}

const AT_ONCE: Duration = Duration::ZERO;
const NEVER: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn the_age_is_the_oldest_entrys_and_zero_for_an_empty_queue() {
    let (ledger, prefix) = ledger().await;
    assert_eq!(age_ms(&ledger, 0, NEVER).await, Some(0));
    assert_eq!(age_ms(&ledger, 3, NEVER).await, None, "nothing known yet");

    let first = record_alone(&ledger, "a").await;
    let second = record_alone(&ledger, "b").await;
    assert_eq!(head(&ledger, 2, NEVER).await, Some(first));
    let age = age_ms(&ledger, 2, NEVER).await.unwrap();
    let now = ledger.now_ms().await.unwrap();
    assert!(age <= now - first && age >= second - first, "age {age} ms");

    // A replay took "a": the head is "b" now.
    ledger.forget(&["a".to_string()]).await.unwrap();
    assert_eq!(head(&ledger, 1, NEVER).await, Some(second));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn entries_beyond_the_depth_are_taken_as_the_oldest_once_the_mismatch_lasts() {
    let (ledger, prefix) = ledger().await;
    let first = record_alone(&ledger, "a").await;
    let second = record_alone(&ledger, "b").await;
    record_alone(&ledger, "c").await;

    // Some other tool took the head. Within the settle time nothing changes
    // (a dead letter may be between its confirm and its entry).
    assert_eq!(head(&ledger, 2, NEVER).await, Some(first));
    assert_eq!(head(&ledger, 2, NEVER).await, Some(first));
    // Seen twice, the settle time apart: the oldest entry goes.
    head(&ledger, 2, AT_ONCE).await;
    assert_eq!(head(&ledger, 2, AT_ONCE).await, Some(second));
    // It stays squared: the depth matches the entries.
    assert_eq!(head(&ledger, 2, AT_ONCE).await, Some(second));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn messages_without_entries_are_dated_when_first_noticed() {
    let (ledger, prefix) = ledger().await;
    let recorded = record_alone(&ledger, "a").await;
    // Two messages came from the broker's own dead-lettering.
    let first_notice = ledger.head(3, AT_ONCE).await.unwrap();
    assert_eq!(first_notice.oldest_ms, Some(recorded));
    // Still three messages after the settle time: two entries are added, dated
    // at the first notice, and the head is still the recorded one.
    assert_eq!(head(&ledger, 3, AT_ONCE).await, Some(recorded));
    assert_eq!(head(&ledger, 3, AT_ONCE).await, Some(recorded));
    // The recorded one is replayed: the head is now one of the added ones.
    ledger.forget(&["a".to_string()]).await.unwrap();
    assert_eq!(head(&ledger, 2, NEVER).await, Some(first_notice.now_ms));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_mismatch_that_does_not_last_changes_nothing() {
    let (ledger, prefix) = ledger().await;
    let first = record_alone(&ledger, "a").await;
    record_alone(&ledger, "b").await;
    // A `dlq list` holds a message for a moment; then the depth is back.
    head(&ledger, 1, AT_ONCE).await;
    assert_eq!(head(&ledger, 2, AT_ONCE).await, Some(first));
    // A dead letter between its confirm and its entry: the same.
    head(&ledger, 3, AT_ONCE).await;
    record_alone(&ledger, "c").await;
    assert_eq!(head(&ledger, 3, AT_ONCE).await, Some(first));
    assert_eq!(head(&ledger, 3, AT_ONCE).await, Some(first));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn entries_left_when_the_queue_reads_empty_are_dropped_and_a_purge_forgets_what_it_took() {
    let (ledger, prefix) = ledger().await;
    record_alone(&ledger, "a").await;
    record_alone(&ledger, "b").await;
    // Purged by another tool: empty twice, the settle time apart.
    assert_eq!(age_ms(&ledger, 0, AT_ONCE).await, Some(0));
    assert_eq!(age_ms(&ledger, 0, AT_ONCE).await, Some(0));
    assert_eq!(
        age_ms(&ledger, 1, NEVER).await,
        None,
        "the old entries are gone"
    );

    // A purge through the CLI: what was recorded before it is forgotten,
    // what arrives during it is kept.
    record_alone(&ledger, "c").await;
    let purge_started = ledger.now_ms().await.unwrap();
    let during = record_alone(&ledger, "d").await;
    ledger.forget_before(purge_started).await.unwrap();
    assert_eq!(head(&ledger, 1, NEVER).await, Some(during));
    assert_eq!(
        head(&ledger, 2, NEVER).await,
        Some(during),
        "one entry is left"
    );
    cleanup(&prefix).await;
}
