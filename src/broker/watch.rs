//! Watches what RabbitMQ tells a connection on its own: `connection.blocked` / `unblocked` and errors.
//!
//! Under a memory or disk alarm the broker stops reading from connections
//! that publish and says so with `connection.blocked`. Nothing fails then:
//! publishes and their confirms just wait. The worker needs to know, to say
//! "not ready" and to tell a confirm timeout caused by an alarm (wait for
//! the alarm to clear) from one that is not (reconnect now).

use std::collections::BTreeMap;

use futures_util::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::telemetry;

/// What the broker has said about the watched connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notices {
    /// Blocked connections (by role, e.g. `publish`) with the broker's reason.
    pub blocked: BTreeMap<&'static str, String>,
    /// The first error a connection reported: it is no longer usable.
    pub lost: Option<String>,
}

impl Notices {
    pub fn is_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }
}

/// Watches connections until dropped (the watching tasks end with it).
pub struct Watch {
    notices: watch::Receiver<Notices>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Starts watching `connections`, each named by its role for the log.
    pub fn start(connections: &[(&'static str, &Connection)]) -> Watch {
        let (sender, notices) = watch::channel(Notices::default());
        let tasks = connections
            .iter()
            .map(|(role, connection)| {
                let events = connection.events_listener();
                // A notice that came before the listener existed only shows in the status.
                if connection.status().blocked() {
                    note_blocked(&sender, role, "blocked before it was watched".into());
                }
                tokio::spawn(follow(role, events, sender.clone()))
            })
            .collect();
        Watch { notices, tasks }
    }

    /// What is known now.
    pub fn notices(&self) -> Notices {
        self.notices.borrow().clone()
    }

    /// Waits for the next change (or forever, once nothing is watched any more).
    pub async fn changed(&mut self) -> Notices {
        if self.notices.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.notices.borrow_and_update().clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // The next connections start unblocked; a stale gauge would say otherwise.
        telemetry::record_broker_blocked(false);
    }
}

async fn follow(
    role: &'static str,
    events: impl futures_util::Stream<Item = Event>,
    sender: watch::Sender<Notices>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => note_blocked(&sender, role, reason),
            Event::ConnectionUnblocked => {
                sender.send_modify(|n| {
                    n.blocked.remove(role);
                });
                if !sender.borrow().is_blocked() {
                    telemetry::record_broker_blocked(false);
                }
                info!(connection = role, "RabbitMQ unblocked the connection");
            }
            Event::Error(error) => {
                sender.send_modify(|n| {
                    n.lost
                        .get_or_insert_with(|| format!("{role} connection: {error}"));
                });
            }
            _ => {}
        }
    }
}

fn note_blocked(sender: &watch::Sender<Notices>, role: &'static str, reason: String) {
    warn!(
        connection = role,
        %reason,
        "RabbitMQ blocked the connection (resource alarm): retries and dead letters wait; /readyz answers 503 until it unblocks"
    );
    telemetry::record_broker_blocked(true);
    sender.send_modify(|n| {
        n.blocked.insert(role, reason);
    });
}
