//! The `run` loop: connect, declare, consume, process deliveries concurrently, drain on stop.
//!
//! Like mini-redis, the whole worker is one function that takes a shutdown
//! token, so tests drive it in-process. Losing the broker is not fatal: the
//! loop reconnects with backoff and readiness says "not ready" meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::broker::acks::Acks;
use crate::broker::dlq_ledger::DeadLetterLedger;
use crate::broker::watch::{Notices, Watch};
use crate::broker::{self, BrokerError, Publisher, Topology};
use crate::config::{Secrets, Settings};
use crate::deliver::email::EmailSender;
use crate::deliver::idempotency::Idempotency;
use crate::deliver::incident::Incidents;
use crate::deliver::limit::RateLimiter;
use crate::deliver::slack::SlackClient;
use crate::deliver::slack::channels::ChannelDirectory;
use crate::deliver::slack::tokens::{Rotation, TokenStore};
use crate::deliver::slack::users::UserDirectory;
use crate::deliver::{Deliverer, DelivererParts};
use crate::event::{Event, sniff_id};
use crate::redact::Addresses;
use crate::rules::{Disposition, Rules, RulesErrors};
use crate::settle::{Outcome, Settled, Settler};
use crate::telemetry;
use crate::trust::TrustPolicy;

/// Why the worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("routing rules are invalid:\n{0}")]
    Rules(#[from] RulesErrors),
    #[error("cannot set up Redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot build the Slack HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot set up email: {0}")]
    Email(#[from] crate::deliver::email::EmailError),
    #[error("{0}")]
    Topology(BrokerError),
    #[error("cannot listen for health checks on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Shared by every in-flight delivery.
struct Context {
    /// Swapped whole on reload; each event keeps the rules it started with.
    rules: Arc<ArcSwap<Rules>>,
    deliverer: Deliverer,
    max_body_bytes: usize,
    /// After waiting this long for rate limits, a target falls back to email.
    max_rate_limit_deferral: Duration,
    /// What an event may name (`slack.allowed_workspaces`, `email.allowed_domains`).
    trust: TrustPolicy,
    /// How addresses appear in logs and dead-letter details.
    addresses: Addresses,
    /// Dates the dead letters, for their oldest-age gauge.
    dead_letters: DeadLetterLedger,
}

/// What `/readyz` reports: consuming, and not blocked by the broker.
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Default)]
struct ReadinessState {
    consuming: AtomicBool,
    blocked: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.consuming.load(Ordering::Relaxed) && !self.0.blocked.load(Ordering::Relaxed)
    }
    /// Why not ready, for the `/readyz` body; `None` when ready.
    fn why_not(&self) -> Option<&'static str> {
        if !self.0.consuming.load(Ordering::Relaxed) {
            Some("not ready: not consuming from RabbitMQ\n")
        } else if self.0.blocked.load(Ordering::Relaxed) {
            Some(
                "not ready: RabbitMQ is blocking publishes (resource alarm); retries and dead letters wait\n",
            )
        } else {
            None
        }
    }
    fn set(&self, consuming: bool) {
        self.0.consuming.store(consuming, Ordering::Relaxed);
        if !consuming {
            self.0.blocked.store(false, Ordering::Relaxed);
        }
    }
    fn set_blocked(&self, blocked: bool) {
        self.0.blocked.store(blocked, Ordering::Relaxed);
    }
}

/// Runs the worker until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    mut settings: Settings,
    mut secrets: Secrets,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    // Install the metrics recorder before anything records.
    let _ = telemetry::metrics();
    let loaded = Rules::load(&settings.rules.path)?;
    for warning in &loaded.warnings {
        warn!(%warning, "rules warning");
    }
    info!(path = %settings.rules.path.display(), rules = loaded.rules.rule_count(), "routing rules loaded");
    telemetry::record_rules_load(true, Some(loaded.rules.rule_count()));

    let preview = if settings.slack.dry_run {
        Some(dry_run(&mut settings, &mut secrets, &shutdown).await?)
    } else {
        None
    };
    let DeliveryPath {
        deliverer,
        redis,
        slack,
        incidents,
        escalations,
        addresses,
    } = delivery_path(&settings, &secrets)?;
    let install = crate::install::Install::new(&settings, &secrets, slack, redis.clone());
    install.log_status();
    let interactions =
        crate::interactions::Interactions::new(&settings, &secrets, incidents.clone())?;
    interactions.log_status();
    let trust = TrustPolicy::from_settings(&settings);
    info!(allowed = %trust, show_addresses = settings.log.show_addresses, "trust boundaries");
    let context = Arc::new(Context {
        rules: Arc::new(ArcSwap::from_pointee(loaded.rules)),
        deliverer,
        max_body_bytes: settings.amqp.max_body_bytes,
        max_rate_limit_deferral: settings.delivery.max_rate_limit_deferral,
        trust,
        addresses,
        dead_letters: DeadLetterLedger::new(
            redis.clone(),
            &settings.redis.key_prefix,
            &settings.amqp.dead_letter_queue,
        ),
    });

    let readiness = Readiness::default();
    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: settings.http.listen,
            source,
        })?;
    let http = tokio::spawn(serve_health(
        listener,
        readiness.clone(),
        crate::install::router(install)
            .merge(crate::interactions::router(interactions))
            .merge(
                preview
                    .map(crate::preview::page::router)
                    .unwrap_or_default(),
            ),
        shutdown.clone(),
    ));
    let escalator = tokio::spawn(crate::escalation::run(
        settings.clone(),
        escalations,
        incidents,
        Arc::clone(&context.rules),
        shutdown.clone(),
    ));
    let watcher = tokio::spawn(crate::reload::watch(
        settings.rules.path.clone(),
        Arc::clone(&context.rules),
        shutdown.clone(),
    ));

    let topology = Topology::from_settings(&settings.amqp, &settings.delivery.retry_delays);
    let mut delays = reconnect_delays();
    while !shutdown.is_cancelled() {
        let attempt_started = std::time::Instant::now();
        match consume(&settings, &topology, &context, &readiness, &shutdown).await {
            Ok(()) => break,
            Err(e @ BrokerError::Topology { .. }) => {
                error!(error = %e, "cannot run with this topology");
                shutdown.cancel();
                let _ = http.await;
                let _ = watcher.await;
                let _ = escalator.await;
                return Err(WorkerError::Topology(e));
            }
            Err(e) => {
                readiness.set(false);
                if let BrokerError::Stranded { .. } = e {
                    // Not a failure of the broker: reconnect at once.
                    warn!(error = %e, "reconnecting to RabbitMQ");
                    continue;
                }
                // A connection that lived a while starts the backoff afresh.
                if attempt_started.elapsed() > Duration::from_secs(60) {
                    delays = reconnect_delays();
                }
                let retry_in = delays.next().unwrap_or(RECONNECT_MAX_DELAY);
                error!(error = %e, ?retry_in, "lost RabbitMQ; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
    readiness.set(false);
    // Stop the side tasks even when the loop ended without a requested stop.
    shutdown.cancel();
    let _ = http.await;
    let _ = watcher.await;
    let _ = escalator.await;
    info!("stopped");
    Ok(())
}

/// Points `slack.api_url` at an in-process stand-in for Slack (see
/// [`crate::preview::stand_in`]) and makes sure a token is found: in a dry
/// run no token is needed, and a missing one would send every event to
/// email instead of through the Slack path being previewed. A placeholder
/// stands in for `SLACK_BOT_TOKEN` and, through [`delivery_path`], serves
/// every workspace without a stored token.
async fn dry_run(
    settings: &mut Settings,
    secrets: &mut Secrets,
    shutdown: &CancellationToken,
) -> Result<crate::preview::stand_in::Recent, WorkerError> {
    // Unreadable here means unreadable for the rules too, which already loaded.
    let rules_text = std::fs::read_to_string(&settings.rules.path).unwrap_or_default();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let stand_in = crate::preview::stand_in::start(&rules_text, shutdown.clone())
        .await
        .map_err(|source| WorkerError::Listen {
            addr: listen,
            source,
        })?;
    settings.slack.api_url = stand_in.api_url;
    // Email too, or a rule's email target would wait for a mail server
    // that is not there and end in the dead-letter queue.
    let smtp = crate::preview::smtp_stand_in::start(
        Addresses::new(settings.log.show_addresses),
        shutdown.clone(),
    )
    .await
    .map_err(|source| WorkerError::Listen {
        addr: listen,
        source,
    })?;
    settings.email.smtp_url = crate::config::SecretUrl::new(format!("smtp://{smtp}"));
    if secrets.slack_bot_token.is_none() {
        // Not shaped like a Slack token, so no secret scanner mistakes it for one.
        secrets.slack_bot_token = Some(crate::config::Secret::new("dry-run-placeholder"));
    }
    warn!(
        preview = %format!("http://{}/preview", settings.http.listen),
        "dry run: Slack is not called; messages are logged and shown at /preview"
    );
    Ok(stand_in.recent)
}

/// The delivery path the worker sends through, and the handles its other
/// parts (install pages, interactions, escalations) share with it.
pub struct DeliveryPath {
    pub deliverer: Deliverer,
    pub redis: redis::aio::ConnectionManager,
    pub slack: SlackClient,
    pub incidents: Incidents,
    pub escalations: crate::escalation::Schedule,
    /// How addresses appear in logs and dead-letter details.
    pub addresses: Addresses,
}

/// The Redis connection every part of the worker (and the `dlq` commands)
/// shares: it connects on first use and reconnects by itself.
pub fn redis_connection(settings: &Settings) -> Result<redis::aio::ConnectionManager, WorkerError> {
    redis::Client::open(settings.redis.url.expose())
        .and_then(|client| {
            client.get_connection_manager_lazy(
                redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(2),
            )
        })
        .map_err(|source| WorkerError::Redis {
            url: settings.redis.url.redacted(),
            source,
        })
}

/// Builds the [`Deliverer`] from settings and secrets: one place, so that
/// `alert-router send-test` delivers exactly as the worker does. Connects
/// to nothing yet (Redis connects lazily).
pub fn delivery_path(settings: &Settings, secrets: &Secrets) -> Result<DeliveryPath, WorkerError> {
    let redis = redis_connection(settings)?;
    let slack = SlackClient::new(&settings.slack)?;
    let mut tokens = TokenStore::new(
        redis.clone(),
        &settings.redis.key_prefix,
        secrets.slack_bot_token.clone(),
        settings.slack.default_workspace.clone(),
        settings.slack.token_cache_ttl,
        settings.slack.cache_capacity,
    );
    if settings.slack.dry_run {
        tokens = tokens.with_env_token_everywhere();
    }
    if let (Some(client_id), Some(client_secret)) =
        (&secrets.slack_client_id, &secrets.slack_client_secret)
    {
        tokens = tokens.with_rotation(Rotation {
            slack: slack.clone(),
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
        });
        info!("token rotation enabled");
    }
    let users = UserDirectory::new(
        redis.clone(),
        &settings.redis.key_prefix,
        crate::deliver::slack::users::DEFAULT_TTL,
        settings.slack.cache_capacity,
    );
    let limiter = RateLimiter::new(redis.clone(), &settings.redis.key_prefix, &settings.slack);
    let channels = ChannelDirectory::new(
        redis.clone(),
        &settings.redis.key_prefix,
        slack.clone(),
        limiter.clone(),
        settings.slack.channel_cache_ttl,
        settings.slack.cache_capacity,
    );
    let addresses = Addresses::new(settings.log.show_addresses);
    let incidents = Incidents::new(
        redis.clone(),
        &settings.redis.key_prefix,
        settings.delivery.incident_ttl,
    );
    let escalations = crate::escalation::Schedule::new(redis.clone(), &settings.redis.key_prefix);
    let idempotency = Idempotency::new(
        redis.clone(),
        &settings.redis.key_prefix,
        settings.delivery.idempotency_ttl,
        settings.delivery.claim_lease,
    )
    .with_addresses(addresses);
    let email = EmailSender::new(&settings.email)?;
    Ok(DeliveryPath {
        deliverer: Deliverer::new(DelivererParts {
            slack: slack.clone(),
            tokens,
            idempotency,
            incidents: incidents.clone(),
            escalations: escalations.clone(),
            email,
            limiter,
            max_rate_limit_wait: settings.slack.max_rate_limit_wait,
            users,
            channels,
            addresses,
        }),
        redis,
        slack,
        incidents,
        escalations,
        addresses,
    })
}

/// One pair of connections' life: returns `Ok` after a requested stop, `Err`
/// when the broker is lost or a delivery was left unacked by a confirm timeout.
///
/// Consuming and publishing use separate connections: under a memory or disk
/// alarm RabbitMQ blocks connections that publish, and lapin then holds back
/// every frame of that connection, acks included. With acks on a connection
/// that never publishes, events that need no republish keep flowing.
async fn consume(
    settings: &Settings,
    topology: &Topology,
    context: &Arc<Context>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let amqp = &settings.amqp;
    // Named after its queue, so `rabbitmqctl list_connections name` tells deployments apart.
    let consuming = broker::connect_within(
        amqp.url.expose(),
        &format!("alert-router worker {} (consume)", topology.queue),
        amqp.connect_timeout,
    )
    .await?;
    let publishing = match broker::connect_within(
        amqp.url.expose(),
        &format!("alert-router worker {} (publish)", topology.queue),
        amqp.connect_timeout,
    )
    .await
    {
        Ok(connection) => connection,
        Err(e) => {
            broker::close_within(&consuming, amqp.connect_timeout, "giving up").await;
            return Err(e);
        }
    };
    let result = consume_on(
        &consuming,
        &publishing,
        settings,
        topology,
        context,
        readiness,
        shutdown,
    )
    .await;
    readiness.set(false);
    telemetry::record_broker_connected(false);
    // Closing the consuming connection hands every unacked delivery back to
    // the broker; the publishing one may be blocked, hence the time limit.
    broker::close_within(&consuming, amqp.connect_timeout, "closing").await;
    broker::close_within(&publishing, amqp.connect_timeout, "closing").await;
    result
}

async fn consume_on(
    consuming: &lapin::Connection,
    publishing: &lapin::Connection,
    settings: &Settings,
    topology: &Topology,
    context: &Arc<Context>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let channel = consuming.create_channel().await?;
    // Declared on the consuming connection: it is never blocked.
    topology.declare(&channel).await?;
    let publisher = Publisher::open(publishing)
        .await?
        .with_confirm_timeout(settings.amqp.confirm_timeout);
    channel
        .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let consumer_tag = format!("alert-router-{}", uuid::Uuid::new_v4());
    let mut deliveries = channel
        .basic_consume(
            topology.queue.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The dead-letter gauges poll on a channel of their own on the consuming
    // connection (never blocked by an alarm) and stop with this connection.
    let dead_letter_gauges = CancellationToken::new();
    tokio::spawn(broker::dlq_gauges::run(
        broker::dlq_gauges::Source {
            channel: consuming.create_channel().await?,
            queue: topology.dead_letter_queue.clone(),
            ledger: context.dead_letters.clone(),
            settle: broker::dlq_ledger::settle_time(
                settings.amqp.confirm_timeout,
                settings.amqp.dead_letter_poll_interval,
            ),
        },
        settings.amqp.dead_letter_poll_interval,
        dead_letter_gauges.clone(),
    ));
    let _stop_gauges = dead_letter_gauges.drop_guard();
    let mut watch = Watch::start(&[("consume", consuming), ("publish", publishing)]);
    let acks = Acks::start(channel.clone(), settings.amqp.prefetch);
    let publishing_channel = publisher.channel().clone();
    let publishing_status = publishing.status().clone();
    let settler = Settler::new(publisher, topology.clone(), acks.clone())
        .with_ledger(context.dead_letters.clone());
    let in_flight = TaskTracker::new();
    // Cancelled by a delivery that finds the publishing channel dead.
    let publisher_lost = CancellationToken::new();
    // Cancelled by a republish RabbitMQ could not route: a queue of the
    // topology is gone, and only declaring it again brings it back.
    let topology_missing = CancellationToken::new();
    // Deliveries left unacked by a confirm timeout: only a new consuming
    // channel gets them redelivered.
    let (stranded_tx, mut stranded) = tokio::sync::watch::channel(0usize);
    readiness.set(true);
    telemetry::record_broker_connected(true);
    info!(queue = %topology.queue, prefetch = settings.amqp.prefetch, "consuming");

    let lost = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            _ = publisher_lost.cancelled() => break Some(BrokerError::Amqp(lapin::Error::from(
                lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "the publishing channel closed"),
            ))),
            _ = topology_missing.cancelled() => break Some(BrokerError::TopologyMissing),
            notices = watch.changed() => {
                readiness.set_blocked(notices.is_blocked());
                if let Some(why) = notices.lost {
                    break Some(BrokerError::ConnectionLost(why));
                }
                if let Some(error) = recycle_for(*stranded.borrow(), &notices) {
                    break Some(error);
                }
            }
            Ok(()) = stranded.changed() => {
                let count = *stranded.borrow_and_update();
                if let Some(error) = recycle_for(count, &watch.notices()) {
                    break Some(error);
                }
            }
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    in_flight.spawn(delivery_task(DeliveryTask {
                        context: Arc::clone(context),
                        settler: settler.clone(),
                        publisher_lost: publisher_lost.clone(),
                        topology_missing: topology_missing.clone(),
                        stranded: stranded_tx.clone(),
                        acks: acks.clone(),
                        delivery,
                    }));
                }
                Some(Err(e)) => break Some(BrokerError::from(e)),
                None => break Some(BrokerError::Amqp(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed, "consumer cancelled by the broker",
                )))),
            }
        }
    };
    readiness.set(false);
    telemetry::record_broker_connected(false);
    in_flight.close();
    if let Some(error) = lost {
        // In-flight work cannot ack on a dead channel; the broker redelivers it.
        // Each task is bounded (Slack timeouts, amqp.confirm_timeout).
        in_flight.wait().await;
        // The consuming channel may be alive (the publisher was lost, or
        // stranded deliveries recycle it): acks held back for a batch go out,
        // or events already settled would be redelivered and settled twice.
        if channel.status().connected() {
            let _ = tokio::time::timeout(settings.amqp.confirm_timeout, acks.flush()).await;
        }
        close_channels(&channel, &publishing_channel, &publishing_status, settings).await;
        return Err(error);
    }

    info!(
        in_flight = in_flight.len(),
        "stopping: no new deliveries; draining"
    );
    // Bounded: on a connection that died without a word it would wait for
    // the heartbeat to notice.
    let _ = tokio::time::timeout(
        settings.amqp.confirm_timeout,
        channel.basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    if tokio::time::timeout(settings.delivery.drain_timeout, in_flight.wait())
        .await
        .is_err()
    {
        warn!(
            unfinished = in_flight.len(),
            "drain timeout reached; unfinished events stay unacked and will be redelivered"
        );
    }
    // Acks still held back must reach the broker before the connection closes.
    acks.flush().await;
    close_channels(&channel, &publishing_channel, &publishing_status, settings).await;
    Ok(())
}

/// Closes the channels before their connections close: a channel dropped
/// afterwards makes lapin log a spurious connection error. A blocked
/// connection cannot send a close at all, so its channel is left to the drop.
async fn close_channels(
    consuming: &lapin::Channel,
    publishing: &lapin::Channel,
    publishing_status: &lapin::ConnectionStatus,
    settings: &Settings,
) {
    let channels = if publishing_status.blocked() {
        vec![consuming]
    } else {
        vec![consuming, publishing]
    };
    for channel in channels {
        if channel.status().connected() {
            let _ = tokio::time::timeout(
                settings.amqp.connect_timeout,
                channel.close(200, "closing".into()),
            )
            .await;
        }
    }
}

/// When deliveries are stranded by confirm timeouts, the connections are
/// rebuilt so the broker redelivers them — but not while it blocks us: a
/// new connection would be blocked at its first publish, and every
/// redelivery spends one of the quorum queue's `x-delivery-limit`
/// attempts. Blocked, the stranded deliveries wait (and fill the prefetch
/// window) until the alarm clears.
fn recycle_for(stranded: usize, notices: &Notices) -> Option<BrokerError> {
    if stranded == 0 || notices.is_blocked() {
        return None;
    }
    Some(BrokerError::Stranded {
        deliveries: stranded,
    })
}

/// What one delivery's task needs, moved into it.
struct DeliveryTask {
    context: Arc<Context>,
    settler: Settler,
    publisher_lost: CancellationToken,
    topology_missing: CancellationToken,
    stranded: tokio::sync::watch::Sender<usize>,
    acks: Acks,
    delivery: Delivery,
}

/// The task that processes one delivery, boxed where it is built: the
/// future is about 10 KB, and built inside the consuming loop's own future
/// it was copied several times per event on its way to the heap.
#[inline(never)]
fn delivery_task(task: DeliveryTask) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let DeliveryTask {
            context,
            settler,
            publisher_lost,
            topology_missing,
            stranded,
            acks,
            delivery,
        } = task;
        let tag = delivery.delivery_tag;
        let processed = std::panic::AssertUnwindSafe(process(&context, &settler, delivery))
            .catch_unwind()
            .await;
        match processed {
            Ok(Some(BrokerError::ConfirmTimeout { .. })) => {
                stranded.send_modify(|n| *n += 1);
            }
            // Requeued already; redelivered once the topology is back,
            // instead of going round the same missing queue until the
            // broker's delivery limit dead-letters it.
            Ok(Some(BrokerError::Unroutable { .. })) => topology_missing.cancel(),
            Ok(_) => {}
            Err(_) => {
                // A bug, not the event's fault: give it back (the queue's
                // delivery limit stops a loop) and keep the channel's acks flowing.
                error!(
                    delivery_tag = tag,
                    "processing panicked; the delivery is requeued"
                );
                acks.nack_tag(tag, true);
            }
        }
        if !settler.is_usable() {
            publisher_lost.cancel();
        }
    })
}

/// One delivery through the whole pipeline; returns why it could not be
/// settled, if it could not.
async fn process(context: &Context, settler: &Settler, delivery: Delivery) -> Option<BrokerError> {
    let started = std::time::Instant::now();
    // Decoded once; a body that fails still gets its id into the log if it has one.
    let decoded = Event::decode(&delivery.data, context.max_body_bytes);
    let event_id = match &decoded {
        Ok(event) => event.id.clone(),
        Err(_) => sniff_id(&delivery.data).unwrap_or_else(|| "?".into()),
    };
    let span = info_span!("event", event_id = %event_id, redelivered = delivery.redelivered);
    async {
        let outcome = match decoded {
            Ok(event) => {
                let waited_enough = crate::settle::deferred_for(&delivery.properties)
                    .is_some_and(|waited| waited >= context.max_rate_limit_deferral);
                let escalation = escalation_step(&delivery.properties);
                // Boxed: the routing and delivery future is most of this
                // one's size, which each move of the task would copy.
                Box::pin(handle(context, event, waited_enough, escalation)).await
            }
            // Parser messages may quote a value, an address among them.
            Err(e) => Outcome::DeadLetter {
                reason: e.reason_code(),
                detail: context.addresses.text(&e.to_string()).into_owned(),
            },
        };
        let settled = match settler.settle(&delivery, outcome).await {
            Ok(settled) => settled,
            Err(e @ BrokerError::ConfirmTimeout { .. }) => {
                telemetry::record_confirm_timeout();
                error!(error = %e, "confirm timed out; the delivery stays unacked and will be redelivered");
                return Some(e);
            }
            Err(e) => {
                error!(error = %e, "could not settle; left for redelivery");
                return Some(e);
            }
        };
        match settled {
            Settled::Acked => telemetry::record_event("acked", "ok", started.elapsed()),
            Settled::Retried { .. } => {
                telemetry::record_event("retried", "unsettled_targets", started.elapsed())
            }
            Settled::Deferred { .. } => {
                telemetry::record_event("deferred", "rate_limited", started.elapsed())
            }
            Settled::DeadLettered { reason } => {
                telemetry::record_event("dead_lettered", reason, started.elapsed())
            }
        }
        None
    }
    .instrument(span)
    .await
}

/// route → deliver, as an [`Outcome`]; every detail with its addresses
/// shown as `log.show_addresses` says, since details become log lines and
/// dead-letter headers.
async fn handle(
    context: &Context,
    event: Event,
    waited_enough: bool,
    escalation: Option<(String, String)>,
) -> Outcome {
    match handle_event(context, event, waited_enough, escalation).await {
        Outcome::RetryLater { detail } => Outcome::RetryLater {
            detail: context.addresses.text(&detail).into_owned(),
        },
        Outcome::Defer { wait, detail } => Outcome::Defer {
            wait,
            detail: context.addresses.text(&detail).into_owned(),
        },
        Outcome::DeadLetter { reason, detail } => Outcome::DeadLetter {
            reason,
            detail: context.addresses.text(&detail).into_owned(),
        },
        ack @ Outcome::Ack { .. } => ack,
    }
}

/// The rule and the delay of an escalation step's event (see
/// [`crate::escalation`]), from its headers.
fn escalation_step(properties: &lapin::BasicProperties) -> Option<(String, String)> {
    let rule = broker::header_str(properties, crate::escalation::RULE_HEADER)?;
    let after = broker::header_str(properties, crate::escalation::AFTER_HEADER).unwrap_or_default();
    Some((rule, after))
}

async fn handle_event(
    context: &Context,
    event: Event,
    waited_enough: bool,
    escalation: Option<(String, String)>,
) -> Outcome {
    // The producer is not trusted with where its event goes: refused whole,
    // before anything is sent, for an operator to fix and replay.
    if let Err(forbidden) = context.trust.check_workspace(&event) {
        return forbidden_target(&forbidden);
    }
    let rules = context.rules.load_full();
    let routing = match &escalation {
        Some((rule, after)) => rules.route_escalation(&event, rule, after),
        None => rules.route(&event),
    };
    if routing.disposition == Disposition::Deliver
        && let Err(forbidden) = context
            .trust
            .check_addresses(&event, &routing, context.addresses)
    {
        return forbidden_target(&forbidden);
    }
    match &routing.disposition {
        Disposition::Dropped => {
            return Outcome::Ack {
                why: "unmatched and rules say drop",
            };
        }
        Disposition::Silenced { .. } => {
            return Outcome::Ack {
                why: "silenced by a rule with notify: []",
            };
        }
        Disposition::DeadLetter => {
            return Outcome::DeadLetter {
                reason: "no_route",
                detail: format!(
                    "no rule matches event type `{}` (severity {}) and it names no targets",
                    event.kind, event.severity
                ),
            };
        }
        Disposition::Deliver => {}
    }
    let report = context
        .deliverer
        .deliver(&event, &routing, rules.default_channel(), waited_enough)
        .await;
    if report.all_settled() {
        return Outcome::Ack { why: "delivered" };
    }
    if !report.any_failed()
        && let Some(wait) = report.longest_deferral()
    {
        // Only waiting for rate-limit slots: not a failure, no attempt spent.
        return Outcome::Defer {
            wait,
            detail: report.to_string(),
        };
    }
    let permanent_only = report.unsettled().all(|t| {
        matches!(
            t.status,
            crate::deliver::TargetStatus::Failed {
                retryable: false,
                ..
            }
        )
    });
    let unsettled: Vec<String> = report
        .unsettled()
        .map(|t| match &t.status {
            crate::deliver::TargetStatus::Failed { detail, .. } => {
                format!("{}: {detail}", t.target)
            }
            _ => t.target.clone(),
        })
        .collect();
    if permanent_only {
        // Waiting cannot fix these: let an operator see them now.
        return Outcome::DeadLetter {
            reason: "undeliverable",
            detail: unsettled.join("; "),
        };
    }
    Outcome::RetryLater {
        detail: unsettled.join("; "),
    }
}

fn forbidden_target(forbidden: &crate::trust::Forbidden) -> Outcome {
    Outcome::DeadLetter {
        reason: crate::trust::REASON,
        detail: forbidden.to_string(),
    }
}

async fn serve_health(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    install: axum::Router,
    shutdown: CancellationToken,
) {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;

    let metrics = telemetry::metrics();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let why_not = readiness.why_not();
                async move {
                    match why_not {
                        None => (StatusCode::OK, "ready\n"),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .merge(install);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        error!(error = %e, "health endpoint failed");
    }
}

/// Longest wait between two attempts to reach RabbitMQ.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

/// Waits between attempts to reach RabbitMQ: 0.5–1 s, doubling up to
/// 15–30 s. The jitter (up to the delay again) keeps replicas restarted
/// together from reconnecting in step.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .with_max_delay(RECONNECT_MAX_DELAY / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked() -> Notices {
        let mut notices = Notices::default();
        notices.blocked.insert("publish", "low on memory".into());
        notices
    }

    #[test]
    fn stranded_deliveries_wait_while_the_broker_blocks_and_are_recycled_once_it_unblocks() {
        assert!(
            recycle_for(0, &Notices::default()).is_none(),
            "nothing stranded"
        );
        assert!(
            recycle_for(3, &blocked()).is_none(),
            "a new connection would block too"
        );
        assert!(matches!(
            recycle_for(3, &Notices::default()),
            Some(BrokerError::Stranded { deliveries: 3 })
        ));
    }

    #[test]
    fn reconnect_waits_double_from_half_a_second_and_never_exceed_thirty_seconds() {
        let waits: Vec<Duration> = reconnect_delays().take(12).collect();
        assert!(waits[0] >= Duration::from_millis(500) && waits[0] < Duration::from_secs(1));
        assert!(waits[1] >= Duration::from_secs(1) && waits[1] < Duration::from_secs(2));
        assert!(waits.iter().all(|w| *w <= RECONNECT_MAX_DELAY));
        assert!(
            waits[11] >= RECONNECT_MAX_DELAY / 2,
            "reaches the cap: {waits:?}"
        );
    }

    #[test]
    fn readyz_says_why_it_is_not_ready() {
        let readiness = Readiness::default();
        assert!(readiness.why_not().unwrap().contains("not consuming"));
        readiness.set(true);
        assert!(readiness.is_ready());
        readiness.set_blocked(true);
        assert!(!readiness.is_ready());
        assert!(readiness.why_not().unwrap().contains("blocking publishes"));
        // A lost connection clears "blocked": the next one starts unblocked.
        readiness.set(false);
        readiness.set(true);
        assert!(readiness.is_ready());
    }
}
