//! Slack's interactivity endpoint: `POST /slack/interactions` checks a click's signature, acknowledges its incident and publishes `escalation.acknowledged`.
//!
//! Served on `http.listen` next to the health endpoints and the install
//! pages, and only with `SLACK_SIGNING_SECRET` set (without it the route
//! answers 503 saying so). A click on the Acknowledge button
//! ([`ACK_ACTION_ID`]) goes:
//!
//! 1. signature: `X-Slack-Signature` must be `v0=` + hex HMAC-SHA256 keyed by
//!    the signing secret over `v0:{X-Slack-Request-Timestamp}:{raw body}`,
//!    compared in constant time, with the timestamp within 5 minutes of the
//!    worker's clock; otherwise 401 and nothing else happens;
//! 2. the incident named by the button's value ([`AckButtonValue`]) goes
//!    from open to acknowledged in one Redis script ([`Incidents::acknowledge`]),
//!    so of two clicks, or a click and a replay of it, only one wins;
//! 3. the winner publishes, with confirms, an `escalation.acknowledged` event
//!    to `amqp.exchange`. It flows through the work queue like any event (the
//!    incident's messages are updated from it) and any producer can bind its
//!    own queue to learn of it. If the broker does not confirm it, the
//!    acknowledgement is taken back ([`Incidents::reopen`]) so a second click
//!    can try again;
//! 4. the answer: HTTP 200 within Slack's 3 seconds (the work above is
//!    bounded to 2.5 s), then one ephemeral message to the clicker through
//!    the payload's `response_url`, from a task of its own.
//!
//! Nothing secret reaches a log line, an answer or a metric: the signing
//! secret only keys the MAC, and a `response_url` (anyone holding it can
//! post into the channel for 30 minutes) is never logged.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use lapin::BasicProperties;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::broker::{self, BrokerError, Publisher};
use crate::config::{Secret, SecretUrl, Secrets, Settings};
use crate::deliver::incident::{Acknowledgement, Incident, Incidents};
use crate::deliver::slack::message::{ACK_ACTION_ID, AckButtonValue, escape};
use crate::event::{Event, IncidentState, Severity};
use crate::telemetry;

/// Where Slack posts clicks (the app's interactivity request URL).
pub const INTERACTIONS_PATH: &str = "/slack/interactions";
/// The type, and routing key, of the event a click publishes.
pub const ACKNOWLEDGED_TYPE: &str = "escalation.acknowledged";
/// The whole message rides along with a click, form-encoded: the largest
/// message the worker posts, in a non-Latin script (3 bytes a character,
/// 9 once percent-encoded), is well over 64 KiB (the interaction tests
/// click one). Far larger is not Slack's, and is refused before it is read
/// whole.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How far `X-Slack-Request-Timestamp` may be from the worker's clock, as
/// Slack advises: a captured request is worthless after it.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Slack gives up on an answer after 3 s; this leaves room for the network.
const ANSWER_BUDGET: Duration = Duration::from_millis(2_500);
/// Longest wait for the incident store. Redis answers in a millisecond; one
/// that takes longer is down, and the clicker is told to try again.
const STORE_BUDGET: Duration = Duration::from_secs(1);
/// Longest wait for the broker's confirm (connecting included).
const PUBLISH_BUDGET: Duration = Duration::from_secs(2);
/// Limit on one post to a `response_url`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The signature header's value is `v0=` and 64 hex digits; longer is not Slack's.
const MAX_SIGNATURE_LEN: usize = 100;

type HmacSha256 = Hmac<Sha256>;

/// Why a request is not taken to be from Slack. Says nothing a forger could use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request is not signed (X-Slack-Request-Timestamp or X-Slack-Signature missing)")]
    Unsigned,
    #[error("X-Slack-Request-Timestamp is not a Unix time")]
    BadTimestamp,
    #[error(
        "X-Slack-Request-Timestamp is {skew_secs} s from the worker's clock (at most {MAX_SKEW_SECS} s): a replay, or a clock far off"
    )]
    Stale { skew_secs: i64 },
    #[error(
        "X-Slack-Signature does not match (another app's request, or the wrong SLACK_SIGNING_SECRET)"
    )]
    Mismatch,
}

impl SignatureError {
    /// The metric label.
    fn result(self) -> &'static str {
        match self {
            SignatureError::Stale { .. } => "stale",
            _ => "bad_signature",
        }
    }
}

fn mac(secret: &Secret, timestamp: &str, body: &[u8]) -> Option<HmacSha256> {
    // HMAC takes keys of any length: `None` cannot happen, and is a refusal if it does.
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes()).ok()?;
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    Some(mac)
}

/// The `X-Slack-Signature` Slack sends for `body` at `timestamp`.
pub fn signature(secret: &Secret, timestamp: &str, body: &[u8]) -> Option<String> {
    let mac = mac(secret, timestamp, body)?;
    Some(format!("v0={}", hex::encode(mac.finalize().into_bytes())))
}

/// Checks a request's signature headers against `body` at `now` (Unix seconds).
pub fn verify(
    secret: &Secret,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(timestamp), Some(signature)) = (
        timestamp.filter(|t| !t.is_empty()),
        signature.filter(|s| !s.is_empty()),
    ) else {
        return Err(SignatureError::Unsigned);
    };
    let at: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew_secs = now.saturating_sub(at).saturating_abs();
    if skew_secs > MAX_SKEW_SECS {
        return Err(SignatureError::Stale { skew_secs });
    }
    if signature.len() > MAX_SIGNATURE_LEN {
        return Err(SignatureError::Mismatch);
    }
    let given = signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Mismatch)?;
    // `verify_slice` compares in constant time: how much of a forged
    // signature matched leaks nothing through the answer's timing.
    mac(secret, timestamp, body)
        .ok_or(SignatureError::Mismatch)?
        .verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// What the endpoint needs; built once at start.
pub struct Interactions {
    setup: Setup,
}

enum Setup {
    /// Interactivity is off: the sentence that says what to set.
    Off(&'static str),
    Ready(Box<Ready>),
}

struct Ready {
    signing_secret: Secret,
    incidents: Incidents,
    publisher: AckPublisher,
    responder: Responder,
    /// `delivery.incident_ttl`, for "no longer tracked".
    incident_ttl: Duration,
    /// `amqp.max_body_bytes`: the event must be one the worker accepts.
    max_event_bytes: usize,
}

/// How long a request's signature is remembered: longer than the
/// timestamps accepted either side of now, so a replay is either stale or seen.
const REPLAY_WINDOW: Duration = Duration::from_secs(2 * MAX_SKEW_SECS as u64 + 60);

const OFF: &str = "Slack interactivity is off: set SLACK_SIGNING_SECRET (the app's Basic Information page) \
     in the worker's environment and restart it; until then the Acknowledge button does nothing.";

impl Interactions {
    /// On with a signing secret; off (503) without. `incidents` is the
    /// worker's store (`delivery.incident_ttl`, the Redis key prefix).
    pub fn new(
        settings: &Settings,
        secrets: &Secrets,
        incidents: Incidents,
    ) -> Result<Interactions, reqwest::Error> {
        let Some(signing_secret) = secrets.slack_signing_secret.clone() else {
            return Ok(Interactions {
                setup: Setup::Off(OFF),
            });
        };
        Ok(Interactions {
            setup: Setup::Ready(Box::new(Ready {
                signing_secret,
                incidents,
                publisher: AckPublisher {
                    url: settings.amqp.url.clone(),
                    connection_name: format!(
                        "alert-router worker {} (interactions)",
                        settings.amqp.queue
                    ),
                    exchange: settings.amqp.exchange.clone(),
                    connect_timeout: settings.amqp.connect_timeout,
                    confirm_timeout: settings.amqp.confirm_timeout.min(PUBLISH_BUDGET),
                    open: tokio::sync::Mutex::new(None),
                },
                responder: Responder::new(&settings.slack.api_url)?,
                incident_ttl: settings.delivery.incident_ttl,
                max_event_bytes: settings.amqp.max_body_bytes,
            })),
        })
    }

    /// Says once, at start, whether the Acknowledge button works.
    pub fn log_status(&self) {
        match &self.setup {
            Setup::Off(why) => info!("{why}"),
            Setup::Ready(_) => info!("Slack interactivity is on at {INTERACTIONS_PATH}"),
        }
    }
}

/// The interactivity route, to merge into the worker's HTTP router.
pub fn router(interactions: Interactions) -> Router {
    Router::new()
        .route(INTERACTIONS_PATH, post(interact))
        .with_state(Arc::new(interactions))
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// True when `Content-Length` says the body is over [`MAX_BODY_BYTES`]: it
/// is refused before it is read.
fn declared_too_large(headers: &HeaderMap) -> bool {
    header_str(headers, header::CONTENT_LENGTH.as_str())
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES)
}

/// [`verify`] applied to a request's `X-Slack-Request-Timestamp` and
/// `X-Slack-Signature` headers (a header that is not visible ASCII counts as missing).
pub fn verify_request(
    secret: &Secret,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    verify(
        secret,
        header_str(headers, "x-slack-request-timestamp"),
        header_str(headers, "x-slack-signature"),
        body,
        now,
    )
}

/// What the endpoint makes of a request before it touches Redis or the
/// broker: its size, its signature, then its form body. Public but hidden
/// for the fuzz target `interaction_request` (`fuzz/`), which cannot reach
/// the private `Click`; the endpoint runs the same functions in the same
/// order, with its replay check (Redis) between the signature and the body.
#[doc(hidden)]
pub fn screen_request(secret: &Secret, headers: &HeaderMap, body: &[u8], now: i64) -> Screened {
    if declared_too_large(headers) || body.len() > MAX_BODY_BYTES {
        return Screened::TooLarge;
    }
    if let Err(refused) = verify_request(secret, headers, body, now) {
        return Screened::Refused(refused);
    }
    match Click::read(body) {
        Err(_) => Screened::BadRequest,
        Ok(None) => Screened::NotOurs,
        Ok(Some(click)) => Screened::Click {
            user: click.user.id,
            incident: click.value,
            has_response_url: click.response_url.is_some(),
        },
    }
}

/// [`screen_request`]'s verdict. Holds no `response_url` (a capability).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screened {
    /// 413.
    TooLarge,
    /// 401.
    Refused(SignatureError),
    /// 400: signed, but not a readable interaction.
    BadRequest,
    /// 200 and nothing done: signed, but not a click on our button.
    NotOurs,
    /// A click on Acknowledge by `user`, naming `incident` when its value reads.
    Click {
        user: String,
        incident: Option<AckButtonValue>,
        has_response_url: bool,
    },
}

/// `POST /slack/interactions`.
async fn interact(
    State(interactions): State<Arc<Interactions>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Slack's 3 seconds run from here, whatever comes first.
    let arrived = Instant::now();
    let ready = match &interactions.setup {
        Setup::Off(why) => {
            telemetry::record_interaction("not_configured");
            return plain(StatusCode::SERVICE_UNAVAILABLE, why);
        }
        Setup::Ready(ready) => ready,
    };
    let body = match declared_too_large(&headers) {
        true => None,
        false => axum::body::to_bytes(body, MAX_BODY_BYTES).await.ok(),
    };
    let Some(body) = body else {
        telemetry::record_interaction("bad_request");
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "A Slack interaction is at most 1 MiB.",
        );
    };
    if let Err(refused) = verify_request(
        &ready.signing_secret,
        &headers,
        &body,
        chrono::Utc::now().timestamp(),
    ) {
        telemetry::record_interaction(refused.result());
        warn!(problem = %refused, "Slack interaction refused");
        return plain(
            StatusCode::UNAUTHORIZED,
            "This request is not signed by Slack for this app.",
        );
    }
    // Slack signs every request anew: the same signature twice within the
    // timestamp window is somebody replaying a captured request. (Without
    // Redis the click below cannot act either; it says so.)
    // Keyed in lower case: the signature's hex is accepted in either, and a
    // replay must not pass by changing it. Bounded: a slow Redis must not
    // spend Slack's 3 seconds before the click is even read.
    if let Some(signature) = header_str(&headers, "x-slack-signature")
        && let Ok(Ok(false)) = tokio::time::timeout(
            STORE_BUDGET,
            ready
                .incidents
                .first_sight_of_request(&signature.to_ascii_lowercase(), REPLAY_WINDOW),
        )
        .await
    {
        telemetry::record_interaction("replayed");
        warn!("Slack interaction refused: a replay of a request already seen");
        return plain(
            StatusCode::UNAUTHORIZED,
            "This request was already received once.",
        );
    }
    let click = match Click::read(&body) {
        Err(problem) => {
            telemetry::record_interaction("bad_request");
            warn!(%problem, "Slack interaction not understood");
            return plain(StatusCode::BAD_REQUEST, &problem.to_string());
        }
        Ok(None) => {
            // Signed, but not a click on our button (another component, a
            // shortcut, a modal): nothing to do, and Slack wants a 200.
            telemetry::record_interaction("accepted");
            return StatusCode::OK.into_response();
        }
        Ok(Some(click)) => click,
    };
    let outcome = ready.act(&click, arrived).await;
    telemetry::record_interaction(outcome.result());
    let reply = outcome.reply(ready.incident_ttl);
    let reopen = matches!(outcome, Outcome::PublishFailed);
    // The answer goes now; taking back a failed acknowledgement and telling
    // the clicker happen after it, so Slack's 3 seconds hold.
    let incidents = ready.incidents.clone();
    let responder = ready.responder.clone();
    tokio::spawn(async move {
        if reopen
            && let Some(value) = &click.value
            && let Err(e) = incidents.reopen(&value.w, &value.k, &click.user.id).await
        {
            error!(
                workspace = %value.w, incident = %value.k, error = %e,
                "could not take back an acknowledgement whose event was not published; the incident stays acknowledged"
            );
        }
        if let Some(url) = &click.response_url {
            responder.tell(url, &reply).await;
        }
    });
    StatusCode::OK.into_response()
}

/// Why a signed request cannot be read; each message is for the sender.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("The body has no `payload` form field.")]
    NoPayload,
    #[error("`payload` is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("The click names no user.")]
    NoUser,
}

/// The parts of a `block_actions` payload a click on our button needs.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    user: Option<User>,
    #[serde(default)]
    actions: Vec<Action>,
    #[serde(default)]
    response_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct User {
    id: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Action {
    #[serde(default)]
    action_id: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

/// A click on the Acknowledge button.
#[derive(Debug)]
struct Click {
    /// The clicker.
    user: User,
    /// The incident the button names; `None` when its value cannot be read
    /// (a message from before buttons named their incident).
    value: Option<AckButtonValue>,
    response_url: Option<String>,
}

impl Click {
    /// `Ok(None)`: a valid interaction, but not a click on our button.
    fn read(body: &[u8]) -> Result<Option<Click>, BadRequest> {
        let payload = url::form_urlencoded::parse(body)
            .find(|(name, _)| name == "payload")
            .map(|(_, value)| value)
            .ok_or(BadRequest::NoPayload)?;
        let payload: Value = serde_json::from_str(&payload).map_err(BadRequest::NotJson)?;
        // Any other shape is some other interaction: not ours to refuse.
        let Ok(payload) = serde_json::from_value::<Payload>(payload) else {
            return Ok(None);
        };
        if payload.kind != "block_actions" {
            return Ok(None);
        }
        let Some(action) = payload
            .actions
            .iter()
            .find(|a| a.action_id.as_deref() == Some(ACK_ACTION_ID))
        else {
            return Ok(None);
        };
        let user = payload
            .user
            .filter(|u| !u.id.is_empty())
            .ok_or(BadRequest::NoUser)?;
        let value = action
            .value
            .as_deref()
            .and_then(|v| serde_json::from_str::<AckButtonValue>(v).ok())
            .filter(|v| !v.w.is_empty() && !v.k.is_empty());
        Ok(Some(Click {
            user,
            value,
            response_url: payload.response_url,
        }))
    }
}

/// What a click came to.
#[derive(Debug)]
enum Outcome {
    /// Acknowledged now, and the event is published.
    Acknowledged {
        title: String,
    },
    /// It was acknowledged or resolved before.
    Already(Box<Incident>),
    NotTracked,
    /// The incident store did not answer: whether the click counted is unknown.
    StoreFailed,
    /// Acknowledged, but the event was not confirmed: taken back.
    PublishFailed,
}

impl Outcome {
    fn result(&self) -> &'static str {
        match self {
            Outcome::Acknowledged { .. } => "acknowledged",
            Outcome::Already(_) => "already",
            Outcome::NotTracked => "not_tracked",
            Outcome::StoreFailed => "store_failed",
            Outcome::PublishFailed => "publish_failed",
        }
    }

    /// The ephemeral text for the clicker (mrkdwn: event text is escaped).
    fn reply(&self, incident_ttl: Duration) -> String {
        match self {
            Outcome::Acknowledged { title } => format!(
                "You acknowledged *{}*. Its messages will say so in a moment.",
                escape(title)
            ),
            Outcome::Already(incident) if incident.state == IncidentState::Resolved => {
                "This incident is already resolved; there is nothing to acknowledge.".to_string()
            }
            Outcome::Already(incident) => {
                let by = incident
                    .acknowledged_by
                    .as_deref()
                    .map(|who| format!(" by {}", mention(who)))
                    .unwrap_or_default();
                let at = incident
                    .acknowledged_at_ms
                    .and_then(|ms| i64::try_from(ms / 1000).ok())
                    .map(slack_date)
                    .unwrap_or_default();
                format!("This incident was already acknowledged{by}{at}; nothing changed.")
            }
            Outcome::NotTracked => format!(
                "This incident is no longer tracked (resolved and begun again since, or older than delivery.incident_ttl, {}); nothing was changed.",
                humantime::format_duration(incident_ttl)
            ),
            Outcome::StoreFailed => "Your acknowledgement did not go through: the incident store did not answer. Please try again in a moment.".to_string(),
            Outcome::PublishFailed => "Your acknowledgement did not go through: the message queue did not take it. Nothing changed; please try again in a moment.".to_string(),
        }
    }
}

/// `<@U…>` for a Slack user id (Slack shows the name), else the name escaped.
fn mention(who: &str) -> String {
    let is_user_id = who.len() >= 2
        && who.len() <= 32
        && (who.starts_with('U') || who.starts_with('W'))
        && who
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if is_user_id {
        format!("<@{who}>")
    } else {
        escape(who)
    }
}

/// Slack's date formatting: shown in the reader's time zone, with a UTC fallback.
fn slack_date(unix: i64) -> String {
    let fallback = chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default();
    format!(" <!date^{unix}^{{date_short_pretty}} at {{time}}|{fallback}>")
}

impl Ready {
    async fn act(&self, click: &Click, arrived: Instant) -> Outcome {
        let deadline = arrived + ANSWER_BUDGET;
        let user = &click.user;
        let Some(value) = &click.value else {
            return Outcome::NotTracked;
        };
        // A replayed request (the same signed body within the 5 minutes) is
        // a second click like any other: the script changes an open incident
        // only, so it finds it acknowledged and nothing is published twice.
        let acknowledged = tokio::time::timeout(
            STORE_BUDGET,
            self.incidents
                .acknowledge(&value.w, &value.k, value.f, &user.id),
        )
        .await;
        let incident = match acknowledged {
            Ok(Ok(Acknowledgement::Acknowledged(incident))) => incident,
            Ok(Ok(Acknowledgement::Already(incident))) => {
                return Outcome::Already(Box::new(incident));
            }
            Ok(Ok(Acknowledgement::NotTracked)) => return Outcome::NotTracked,
            Ok(Err(e)) => {
                error!(workspace = %value.w, incident = %value.k, error = %e, "cannot acknowledge");
                return Outcome::StoreFailed;
            }
            Err(_) => {
                error!(workspace = %value.w, incident = %value.k, after = ?STORE_BUDGET, "cannot acknowledge: Redis did not answer");
                return Outcome::StoreFailed;
            }
        };
        let event = match acknowledged_event(
            &value.w,
            &value.k,
            user,
            &incident,
            self.max_event_bytes,
        ) {
            Ok(event) => event,
            Err(e) => {
                error!(workspace = %value.w, incident = %value.k, error = %e, "cannot build the escalation.acknowledged event");
                return Outcome::PublishFailed;
            }
        };
        let within = deadline
            .saturating_duration_since(Instant::now())
            .min(PUBLISH_BUDGET);
        match self.publisher.publish(&event.id, &event.body, within).await {
            Ok(()) => {
                info!(
                    workspace = %value.w, incident = %value.k, user = %user.id, event = %event.id,
                    "incident acknowledged in Slack; escalation.acknowledged published"
                );
                Outcome::Acknowledged { title: event.title }
            }
            // Taken back (in the reply task) so that a second click can try
            // again. A confirm that only timed out may still be stored; its
            // event then acknowledges the incident when the worker handles
            // it, and the worst case after a second click is a second
            // escalation.acknowledged (with its own id).
            Err(e) => {
                error!(
                    workspace = %value.w, incident = %value.k, error = %e,
                    "escalation.acknowledged not confirmed; the acknowledgement is taken back"
                );
                Outcome::PublishFailed
            }
        }
    }
}

/// An `escalation.acknowledged` event ready to publish.
struct AckEvent {
    id: String,
    title: String,
    body: Vec<u8>,
}

/// The event a click publishes: the incident's key verbatim as `dedup_key`
/// (so it joins the same incident), severity and title from its first event,
/// and the clicker as `acknowledged_by`. The first event's routing fields
/// (`source`, `labels`, `ticket`, `assignee`, `level`, `targets`) come along
/// too, so the rules send the acknowledgement where the incident went rather
/// than only to the default channel.
fn acknowledged_event(
    workspace: &str,
    key: &str,
    user: &User,
    incident: &Incident,
    max_bytes: usize,
) -> Result<AckEvent, crate::event::EventError> {
    let first: Option<Event> = incident
        .first_event
        .as_deref()
        .and_then(|json| serde_json::from_str(json).ok());
    // Kept since the first event (the store writes it with the incident); a
    // record without it still gets a valid, if plainer, event.
    let severity = first
        .as_ref()
        .map(|e| e.severity)
        .or(incident.severity)
        .unwrap_or(Severity::Info);
    let title = first
        .as_ref()
        .map(|e| e.title.clone())
        .unwrap_or_else(|| format!("Incident {key}"));
    let acknowledged_at_ms = incident.acknowledged_at_ms.unwrap_or_default();
    // The same acknowledgement always gets the same id; a later one (after
    // a failed publish was taken back) another.
    let digest = Sha256::new()
        .chain_update(workspace.as_bytes())
        .chain_update([0])
        .chain_update(key.as_bytes())
        .chain_update([0])
        .chain_update(user.id.as_bytes())
        .chain_update([0])
        .chain_update(acknowledged_at_ms.to_be_bytes())
        .finalize();
    let id = format!("ack-{}", &hex::encode(digest)[..20]);
    let name = user
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| user.username.clone().filter(|n| !n.is_empty()));
    let mut acknowledged_by = json!({"slack_user": user.id});
    if let Some(name) = name {
        acknowledged_by["name"] = json!(name);
    }
    let mut event = json!({
        "id": id,
        "type": ACKNOWLEDGED_TYPE,
        "severity": severity,
        "title": title,
        "workspace": workspace,
        "dedup_key": key,
        "acknowledged_by": acknowledged_by,
    });
    if let Some(at) = i64::try_from(acknowledged_at_ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
    {
        event["occurred_at"] = json!(at.to_rfc3339());
    }
    if let Some(first) = &first {
        let carried = json!({
            "source": first.source,
            "labels": first.labels,
            "ticket": first.ticket,
            "assignee": first.assignee,
            "level": first.level,
            "targets": first.targets,
        });
        if let (Some(event), Some(carried)) = (event.as_object_mut(), carried.as_object()) {
            for (field, value) in carried {
                if !value.is_null() {
                    event.insert(field.clone(), value.clone());
                }
            }
        }
    }
    let body = event.to_string().into_bytes();
    // What the worker would refuse as poison is not published.
    Event::decode(&body, max_bytes)?;
    Ok(AckEvent { id, title, body })
}

/// Why the event was not published.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ did not take it within {0:?}")]
    Timeout(Duration),
}

/// The endpoint's own confirm channel, on a connection of its own: opened
/// at the first click, and again after any failure, so it outlives broker
/// restarts without depending on the consuming loop's connections.
struct AckPublisher {
    url: SecretUrl,
    connection_name: String,
    exchange: String,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    open: tokio::sync::Mutex<Option<OpenPublisher>>,
}

struct OpenPublisher {
    connection: lapin::Connection,
    publisher: Publisher,
}

impl AckPublisher {
    /// Publishes with confirms, giving up after `within` (connecting included).
    async fn publish(&self, id: &str, body: &[u8], within: Duration) -> Result<(), PublishError> {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
        let attempt = async {
            let publisher = self.publisher().await?;
            publisher
                .publish(&self.exchange, ACKNOWLEDGED_TYPE, body, properties)
                .await
        };
        let result = match tokio::time::timeout(within, attempt).await {
            Ok(result) => result.map_err(PublishError::from),
            Err(_) => Err(PublishError::Timeout(within)),
        };
        if result.is_err() {
            // Whatever went wrong, the next click starts on a fresh channel.
            self.forget().await;
        }
        result
    }

    /// The open confirm channel, opening one if there is none or it died.
    async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let mut open = self.open.lock().await;
        if let Some(current) = open.as_ref()
            && current.connection.status().connected()
            && current.publisher.channel().status().connected()
        {
            return Ok(current.publisher.clone());
        }
        if let Some(dead) = open.take() {
            close_later(dead, self.connect_timeout);
        }
        let connection = broker::connect_within(
            self.url.expose(),
            &self.connection_name,
            self.connect_timeout,
        )
        .await?;
        let publisher = Publisher::open(&connection)
            .await?
            .with_confirm_timeout(self.confirm_timeout);
        *open = Some(OpenPublisher {
            connection,
            publisher: publisher.clone(),
        });
        Ok(publisher)
    }

    async fn forget(&self) {
        if let Some(old) = self.open.lock().await.take() {
            close_later(old, self.connect_timeout);
        }
    }
}

/// Closes a connection the endpoint no longer uses, off the request's path.
fn close_later(old: OpenPublisher, timeout: Duration) {
    tokio::spawn(async move {
        broker::close_within(&old.connection, timeout, "reopening").await;
    });
}

/// Posts the ephemeral answers to `response_url`s.
#[derive(Clone)]
struct Responder {
    http: reqwest::Client,
    /// `slack.api_url`'s host and port: plain HTTP is allowed there only.
    slack_origin: Option<(String, u16)>,
}

impl Responder {
    fn new(api_url: &str) -> Result<Responder, reqwest::Error> {
        let http = reqwest::Client::builder()
            // A response_url answers where it is; following a redirect would
            // carry the post somewhere the check below never saw.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(RESPONSE_TIMEOUT)
            .user_agent(concat!("alert-router/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let slack_origin = url::Url::parse(api_url)
            .ok()
            .and_then(|url| Some((url.host_str()?.to_string(), url.port_or_known_default()?)));
        Ok(Responder { http, slack_origin })
    }

    /// Whether the worker may post to `url`. The URL comes out of a request
    /// body: the signature says Slack sent it, but were the signing secret
    /// ever leaked, an unchecked URL would let anyone make the worker POST
    /// into its own network (a cloud metadata endpoint, an admin port), all
    /// of it plain HTTP. Slack's `response_url`s are HTTPS; plain HTTP is
    /// allowed only to the Slack the worker is configured to call
    /// (`slack.api_url`: a test's fake, or a proxy an operator chose).
    fn allows(&self, url: &url::Url) -> bool {
        match url.scheme() {
            "https" => url.host_str().is_some(),
            "http" => match (
                &self.slack_origin,
                url.host_str(),
                url.port_or_known_default(),
            ) {
                (Some((host, port)), Some(h), Some(p)) => h == host && p == *port,
                _ => false,
            },
            _ => false,
        }
    }

    /// Tells the clicker, and only the clicker, `text`.
    async fn tell(&self, response_url: &str, text: &str) {
        let url = match url::Url::parse(response_url) {
            Ok(url) if self.allows(&url) => url,
            _ => {
                warn!(
                    "not answering the click: its response_url is not an https URL (nor slack.api_url's host)"
                );
                return;
            }
        };
        let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text});
        match self.http.post(url).json(&body).send().await {
            Ok(answer) if answer.status().is_success() => {}
            // The URL itself is a credential of sorts: only the status is logged.
            Ok(answer) => warn!(status = %answer.status(), "Slack refused the answer to a click"),
            Err(e) => {
                warn!(error = %e.without_url(), "could not answer a click through its response_url")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    // The worked example in Slack's "Verifying requests from Slack".
    const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const DOC_TIMESTAMP: &str = "1531420618";
    const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const DOC_SIGNATURE: &str =
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
    const DOC_NOW: i64 = 1_531_420_618;

    fn doc_secret() -> Secret {
        Secret::new(DOC_SECRET)
    }

    fn check(
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &str,
        now: i64,
    ) -> Result<(), SignatureError> {
        verify(&doc_secret(), timestamp, signature, body.as_bytes(), now)
    }

    #[test]
    fn a_request_is_screened_for_size_then_signature_then_body() {
        let click = "payload=%7B%22type%22%3A%22block_actions%22%2C%22user%22%3A%7B%22id%22%3A%22U0ANA%22%7D%2C%22actions%22%3A%5B%7B%22action_id%22%3A%22alert_router_ack%22%7D%5D%7D";
        let signed = |body: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-slack-request-timestamp", DOC_TIMESTAMP.parse().unwrap());
            let signature = signature(&doc_secret(), DOC_TIMESTAMP, body.as_bytes()).unwrap();
            headers.insert("x-slack-signature", signature.parse().unwrap());
            headers
        };
        let screen = |headers: &HeaderMap, body: &str| {
            screen_request(&doc_secret(), headers, body.as_bytes(), DOC_NOW)
        };
        assert_eq!(
            screen(&signed(click), click),
            Screened::Click {
                user: "U0ANA".into(),
                incident: None,
                has_response_url: false
            }
        );
        assert_eq!(screen(&signed("other=1"), "other=1"), Screened::BadRequest);
        assert_eq!(
            screen(&signed(click), "payload=%7B%7D"),
            Screened::Refused(SignatureError::Mismatch)
        );
        let mut declared_large = signed(click);
        declared_large.insert(
            header::CONTENT_LENGTH,
            (MAX_BODY_BYTES + 1).to_string().parse().unwrap(),
        );
        assert_eq!(screen(&declared_large, click), Screened::TooLarge);
    }

    #[test]
    fn slacks_worked_example_signs_and_verifies() {
        assert_eq!(
            signature(&doc_secret(), DOC_TIMESTAMP, DOC_BODY.as_bytes()).as_deref(),
            Some(DOC_SIGNATURE)
        );
        assert_eq!(
            check(Some(DOC_TIMESTAMP), Some(DOC_SIGNATURE), DOC_BODY, DOC_NOW),
            Ok(())
        );
        assert_eq!(
            check(
                Some(DOC_TIMESTAMP),
                Some(&DOC_SIGNATURE.to_uppercase().replace("V0=", "v0=")),
                DOC_BODY,
                DOC_NOW
            ),
            Ok(()),
            "hex digits in either case"
        );
    }

    #[test]
    fn a_changed_body_timestamp_signature_or_secret_does_not_verify() {
        let tampered = DOC_BODY.replace("roadrunner", "coyote");
        assert_eq!(
            check(Some(DOC_TIMESTAMP), Some(DOC_SIGNATURE), &tampered, DOC_NOW),
            Err(SignatureError::Mismatch)
        );
        // A timestamp one second off, still within the window: the MAC covers it.
        assert_eq!(
            check(Some("1531420619"), Some(DOC_SIGNATURE), DOC_BODY, DOC_NOW),
            Err(SignatureError::Mismatch)
        );
        let mut flipped = DOC_SIGNATURE.to_string();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '3' { '4' } else { '3' });
        assert_eq!(
            check(Some(DOC_TIMESTAMP), Some(&flipped), DOC_BODY, DOC_NOW),
            Err(SignatureError::Mismatch)
        );
        for malformed in [
            "a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v1=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            "v0=a2114d57",
            "v0=zz",
            "v0=",
        ] {
            assert_eq!(
                check(Some(DOC_TIMESTAMP), Some(malformed), DOC_BODY, DOC_NOW),
                Err(SignatureError::Mismatch),
                "{malformed}"
            );
        }
        let long = format!("{DOC_SIGNATURE}{}", "0".repeat(200));
        assert_eq!(
            check(Some(DOC_TIMESTAMP), Some(&long), DOC_BODY, DOC_NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                &Secret::new("another-secret"),
                Some(DOC_TIMESTAMP),
                Some(DOC_SIGNATURE),
                DOC_BODY.as_bytes(),
                DOC_NOW
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn the_timestamp_must_be_within_five_minutes_either_way() {
        assert_eq!(
            check(
                Some(DOC_TIMESTAMP),
                Some(DOC_SIGNATURE),
                DOC_BODY,
                DOC_NOW + 300
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Some(DOC_TIMESTAMP),
                Some(DOC_SIGNATURE),
                DOC_BODY,
                DOC_NOW - 300
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Some(DOC_TIMESTAMP),
                Some(DOC_SIGNATURE),
                DOC_BODY,
                DOC_NOW + 301
            ),
            Err(SignatureError::Stale { skew_secs: 301 })
        );
        assert_eq!(
            check(
                Some(DOC_TIMESTAMP),
                Some(DOC_SIGNATURE),
                DOC_BODY,
                DOC_NOW - 360
            ),
            Err(SignatureError::Stale { skew_secs: 360 })
        );
        // Stale wins over a bad signature: no MAC work for old requests.
        assert!(matches!(
            check(Some("1"), Some("v0=00"), DOC_BODY, DOC_NOW),
            Err(SignatureError::Stale { .. })
        ));
    }

    #[test]
    fn missing_or_malformed_headers_are_refused() {
        assert_eq!(
            check(None, Some(DOC_SIGNATURE), DOC_BODY, DOC_NOW),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            check(Some(DOC_TIMESTAMP), None, DOC_BODY, DOC_NOW),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            check(Some(""), Some(""), DOC_BODY, DOC_NOW),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            check(Some("yesterday"), Some(DOC_SIGNATURE), DOC_BODY, DOC_NOW),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            check(
                Some("99999999999999999999999"),
                Some(DOC_SIGNATURE),
                DOC_BODY,
                DOC_NOW
            ),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(SignatureError::Unsigned.result(), "bad_signature");
        assert_eq!(SignatureError::Stale { skew_secs: 400 }.result(), "stale");
    }

    #[test]
    fn errors_never_show_the_secret() {
        for e in [
            SignatureError::Unsigned,
            SignatureError::BadTimestamp,
            SignatureError::Stale { skew_secs: 1 },
            SignatureError::Mismatch,
        ] {
            assert!(!e.to_string().contains(DOC_SECRET));
        }
    }

    fn form(payload: &Value) -> Bytes {
        Bytes::from(
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("payload", &payload.to_string())
                .finish(),
        )
    }

    fn click_payload(value: &str) -> Value {
        json!({
            "type": "block_actions",
            "user": {"id": "U0ANA", "username": "ana", "name": "ana", "team_id": "T1"},
            "team": {"id": "T1", "domain": "acme"},
            "container": {"type": "message", "message_ts": "1.2", "channel_id": "C1", "is_ephemeral": false},
            "response_url": "https://hooks.slack.com/actions/T1/1/abc",
            "actions": [{"type": "button", "action_id": ACK_ACTION_ID, "block_id": "b", "value": value, "action_ts": "1.3"}],
        })
    }

    #[test]
    fn a_click_on_the_button_is_read_and_anything_else_is_left_alone() {
        let click = Click::read(&form(&click_payload(r#"{"w":"T1","k":"chk-1"}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(click.user.id, "U0ANA");
        assert_eq!(
            click.value,
            Some(AckButtonValue {
                w: "T1".into(),
                k: "chk-1".into(),
                f: None,
            })
        );
        assert_eq!(
            click.response_url.as_deref(),
            Some("https://hooks.slack.com/actions/T1/1/abc")
        );

        let old_button = Click::read(&form(&click_payload("esc-2041-2")))
            .unwrap()
            .unwrap();
        assert_eq!(
            old_button.value, None,
            "a value from before buttons named incidents"
        );

        let mut other = click_payload("x");
        other["actions"][0]["action_id"] = json!("open_ticket");
        assert!(Click::read(&form(&other)).unwrap().is_none());
        assert!(
            Click::read(&form(&json!({"type": "view_submission"})))
                .unwrap()
                .is_none()
        );
        assert!(
            Click::read(&form(&json!(["not", "an", "object"])))
                .unwrap()
                .is_none()
        );

        assert!(matches!(
            Click::read(&Bytes::from_static(b"payload=%7Bnot")),
            Err(BadRequest::NotJson(_))
        ));
        assert!(matches!(
            Click::read(&Bytes::from_static(b"other=1")),
            Err(BadRequest::NoPayload)
        ));
        let mut anonymous = click_payload(r#"{"w":"T1","k":"chk-1"}"#);
        anonymous.as_object_mut().unwrap().remove("user");
        assert!(matches!(
            Click::read(&form(&anonymous)),
            Err(BadRequest::NoUser)
        ));
    }

    fn incident(first_event: Option<&str>) -> Incident {
        Incident {
            state: IncidentState::Acknowledged,
            severity: Some(Severity::High),
            level: None,
            first_event: first_event.map(str::to_string),
            first_at_ms: 1_800_000_000_000,
            acknowledged_by: Some("U0ANA".into()),
            acknowledged_at_ms: Some(1_800_000_060_000),
            resolved_at_ms: None,
            messages: Default::default(),
            emailed: Default::default(),
        }
    }

    fn ana() -> User {
        User {
            id: "U0ANA".into(),
            username: Some("ana.ruiz".into()),
            name: Some("Ana Ruiz".into()),
        }
    }

    #[test]
    fn the_acknowledged_event_names_the_incident_and_the_clicker_and_validates() {
        let first = r#"{"id":"e-1","type":"escalation.triggered","severity":"critical","title":"Checkout <down>",
            "workspace":"T1","dedup_key":"chk-1","source":"aexy","labels":{"team":"payments"},
            "ticket":{"number":"TCK-1"},"level":2,"targets":[{"slack_channel":"C0PAY"}],"summary":"long text"}"#;
        let event =
            acknowledged_event("T1", "chk-1", &ana(), &incident(Some(first)), 256 * 1024).unwrap();
        let decoded = Event::decode(&event.body, 256 * 1024).unwrap();
        assert_eq!(decoded.id, event.id);
        assert!(
            event.id.starts_with("ack-") && event.id.len() == 24,
            "{}",
            event.id
        );
        assert_eq!(decoded.kind, "escalation.acknowledged");
        assert_eq!(decoded.severity, Severity::Critical);
        assert_eq!(decoded.title, "Checkout <down>");
        assert_eq!(decoded.workspace.as_deref(), Some("T1"));
        assert_eq!(decoded.dedup_key.as_deref(), Some("chk-1"));
        let by = decoded.acknowledged_by.clone().unwrap();
        assert_eq!(by.slack_user.as_deref(), Some("U0ANA"));
        assert_eq!(by.name.as_deref(), Some("Ana Ruiz"));
        assert_eq!(
            decoded.labels.as_ref().unwrap()["team"],
            "payments",
            "routed like the incident"
        );
        assert_eq!(decoded.source.as_deref(), Some("aexy"));
        assert_eq!(decoded.level, Some(2));
        assert_eq!(decoded.own_targets().len(), 1);
        assert_eq!(decoded.summary, None, "only what routes it comes along");
        assert!(decoded.occurred_at.is_some());

        let again =
            acknowledged_event("T1", "chk-1", &ana(), &incident(Some(first)), 256 * 1024).unwrap();
        assert_eq!(again.id, event.id, "the same acknowledgement, the same id");
        let mut later = incident(Some(first));
        later.acknowledged_at_ms = Some(1_800_000_120_000);
        assert_ne!(
            acknowledged_event("T1", "chk-1", &ana(), &later, 256 * 1024)
                .unwrap()
                .id,
            event.id
        );
    }

    #[test]
    fn without_its_first_event_the_incident_still_gets_a_valid_event() {
        let anonymous = User {
            id: "U0BOB".into(),
            username: Some("bob".into()),
            name: None,
        };
        let event = acknowledged_event(
            "T1",
            "ticket:TCK-9",
            &anonymous,
            &incident(None),
            256 * 1024,
        )
        .unwrap();
        let decoded = Event::decode(&event.body, 256 * 1024).unwrap();
        assert_eq!(
            decoded.severity,
            Severity::High,
            "the incident's own severity"
        );
        assert_eq!(decoded.title, "Incident ticket:TCK-9");
        assert_eq!(
            decoded.dedup_key.as_deref(),
            Some("ticket:TCK-9"),
            "the key verbatim"
        );
        assert_eq!(
            decoded.acknowledged_by.unwrap().name.as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn an_event_the_worker_would_refuse_is_not_built() {
        let key = "k".repeat(201);
        assert!(acknowledged_event("T1", &key, &ana(), &incident(None), 256 * 1024).is_err());
    }

    #[test]
    fn the_clicker_is_told_what_happened_in_plain_words() {
        let ttl = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(
            Outcome::Acknowledged {
                title: "A <b> & c".into()
            }
            .reply(ttl),
            "You acknowledged *A &lt;b&gt; &amp; c*. Its messages will say so in a moment."
        );
        let already = Outcome::Already(Box::new(incident(None))).reply(ttl);
        assert!(
            already.starts_with(
                "This incident was already acknowledged by <@U0ANA> <!date^1800000060^"
            ),
            "{already}"
        );
        let mut by_name = incident(None);
        by_name.acknowledged_by = Some("Ana <script>".into());
        assert!(
            Outcome::Already(Box::new(by_name))
                .reply(ttl)
                .contains("by Ana &lt;script&gt;")
        );
        let mut resolved = incident(None);
        resolved.state = IncidentState::Resolved;
        assert!(
            Outcome::Already(Box::new(resolved))
                .reply(ttl)
                .contains("already resolved")
        );
        assert_eq!(
            Outcome::NotTracked.reply(ttl),
            "This incident is no longer tracked (resolved and begun again since, or older than delivery.incident_ttl, 7days); nothing was changed."
        );
        assert!(Outcome::PublishFailed.reply(ttl).contains("try again"));
        assert!(Outcome::StoreFailed.reply(ttl).contains("try again"));
    }

    #[test]
    fn answers_go_only_to_https_or_to_the_configured_slack() {
        let responder = Responder::new("http://127.0.0.1:4567/api").unwrap();
        let allows = |u: &str| responder.allows(&url::Url::parse(u).unwrap());
        assert!(allows("https://hooks.slack.com/actions/T1/1/abc"));
        assert!(allows("http://127.0.0.1:4567/actions/T1/1/abc"));
        assert!(!allows("http://127.0.0.1:8080/admin"), "another port");
        assert!(!allows("http://169.254.169.254/latest/meta-data"));
        assert!(!allows("file:///etc/passwd"));
        assert!(!allows("ftp://hooks.slack.com/x"));
        let real = Responder::new("https://slack.com/api").unwrap();
        assert!(
            !real.allows(&url::Url::parse("http://slack.com/api").unwrap()),
            "plain HTTP to slack.com is not Slack's"
        );
    }
}
