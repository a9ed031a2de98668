//! Acknowledgements of one consumer channel, sent in batches the broker settles cheaply.
//!
//! A quorum queue turns every `basic.ack` into a Raft command, and every
//! freed prefetch slot into a delivery of its own. Acking each event as it
//! finishes made RabbitMQ spend about twice the CPU per message that a bare
//! consume+ack loop costs it. Here finished deliveries are collected and
//! everything below the oldest unfinished one is acked with a single
//! `multiple` ack. A delivery that finishes while an older one is still being
//! worked on (a slow channel, a retry wait) is acked on its own after at most
//! [`HOLD`], so one slow event never pins the prefetch window.
//!
//! All settlements of the channel (acks and nacks) go through one task, in
//! order: a `multiple` ack never overtakes the nack of a tag it spans.
//! Acks are at-least-once bookkeeping: one lost with a dropped connection
//! means a redelivery, which the idempotency records turn into a no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Longest an out-of-order finished delivery waits for the ones before it.
pub const HOLD: Duration = Duration::from_millis(5);

enum Command {
    Ack(u64),
    Nack { tag: u64, requeue: bool },
    Flush(oneshot::Sender<()>),
}

/// Settles deliveries of one consumer channel; cheap to clone.
#[derive(Clone)]
pub struct Acks {
    commands: mpsc::UnboundedSender<Command>,
}

impl Acks {
    /// Starts the task for `channel`, a new channel (its first delivery tag
    /// is 1) consumed with `prefetch`: a quarter of the window settled in
    /// order goes out as one ack at once, less within [`HOLD`].
    pub fn start(channel: Channel, prefetch: u16) -> Acks {
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, receiver, usize::from(prefetch / 4)));
        Acks { commands }
    }

    /// Queues an ack of `delivery`; it reaches the broker within [`HOLD`].
    pub fn ack(&self, delivery: &Delivery) {
        let _ = self.commands.send(Command::Ack(delivery.delivery_tag));
    }

    /// Nacks `delivery` at once (before any later ack of this channel).
    pub fn nack(&self, delivery: &Delivery, requeue: bool) {
        self.nack_tag(delivery.delivery_tag, requeue);
    }

    /// Nacks by delivery tag, for a delivery that is no longer at hand (its
    /// processing panicked).
    pub fn nack_tag(&self, tag: u64, requeue: bool) {
        let _ = self.commands.send(Command::Nack { tag, requeue });
    }

    /// Sends every queued ack now; returns once they are handed to the connection.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }
}

/// What the task knows about the channel's delivery tags.
#[derive(Debug)]
struct Ledger {
    /// Highest tag settled so far (0: none yet).
    highest_settled: u64,
    /// Tags below `highest_settled` not settled yet. Kept instead of the
    /// settled ones so the ledger stays within the prefetch window however
    /// long one delivery stays unsettled (a confirm timeout under a broker
    /// alarm) while thousands after it finish.
    unsettled_below: BTreeSet<u64>,
    /// Acks not sent yet, with when they were queued.
    ready: BTreeMap<u64, Instant>,
    /// A settled prefix this long goes out at once; a shorter one waits up
    /// to [`HOLD`] for more. Acked one by one as they finish, the deliveries
    /// of a quorum queue cost the broker a Raft command and a refill each.
    batch: usize,
}

/// One frame to send.
#[derive(Debug, PartialEq, Eq)]
enum Send {
    /// Acks every unacked tag up to and including this one.
    Multiple(u64),
    Single(u64),
}

impl Ledger {
    fn new(batch: usize) -> Ledger {
        Ledger {
            highest_settled: 0,
            unsettled_below: BTreeSet::new(),
            ready: BTreeMap::new(),
            batch: batch.max(1),
        }
    }

    /// Lowest tag not settled yet: every tag below it is settled.
    fn next_unsettled(&self) -> u64 {
        self.unsettled_below
            .first()
            .copied()
            .unwrap_or(self.highest_settled + 1)
    }

    fn is_settled(&self, tag: u64) -> bool {
        tag <= self.highest_settled && !self.unsettled_below.contains(&tag)
    }

    fn settle(&mut self, tag: u64) {
        if tag > self.highest_settled {
            // Tags are consecutive: those skipped are still being worked on.
            self.unsettled_below.extend(self.highest_settled + 1..tag);
            self.highest_settled = tag;
        } else {
            self.unsettled_below.remove(&tag);
        }
    }

    /// The acks due now: one `multiple` ack for the settled prefix once it
    /// is `batch` long or held since `held_since`, single acks for those
    /// past an unfinished delivery held since `held_since` or earlier (all
    /// when `None`).
    fn due(&mut self, held_since: Option<Instant>) -> Vec<Send> {
        let mut due = Vec::new();
        let above = self.ready.split_off(&self.next_unsettled());
        let below = std::mem::replace(&mut self.ready, above);
        let prefix_due = below.len() >= self.batch
            || match held_since {
                None => true,
                Some(limit) => below.values().any(|at| *at <= limit),
            };
        if prefix_due {
            if let Some((&tag, _)) = below.last_key_value() {
                due.push(Send::Multiple(tag));
            }
        } else {
            self.ready.extend(below);
        }
        self.ready.retain(|&tag, at| {
            let held_long_enough = held_since.is_none_or(|limit| *at <= limit);
            if held_long_enough {
                due.push(Send::Single(tag));
            }
            !held_long_enough
        });
        due
    }

    /// When the oldest held ack falls due.
    fn next_deadline(&self) -> Option<Instant> {
        self.ready.values().min().map(|at| *at + HOLD)
    }
}

async fn run(channel: Channel, mut commands: mpsc::UnboundedReceiver<Command>, batch: usize) {
    let mut ledger = Ledger::new(batch);
    let mut batch = Vec::with_capacity(256);
    loop {
        let received = match ledger.next_deadline() {
            Some(deadline) => tokio::select! {
                n = commands.recv_many(&mut batch, 256) => Some(n),
                _ = tokio::time::sleep_until(deadline) => None,
            },
            None => Some(commands.recv_many(&mut batch, 256).await),
        };
        if received == Some(0) {
            // Every handle is gone: the channel's life is over.
            send(&channel, ledger.due(None));
            return;
        }
        let mut flushed = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Ack(tag) => {
                    ledger.settle(tag);
                    ledger.ready.insert(tag, Instant::now());
                }
                Command::Nack { tag, .. } if ledger.is_settled(tag) => {
                    // A panic after the delivery was settled: nothing to give back.
                    debug!(tag, "nack of a settled delivery skipped");
                }
                Command::Nack { tag, requeue } => {
                    // Not needed for order (frames leave in submission order,
                    // and no `multiple` ack spans an unsettled tag), but it
                    // keeps every ack queued before a nack on the wire before it.
                    send(&channel, ledger.due(None));
                    ledger.settle(tag);
                    submit(channel.basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue,
                            ..BasicNackOptions::default()
                        },
                    ));
                }
                Command::Flush(done) => flushed.push(done),
            }
        }
        if flushed.is_empty() {
            let held_since = Instant::now().checked_sub(HOLD);
            send(&channel, ledger.due(held_since.or(Some(Instant::now()))));
        } else {
            send(&channel, ledger.due(None));
            for done in flushed {
                let _ = done.send(());
            }
        }
    }
}

fn send(channel: &Channel, due: Vec<Send>) {
    for frame in due {
        debug!(?frame, "ack");
        let (tag, multiple) = match frame {
            Send::Multiple(tag) => (tag, true),
            Send::Single(tag) => (tag, false),
        };
        submit(channel.basic_ack(tag, BasicAckOptions { multiple }));
    }
}

/// Hands an ack or nack to the connection without waiting for it to be
/// written. `Channel::basic_ack` queues its frame on the first poll, so
/// frames leave in the order they are submitted and the task never waits on
/// the socket. (`Acker::ack` would not do: lapin runs each of those as a
/// future of its own, in no particular order, and a `multiple` ack that
/// overtakes a single one makes the broker close the channel.)
fn submit<F: Future<Output = lapin::Result<()>>>(rpc: F) {
    let mut rpc = pin!(rpc);
    if let Poll::Ready(Err(e)) = rpc.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        // Only a closed channel refuses: the broker redelivers what it held.
        warn!(error = %e, "could not settle a delivery; the broker will redeliver it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(due: &[Send]) -> Vec<&Send> {
        due.iter().collect()
    }

    fn ledger_with_ready(settled: &[u64], at: Instant) -> Ledger {
        let mut ledger = Ledger::new(1);
        for &tag in settled {
            ledger.settle(tag);
            ledger.ready.insert(tag, at);
        }
        ledger
    }

    #[test]
    fn a_settled_prefix_goes_out_as_one_multiple_ack() {
        let now = Instant::now();
        let mut ledger = ledger_with_ready(&[2, 1, 3], now);
        assert_eq!(ledger.next_unsettled(), 4);
        assert_eq!(tags(&ledger.due(Some(now - HOLD))), [&Send::Multiple(3)]);
        assert!(ledger.ready.is_empty());
    }

    #[test]
    fn deliveries_finished_past_an_unfinished_one_wait_then_go_alone() {
        let now = Instant::now();
        // 2 is still being worked on.
        let mut ledger = ledger_with_ready(&[1, 3, 4], now);
        assert_eq!(tags(&ledger.due(Some(now - HOLD))), [&Send::Multiple(1)]);
        assert_eq!(ledger.ready.len(), 2, "3 and 4 are held");
        assert_eq!(
            tags(&ledger.due(Some(now))),
            [&Send::Single(3), &Send::Single(4)]
        );
        // When 2 finishes, only 2 is left to ack, and the prefix is whole again.
        ledger.settle(2);
        ledger.ready.insert(2, now);
        assert_eq!(ledger.next_unsettled(), 5);
        assert_eq!(tags(&ledger.due(Some(now))), [&Send::Multiple(2)]);
    }

    #[test]
    fn a_nacked_tag_counts_as_settled_but_is_never_the_target_of_an_ack() {
        let now = Instant::now();
        let mut ledger = ledger_with_ready(&[1], now);
        ledger.settle(2); // nacked
        ledger.settle(3);
        ledger.ready.insert(3, now);
        assert_eq!(tags(&ledger.due(Some(now - HOLD))), [&Send::Multiple(3)]);
    }

    #[test]
    fn a_short_settled_prefix_waits_a_moment_for_more_then_goes_as_one_ack() {
        let now = Instant::now();
        let mut ledger = Ledger::new(4);
        for tag in 1..=3 {
            ledger.settle(tag);
            ledger.ready.insert(tag, now);
        }
        assert!(ledger.due(Some(now - HOLD)).is_empty(), "3 of 4: held");
        ledger.settle(4);
        ledger.ready.insert(4, now);
        assert_eq!(tags(&ledger.due(Some(now - HOLD))), [&Send::Multiple(4)]);
        // A short prefix goes once it has been held for HOLD.
        ledger.settle(5);
        ledger.ready.insert(5, now);
        assert!(ledger.due(Some(now - HOLD)).is_empty());
        assert_eq!(tags(&ledger.due(Some(now))), [&Send::Multiple(5)]);
        assert_eq!(ledger.next_deadline(), None);
    }

    #[test]
    fn one_delivery_left_unsettled_does_not_grow_the_ledger_as_later_ones_finish() {
        let mut ledger = Ledger::new(1);
        // Tag 1 waits (a confirm timeout under an alarm); 100 000 later ones finish.
        for tag in 2..=100_001 {
            ledger.settle(tag);
            ledger.ready.insert(tag, Instant::now());
            let _ = ledger.due(None);
        }
        assert_eq!(ledger.unsettled_below.len(), 1);
        assert!(ledger.ready.is_empty());
        assert_eq!(ledger.next_unsettled(), 1);
        ledger.settle(1);
        assert_eq!(ledger.next_unsettled(), 100_002);
        assert!(ledger.unsettled_below.is_empty());
    }

    #[test]
    fn a_tag_counts_as_settled_once_acked_or_nacked() {
        let now = Instant::now();
        let mut ledger = ledger_with_ready(&[1, 3], now);
        assert!(ledger.is_settled(1));
        assert!(!ledger.is_settled(2));
        assert!(ledger.is_settled(3));
        ledger.settle(2);
        assert!(ledger.is_settled(2));
        assert!(!ledger.is_settled(4));
    }

    #[test]
    fn nothing_is_due_when_nothing_finished() {
        let mut ledger = Ledger::new(1);
        assert!(ledger.due(None).is_empty());
        assert_eq!(ledger.next_deadline(), None);
    }
}
