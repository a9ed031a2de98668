//! Per-channel send queues between route and send: posts wait for their channel's rate-limit slot most severe first, then oldest.
//!
//! Every post to a channel asks for a slot of the channel's (and its
//! workspace's) shared GCRA bucket in Redis. Asking and sleeping per delivery
//! made prefetched deliveries for a hot channel race each other for each
//! slot, in no order, while other channels idled. Here a delivery that
//! cannot post at once joins its channel's queue, and one task per busy
//! channel takes slots from Redis, only while it has someone to give them
//! to, and hands each to the most severe, then oldest, waiter. In process a
//! keyed `governor` limiter paces each channel, so a replica alone never asks
//! Redis for a slot it knows is not free yet; Redis stays the authority, so
//! replicas together still never exceed the limit.
//!
//! A delivery never waits longer than `slack.max_rate_limit_wait` here: one
//! whose expected wait (the waiters ahead of it times the channel's
//! interval) is longer is deferred through a broker delay queue at once, so a
//! hot channel holds only the prefetch slots it can use soon, and the others
//! go to channels that can post.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::Quota;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::warn;

use super::limit::RateLimiter;
use crate::event::Severity;

/// Where a waiter stands: more severe first, then the one that came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub severity: Severity,
    /// Arrival order in this process.
    seq: u64,
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> Ordering {
        // `Severity` orders Critical first; a max-heap wants it greatest.
        other
            .severity
            .cmp(&self.severity)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a delivery may do after asking for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A slot is taken for it: post now.
    Go,
    /// Its turn would come later than it may be held: defer it for about this long.
    Defer(Duration),
}

struct Waiter {
    priority: Priority,
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority.cmp(&other.priority)
    }
}

/// (workspace, channel id)
type ChannelKey = (String, String);

#[derive(Default)]
struct ChannelQueue {
    waiters: BinaryHeap<Waiter>,
    /// A task hands out this channel's slots (one per channel, so that
    /// the order holds).
    driven: bool,
    /// When Redis said the next slot is free (a 429's pause included): a
    /// newcomer's wait starts there, not now.
    next_slot_at: Option<Instant>,
}

/// This process's pace per channel; keys of idle channels are dropped.
type LocalPacer = governor::DefaultKeyedRateLimiter<ChannelKey>;

/// Idle channels' pacing state is dropped once the pacer holds this many.
const PACER_KEYS_KEPT: usize = 1024;

struct Inner {
    limiter: RateLimiter,
    pacer: LocalPacer,
    /// Only channels with waiters (or a task about to notice it has none).
    queues: Mutex<HashMap<ChannelKey, ChannelQueue>>,
    next_seq: AtomicU64,
}

/// Per-channel queues of posts waiting for a rate-limit slot; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub fn new(limiter: RateLimiter) -> Scheduler {
        let burst = NonZeroU32::new(limiter.channel_burst()).unwrap_or(NonZeroU32::MIN);
        // The channel bucket's own pace; Redis shapes the burst further.
        let quota = Quota::with_period(limiter.channel_interval())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Scheduler {
            inner: Arc::new(Inner {
                pacer: governor::RateLimiter::keyed(quota),
                limiter,
                queues: Mutex::new(HashMap::new()),
                next_seq: AtomicU64::new(0),
            }),
        }
    }

    /// A place in line for an event of `severity`, taken when the delivery
    /// arrives so that age orders waiters of equal severity.
    pub fn priority(&self, severity: Severity) -> Priority {
        Priority {
            severity,
            seq: self.inner.next_seq.fetch_add(1, AtomicOrdering::Relaxed),
        }
    }

    /// Whether posts to the channel are waiting here: a new post must then
    /// queue behind them rather than take a free slot first.
    pub fn is_busy(&self, workspace: &str, channel: &str) -> bool {
        self.lock()
            .get(&(workspace.to_string(), channel.to_string()))
            .is_some_and(|q| !q.waiters.is_empty())
    }

    /// Waits for a slot to post to `channel`, at most `budget`. A wait that
    /// would be longer (by the waiters ahead, or by the time passing) is
    /// [`Turn::Defer`]; the caller then gives the delivery back to the broker.
    pub async fn turn(
        &self,
        workspace: &str,
        channel: &str,
        priority: Priority,
        budget: Duration,
    ) -> Turn {
        let key = (workspace.to_string(), channel.to_string());
        let interval = self.inner.limiter.channel_interval();
        let (granted, start_driver, deadline) = {
            let mut queues = self.lock();
            let queue = queues.entry(key.clone()).or_default();
            let ahead = queue
                .waiters
                .iter()
                .filter(|w| w.priority > priority && !w.grant.is_closed())
                .count();
            let now = Instant::now();
            let paused = queue
                .next_slot_at
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
            let expected =
                paused + interval.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
            if budget.is_zero() || expected > budget {
                if !queue.driven {
                    queues.remove(&key);
                }
                return Turn::Defer(expected.max(interval));
            }
            let (grant, granted) = oneshot::channel();
            let start_driver = !queue.driven;
            queue.driven = true;
            queue.waiters.push(Waiter { priority, grant });
            (granted, start_driver, now + budget)
        };
        if start_driver {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(drive(inner, key.clone()));
        }
        match tokio::time::timeout_at(deadline, granted).await {
            Ok(Ok(())) => Turn::Go,
            // Timed out (or the driver is gone): the dropped receiver tells
            // the driver to skip this waiter. Come back when the channel
            // is expected to have room.
            Ok(Err(_)) | Err(_) => {
                let paused = self
                    .lock()
                    .get(&key)
                    .and_then(|q| q.next_slot_at)
                    .map_or(Duration::ZERO, |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                Turn::Defer(paused.max(interval))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelKey, ChannelQueue>> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hands out one channel's slots, best waiter first, until nobody waits.
async fn drive(inner: Arc<Inner>, key: ChannelKey) {
    let (workspace, channel) = &key;
    loop {
        // Only ask Redis for a slot when someone will use it.
        {
            let mut queues = inner.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(queue) = queues.get_mut(&key) else {
                return;
            };
            while queue.waiters.peek().is_some_and(|w| w.grant.is_closed()) {
                queue.waiters.pop();
            }
            if queue.waiters.is_empty() {
                queues.remove(&key);
                drop(queues);
                if inner.pacer.len() > PACER_KEYS_KEPT {
                    inner.pacer.retain_recent();
                    inner.pacer.shrink_to_fit();
                }
                return;
            }
        }
        inner.pacer.until_key_ready(&key).await;
        // Other replicas take slots too: Redis decides.
        loop {
            match inner.limiter.try_acquire(workspace, channel).await {
                Ok(None) => break,
                Ok(Some(wait)) => {
                    let at = Instant::now() + wait;
                    if let Some(queue) = inner
                        .queues
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(&key)
                    {
                        queue.next_slot_at = Some(at);
                    }
                    tokio::time::sleep_until(at).await;
                }
                Err(e) => {
                    // Slack's own 429 still protects the channel; do not stall on Redis.
                    warn!(error = %e, "cannot check the shared rate limit; posting anyway");
                    break;
                }
            }
        }
        // A slot is ours: give it to the best waiter still there.
        let mut queues = inner.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = queues.get_mut(&key) else {
            return;
        };
        while let Some(waiter) = queue.waiters.pop() {
            if waiter.grant.send(()).is_ok() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priority(severity: Severity, seq: u64) -> Priority {
        Priority { severity, seq }
    }

    #[test]
    fn the_most_severe_waiter_goes_first_then_the_oldest() {
        let mut heap = BinaryHeap::new();
        heap.push(priority(Severity::Low, 0));
        heap.push(priority(Severity::Info, 1));
        heap.push(priority(Severity::Critical, 5));
        heap.push(priority(Severity::Low, 2));
        heap.push(priority(Severity::High, 3));
        let order: Vec<(Severity, u64)> = std::iter::from_fn(|| heap.pop())
            .map(|p| (p.severity, p.seq))
            .collect();
        assert_eq!(
            order,
            [
                (Severity::Critical, 5),
                (Severity::High, 3),
                (Severity::Low, 0),
                (Severity::Low, 2),
                (Severity::Info, 1),
            ]
        );
    }
}
