//! Escalation chains: durable timers in a Redis sorted set, fired by whichever replica takes them first, as events through the broker.
//!
//! When the first event of an incident matches rules with `escalate` steps,
//! each step is scheduled in one sorted set (score: when it is due, on
//! Redis's clock). Every worker looks for due steps once a second and
//! *claims* them by pushing their score a lease into the future, so one
//! replica works a step at a time and a replica that dies mid-way leaves it
//! to another after the lease. A step whose incident is acknowledged,
//! resolved or gone is dropped; otherwise it is published, with confirms,
//! as an `escalation.escalated` event carrying the step's targets, and only
//! then removed. A crash between the two publishes it again: the event's id
//! is derived from the incident and the step, so the idempotency records
//! deliver it at most once per person.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, BrokerError, Publisher};
use crate::config::Settings;
use crate::deliver::incident::{Incident, Incidents};
use crate::event::IncidentState;
use crate::rules::{EscalationChain, Rules};

/// Headers naming the step an escalation event is: the worker delivers it
/// to its own `targets` only (not through the rules again) and says in the
/// message that it is an escalation, and after how long.
pub const RULE_HEADER: &str = "x-alert-router-escalation-rule";
/// What the three share: kept when a dead-lettered step is replayed.
pub const HEADER_PREFIX: &str = "x-alert-router-escalation-";
pub const STEP_HEADER: &str = "x-alert-router-escalation-step";
pub const AFTER_HEADER: &str = "x-alert-router-escalation-after";

/// A claimed step is another replica's to try again after this long.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
/// How often each worker looks for due steps.
const POLL: Duration = Duration::from_secs(1);
/// Steps taken per look.
const BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum EscalationError {
    #[error("cannot reach the escalation schedule in Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// One scheduled step, as the sorted set's member holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    /// Workspace.
    w: String,
    /// Incident key.
    k: String,
    /// When the incident was first notified (Unix ms): a new incident under
    /// the same key gets new steps.
    f: u64,
    /// Rule name.
    r: String,
    /// Step index in the rule's chain.
    i: usize,
}

/// The schedule of escalation steps; cheap to clone.
#[derive(Clone)]
pub struct Schedule {
    redis: ConnectionManager,
    key: String,
    claim: redis::Script,
}

/// Takes up to ARGV[1] due steps, pushing each a lease (ARGV[2] ms) ahead.
const CLAIM_DUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), member)
end
return due
"#;

impl Schedule {
    pub fn new(redis: ConnectionManager, key_prefix: &str) -> Schedule {
        Schedule {
            redis,
            key: format!("{key_prefix}:escalations"),
            claim: redis::Script::new(CLAIM_DUE),
        }
    }

    /// Schedules every step of `chains` for an incident first notified at
    /// `first_at_ms`. Scheduling a step twice keeps the first.
    pub async fn schedule(
        &self,
        workspace: &str,
        incident: &str,
        first_at_ms: u64,
        chains: &[EscalationChain],
    ) -> Result<(), EscalationError> {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(&self.key).arg("NX");
        let mut any = false;
        for chain in chains {
            for (index, step) in chain.steps.iter().enumerate() {
                let member = Member {
                    w: workspace.to_string(),
                    k: incident.to_string(),
                    f: first_at_ms,
                    r: chain.rule.clone(),
                    i: index,
                };
                let due = first_at_ms.saturating_add(millis(step.after));
                cmd.arg(due)
                    .arg(serde_json::to_string(&member).unwrap_or_default());
                any = true;
            }
        }
        if any {
            let mut redis = self.redis.clone();
            cmd.query_async::<()>(&mut redis).await?;
        }
        Ok(())
    }

    /// Claims the steps that are due, for this replica to work.
    async fn claim_due(&self) -> Result<Vec<(String, Member)>, EscalationError> {
        let mut redis = self.redis.clone();
        let members: Vec<String> = self
            .claim
            .key(&self.key)
            .arg(BATCH)
            .arg(millis(CLAIM_LEASE))
            .invoke_async(&mut redis)
            .await?;
        Ok(members
            .into_iter()
            .filter_map(|raw| {
                let member = serde_json::from_str(&raw).ok()?;
                Some((raw, member))
            })
            .collect())
    }

    async fn remove(&self, raw: &str) -> Result<(), EscalationError> {
        let mut redis = self.redis.clone();
        redis::cmd("ZREM")
            .arg(&self.key)
            .arg(raw)
            .query_async::<()>(&mut redis)
            .await?;
        Ok(())
    }
}

/// Works the schedule until `shutdown`: what is due and still open is
/// published as an `escalation.escalated` event.
pub async fn run(
    settings: Settings,
    schedule: Schedule,
    incidents: Incidents,
    rules: std::sync::Arc<arc_swap::ArcSwap<Rules>>,
    shutdown: CancellationToken,
) {
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let due = match schedule.claim_due().await {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, "cannot look for due escalation steps");
                continue;
            }
        };
        for (raw, member) in due {
            // Steps claimed and not fired are another replica's (or the next
            // start's) once their lease ends.
            if shutdown.is_cancelled() {
                break;
            }
            let rules = rules.load_full();
            match fire(
                &settings,
                &schedule,
                &incidents,
                &rules,
                &mut publisher,
                &raw,
                &member,
            )
            .await
            {
                Ok(()) => {}
                Err(e) => {
                    warn!(error = %e, rule = %member.r, step = member.i + 1, "cannot fire an escalation step; another try after the lease");
                    // A broken connection is opened afresh next time.
                    if matches!(e, EscalationError::Broker(_)) {
                        publisher = None;
                    }
                    // A broker that cannot confirm one step (an alarm) would
                    // make each of the others wait out amqp.confirm_timeout in
                    // turn: they wait for their lease instead.
                    if matches!(
                        e,
                        EscalationError::Broker(BrokerError::ConfirmTimeout { .. })
                    ) {
                        break;
                    }
                }
            }
        }
    }
    if let Some((connection, _)) = publisher {
        broker::close_within(&connection, settings.amqp.connect_timeout, "shutting down").await;
    }
}

async fn fire(
    settings: &Settings,
    schedule: &Schedule,
    incidents: &Incidents,
    rules: &Rules,
    publisher: &mut Option<(lapin::Connection, Publisher)>,
    raw: &str,
    member: &Member,
) -> Result<(), EscalationError> {
    let incident = incidents
        .get(&member.w, &member.k)
        .await
        .map_err(|e| match e {
            crate::deliver::incident::IncidentError::Redis(e) => EscalationError::Redis(e),
        })?;
    let Some(incident) = incident.filter(|i| i.first_at_ms == member.f) else {
        // Expired, or a new incident under the same key since.
        return schedule.remove(raw).await;
    };
    if incident.state != IncidentState::Open {
        // Logged once removed: the log line then means the step is gone.
        schedule.remove(raw).await?;
        info!(rule = %member.r, step = member.i + 1, state = incident.state.as_str(), "escalation step not needed");
        return Ok(());
    }
    let Some(step) = rules.escalation_step(&member.r, member.i) else {
        warn!(rule = %member.r, step = member.i + 1, "the rules no longer have this escalation step; dropped");
        return schedule.remove(raw).await;
    };
    let Some(body) = escalation_event(&incident, member, &step.notify) else {
        warn!(rule = %member.r, "the incident's first event cannot be read; escalation step dropped");
        return schedule.remove(raw).await;
    };
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(FieldTable::from(
            [
                (RULE_HEADER, member.r.clone()),
                (STEP_HEADER, (member.i + 1).to_string()),
                (AFTER_HEADER, step.after_text.clone()),
            ]
            .into_iter()
            .map(|(name, value)| (name.into(), AMQPValue::LongString(value.into())))
            .collect::<std::collections::BTreeMap<_, _>>(),
        ));
    let publisher = match publisher {
        Some((_, publisher)) => publisher,
        None => {
            let connection = broker::connect_within(
                settings.amqp.url.expose(),
                "alert-router escalations",
                settings.amqp.connect_timeout,
            )
            .await?;
            let opened = Publisher::open(&connection)
                .await?
                .with_confirm_timeout(settings.amqp.confirm_timeout);
            &mut publisher.insert((connection, opened)).1
        }
    };
    publisher
        .publish(
            &settings.amqp.exchange,
            "escalation.escalated",
            &body,
            properties,
        )
        .await?;
    info!(rule = %member.r, step = member.i + 1, after = %step.after_text, "escalated: not acknowledged in time");
    schedule.remove(raw).await
}

/// The incident's first event as an `escalation.escalated` event for the
/// step's targets, with an id of its own derived from the incident and step.
fn escalation_event(
    incident: &Incident,
    member: &Member,
    targets: &[crate::event::Target],
) -> Option<Vec<u8>> {
    // Through `Event`: the record keeps the body as received, and fields
    // the worker does not know are not passed on.
    let first: crate::event::Event = serde_json::from_str(incident.first_event.as_deref()?).ok()?;
    let mut event = serde_json::to_value(&first).ok()?;
    let object = event.as_object_mut()?;
    let mut digest = Sha256::new();
    digest.update(serde_json::to_vec(member).ok()?);
    let id = format!("escalation-{}", &hex::encode(digest.finalize())[..32]);
    object.insert("id".into(), Value::String(id));
    object.insert("type".into(), Value::String("escalation.escalated".into()));
    object.insert("dedup_key".into(), Value::String(member.k.clone()));
    object.insert("workspace".into(), Value::String(member.w.clone()));
    // The step number as the level, unless the incident was already higher.
    let level = object
        .get("level")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .max(u64::try_from(member.i + 1).unwrap_or(u64::MAX));
    object.insert("level".into(), Value::from(level));
    object.insert("targets".into(), serde_json::to_value(targets).ok()?);
    object.remove("acknowledged_by");
    serde_json::to_vec(&event).ok()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Target};
    use std::collections::BTreeMap;

    #[test]
    fn an_escalation_event_is_the_first_event_for_the_steps_targets_with_an_id_of_its_own() {
        let incident = Incident {
            state: IncidentState::Open,
            severity: None,
            level: None,
            first_event: Some(
                r#"{"id":"e1","type":"escalation.triggered","severity":"high","title":"Checkout down","ticket":{"number":"TCK-1"},"producer_debug":"x"}"#
                    .into(),
            ),
            first_at_ms: 1_700_000_000_000,
            acknowledged_by: None,
            acknowledged_at_ms: None,
            resolved_at_ms: None,
            messages: BTreeMap::new(),
            emailed: BTreeMap::new(),
        };
        let member = Member {
            w: "T1".into(),
            k: "ticket:TCK-1".into(),
            f: 1_700_000_000_000,
            r: "payments".into(),
            i: 0,
        };
        let body =
            escalation_event(&incident, &member, &[Target::SlackUser("U0HEAD".into())]).unwrap();
        let event = Event::decode(&body, 1 << 20).unwrap();
        assert_eq!(event.kind, "escalation.escalated");
        assert_eq!(event.title, "Checkout down");
        assert_eq!(event.incident_key(), "ticket:TCK-1");
        assert_eq!(event.own_targets(), &[Target::SlackUser("U0HEAD".into())]);
        assert_eq!(event.level, Some(1));
        assert!(event.id.starts_with("escalation-") && event.id != "e1");
        // The record keeps the first body as received; what the worker does
        // not know of it is not published again.
        assert!(!String::from_utf8_lossy(&body).contains("producer_debug"));
        let again = escalation_event(&incident, &member, &[]).unwrap();
        assert_eq!(
            Event::decode(&again, 1 << 20).unwrap().id,
            event.id,
            "the same step has the same id"
        );
    }
}
