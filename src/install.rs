//! Slack OAuth install: `GET /slack/install` sends the installer to Slack's consent page, `GET /slack/oauth/callback` exchanges the code and stores the workspace's token.
//!
//! Served on `http.listen` next to the health endpoints. Needs
//! `SLACK_CLIENT_ID`, `SLACK_CLIENT_SECRET` and `http.public_url` (Slack
//! sends the installer back to `<public_url>/slack/oauth/callback`); without
//! them both pages only say what to set. The token record is written to
//! Redis in the shape [`crate::deliver::slack::tokens`] reads (SPEC §5).
//!
//! The `state` that rides through Slack is `<issued>.<nonce>.<mac>`: unix
//! seconds, 128 random bits, and HMAC-SHA256 over both keyed by
//! `SLACK_CLIENT_SECRET`. It is checked in constant time and lives
//! `slack.oauth_state_ttl` (10 minutes). Stateless on purpose: any replica
//! behind a load balancer checks what another issued, and nothing is stored
//! for a page anyone may open. The client secret is the key because the
//! install cannot work without it anyway, and it is the secret this flow
//! already trusts with tokens; the signing secret belongs to requests from
//! Slack. Binding the state to a browser (a cookie) would add nothing here:
//! the worker has no logged-in users whose session a forged callback could
//! ride, and Slack's codes work once.
//!
//! Nothing secret reaches a page, a log line or a metric: tokens and the
//! client secret go only to Slack and Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use redis::aio::ConnectionManager;
use serde_json::Value;
use sha2::Sha256;
use tracing::{error, info, warn};

use crate::config::{Secret, Secrets, Settings};
use crate::deliver::slack::tokens::{TokenRecord, admin};
use crate::deliver::slack::{Body, SlackClient};
use crate::telemetry;

/// Where Slack sends the installer back, below `http.public_url`.
pub const CALLBACK_PATH: &str = "/slack/oauth/callback";
/// Where an install starts.
pub const INSTALL_PATH: &str = "/slack/install";

/// Separates what this key signs from anything else it might ever sign.
const STATE_CONTEXT: &[u8] = b"alert-router oauth state v1\n";
/// A state issued this far in the future still counts: replicas' clocks differ a little.
const CLOCK_SKEW_SECS: i64 = 60;
/// Longer `state` values are refused before any work.
const MAX_STATE_LEN: usize = 200;

type HmacSha256 = Hmac<Sha256>;

/// Why a `state` is refused. Says nothing a forger could use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the link carries no state")]
    Missing,
    #[error("the link's state is not one this worker issued")]
    Invalid,
    #[error("the link expired (install links work for {ttl_minutes} minutes)")]
    Expired { ttl_minutes: u64 },
}

/// Signs a `state` issued at `issued_at` (unix seconds) with a fresh nonce.
///
/// `None` only if the MAC refused the key, which HMAC never does (it takes
/// keys of any length); the caller answers an error page, not a panic.
pub fn sign_state(key: &Secret, issued_at: i64) -> Option<String> {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    sign_state_with_nonce(key, issued_at, &nonce)
}

fn sign_state_with_nonce(key: &Secret, issued_at: i64, nonce: &str) -> Option<String> {
    let payload = format!("{issued_at}.{nonce}");
    let mac = state_mac(key, &payload)?.finalize().into_bytes();
    Some(format!("{payload}.{}", hex::encode(mac)))
}

fn state_mac(key: &Secret, payload: &str) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key.expose().as_bytes()).ok()?;
    mac.update(STATE_CONTEXT);
    mac.update(payload.as_bytes());
    Some(mac)
}

/// Checks a `state`: our signature (constant-time), then its age at `now`.
pub fn verify_state(
    key: &Secret,
    state: Option<&str>,
    now: i64,
    ttl: Duration,
) -> Result<(), StateError> {
    let state = state.filter(|s| !s.is_empty()).ok_or(StateError::Missing)?;
    if state.len() > MAX_STATE_LEN {
        return Err(StateError::Invalid);
    }
    let (payload, mac_hex) = state.rsplit_once('.').ok_or(StateError::Invalid)?;
    let (issued, nonce) = payload.split_once('.').ok_or(StateError::Invalid)?;
    let issued: i64 = issued.parse().map_err(|_| StateError::Invalid)?;
    if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StateError::Invalid);
    }
    let mac = hex::decode(mac_hex).map_err(|_| StateError::Invalid)?;
    state_mac(key, payload)
        .ok_or(StateError::Invalid)?
        .verify_slice(&mac)
        .map_err(|_| StateError::Invalid)?;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let age = now.saturating_sub(issued);
    if age < -CLOCK_SKEW_SECS {
        // Signed by us, yet from the future: a clock far off, not a forger.
        return Err(StateError::Invalid);
    }
    if age >= ttl_secs {
        return Err(StateError::Expired {
            ttl_minutes: ttl.as_secs().div_ceil(60),
        });
    }
    Ok(())
}

/// What the install pages need; built once at start.
pub struct Install {
    setup: Setup,
}

enum Setup {
    /// Install is off: the sentence that says what to set.
    Off(String),
    Ready(Box<Ready>),
}

struct Ready {
    client_id: String,
    /// The exchange's credential and the `state` key.
    client_secret: Secret,
    /// `slack.oauth_authorize_url`.
    authorize_url: url::Url,
    /// `<http.public_url>/slack/oauth/callback`, sent to Slack twice: it
    /// must be the same both times.
    redirect_uri: String,
    /// Comma-separated, as Slack's authorize URL takes them.
    scopes: String,
    state_ttl: Duration,
    /// The worker's client: `slack.api_url`, timeouts, no redirects.
    slack: SlackClient,
    redis: ConnectionManager,
    key_prefix: String,
    /// `slack.allowed_workspaces` (empty: any) and `slack.default_workspace`.
    allowed_workspaces: Vec<String>,
    default_workspace: Option<String>,
}

impl Install {
    /// Install is on with the client id and secret, a public URL and a
    /// valid authorize URL; otherwise the pages say which is missing.
    pub fn new(
        settings: &Settings,
        secrets: &Secrets,
        slack: SlackClient,
        redis: ConnectionManager,
    ) -> Install {
        let setup = match (
            &secrets.slack_client_id,
            &secrets.slack_client_secret,
            settings.http.public_url(),
        ) {
            (None, _, _) | (_, None, _) => Setup::Off(
                "Slack install is off: set SLACK_CLIENT_ID and SLACK_CLIENT_SECRET \
                 (the app's Basic Information page) in the worker's environment."
                    .into(),
            ),
            (_, _, None) => Setup::Off(
                "Slack install is off: set http.public_url (ALERT_ROUTER__HTTP__PUBLIC_URL) \
                 to the address this worker is reached at, e.g. https://alerts.example.com, \
                 and list <public_url>/slack/oauth/callback under Redirect URLs in the app's \
                 OAuth & Permissions page."
                    .into(),
            ),
            (Some(client_id), Some(client_secret), Some(public_url)) => {
                match url::Url::parse(&settings.slack.oauth_authorize_url) {
                    Err(e) => Setup::Off(format!(
                        "Slack install is off: slack.oauth_authorize_url is not a URL ({e})."
                    )),
                    Ok(authorize_url) => Setup::Ready(Box::new(Ready {
                        client_id: client_id.clone(),
                        client_secret: client_secret.clone(),
                        authorize_url,
                        redirect_uri: format!(
                            "{}{CALLBACK_PATH}",
                            public_url.trim_end_matches('/')
                        ),
                        scopes: settings.slack.oauth_scopes.join(","),
                        state_ttl: settings.slack.oauth_state_ttl,
                        slack,
                        redis,
                        key_prefix: settings.redis.key_prefix.clone(),
                        allowed_workspaces: settings.slack.allowed_workspaces.clone(),
                        default_workspace: settings.slack.default_workspace.clone(),
                    })),
                }
            }
        };
        Install { setup }
    }

    /// Says once, at start, whether install is on and where Slack comes back.
    pub fn log_status(&self) {
        match &self.setup {
            Setup::Off(why) => info!("{why}"),
            Setup::Ready(ready) => info!(
                redirect_uri = %ready.redirect_uri,
                scopes = %ready.scopes,
                "Slack install is on at {INSTALL_PATH}"
            ),
        }
    }
}

/// The install routes, to merge into the worker's HTTP router.
pub fn router(install: Install) -> Router {
    Router::new()
        .route(INSTALL_PATH, get(start))
        .route(CALLBACK_PATH, get(callback))
        .with_state(Arc::new(install))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `GET /slack/install`: to Slack's consent page with a fresh state.
async fn start(State(install): State<Arc<Install>>) -> Response {
    let ready = match &install.setup {
        Setup::Off(why) => return not_configured(why),
        Setup::Ready(ready) => ready,
    };
    let Some(state) = sign_state(&ready.client_secret, now()) else {
        telemetry::record_install("not_configured");
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Slack install is off",
            "The install link could not be signed with SLACK_CLIENT_SECRET.",
            "Check the secret and restart the worker.",
        );
    };
    let mut url = ready.authorize_url.clone();
    url.query_pairs_mut()
        .append_pair("client_id", &ready.client_id)
        .append_pair("scope", &ready.scopes)
        .append_pair("redirect_uri", &ready.redirect_uri)
        .append_pair("state", &state);
    telemetry::record_install("started");
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(url.as_str()) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /slack/oauth/callback`: state, then code → token → Redis.
async fn callback(State(install): State<Arc<Install>>, RawQuery(query): RawQuery) -> Response {
    let ready = match &install.setup {
        Setup::Off(why) => return not_configured(why),
        Setup::Ready(ready) => ready,
    };
    let params: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let outcome = complete(ready, &params).await;
    match &outcome {
        Ok(done) => {
            telemetry::record_install("installed");
            info!(
                workspace = %done.team_id,
                rotating = done.rotating,
                scopes = %done.scopes,
                "Slack install: token stored"
            );
        }
        Err(failure) => {
            telemetry::record_install(failure.result());
            match failure {
                Failure::Store(e) => error!(error = %e, "Slack install failed"),
                _ => warn!(problem = %failure, "Slack install refused"),
            }
        }
    }
    match outcome {
        Ok(done) => page(
            StatusCode::OK,
            "alert-router installed",
            &format!(
                "Installed alert-router in workspace {} ({}).",
                done.team_name, done.team_id
            ),
            &format!(
                "Bot scopes granted: {}. {}",
                done.scopes,
                if done.rotating {
                    "Token rotation is on: the worker refreshes the token before it expires."
                } else {
                    "The token does not expire."
                }
            ),
        ),
        Err(failure) => page(
            failure.status(),
            "alert-router was not installed",
            &failure.to_string(),
            &format!("Nothing was stored. To try again, open {INSTALL_PATH}."),
        ),
    }
}

/// What a successful install stored, for the page and the log.
struct Installed {
    team_id: String,
    team_name: String,
    scopes: String,
    rotating: bool,
}

/// Why an install did not happen; each message is for the person at the browser.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("The install was cancelled in Slack (access_denied).")]
    Denied,
    #[error("Slack did not complete the install ({0}).")]
    SlackRefused(String),
    #[error("This install link cannot be used: {0}.")]
    State(#[from] StateError),
    #[error("Slack's answer carries no code.")]
    NoCode,
    #[error("{}", explain(.0))]
    Exchange(crate::deliver::slack::SlackError),
    #[error(
        "Slack's answer has no bot token (token_type {0:?}); the app needs at least one bot scope."
    )]
    NoBotToken(String),
    #[error(
        "This was an organisation-wide (Enterprise Grid) install; alert-router stores a token per workspace: install it into each workspace instead."
    )]
    EnterpriseInstall,
    #[error(
        "Workspace {0} is not in slack.allowed_workspaces; add it there, or remove the app from that workspace."
    )]
    NotAllowed(String),
    #[error("The token could not be stored in Redis ({0}); try again once Redis is back.")]
    Store(redis::RedisError),
}

impl Failure {
    /// The metric label.
    fn result(&self) -> &'static str {
        match self {
            Failure::Denied => "denied",
            Failure::State(_) | Failure::NoCode => "bad_state",
            Failure::SlackRefused(_)
            | Failure::Exchange(_)
            | Failure::NoBotToken(_)
            | Failure::EnterpriseInstall => "slack_error",
            Failure::NotAllowed(_) => "refused",
            Failure::Store(_) => "store_failed",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Failure::Denied
            | Failure::SlackRefused(_)
            | Failure::State(_)
            | Failure::NoCode
            | Failure::EnterpriseInstall => StatusCode::BAD_REQUEST,
            Failure::NotAllowed(_) => StatusCode::FORBIDDEN,
            Failure::Exchange(e) if e.is_transient() => StatusCode::BAD_GATEWAY,
            Failure::Exchange(e) => match e.code.as_str() {
                "invalid_code"
                | "invalid_grant_type"
                | "cannot_install_an_org_installed_app"
                | "user_email_unverified" => StatusCode::BAD_REQUEST,
                // The worker's settings or secrets are wrong.
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Failure::NoBotToken(_) => StatusCode::BAD_GATEWAY,
            Failure::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `oauth.v2.access`'s error codes in plain words.
fn explain(e: &crate::deliver::slack::SlackError) -> String {
    let code = e.code.as_str();
    let what = match code {
        "invalid_code" => {
            "the code was already used or has expired; each works once, within 10 minutes"
        }
        "bad_redirect_uri" => {
            "the redirect URL differs from the one the install started with; \
             http.public_url must give the same <public_url>/slack/oauth/callback on every replica"
        }
        "invalid_client_id" => "SLACK_CLIENT_ID is not this app's client id",
        "bad_client_secret" => "SLACK_CLIENT_SECRET is not this app's client secret",
        "oauth_authorization_url_mismatch" => {
            "the install did not start at Slack's v2 authorize URL; \
             slack.oauth_authorize_url must be https://slack.com/oauth/v2/authorize"
        }
        "cannot_install_an_org_installed_app" => {
            "the app is installed for the whole organisation and cannot be installed into one workspace"
        }
        "user_email_unverified" => {
            "the Slack account installing the app has not verified its email address; \
             verify it in Slack, then install again"
        }
        _ if e.is_transient() => "Slack could not be reached or failed; try again in a minute",
        _ => "Slack refused the exchange",
    };
    format!("Slack did not give a token ({code}): {what}.")
}

async fn complete(ready: &Ready, params: &HashMap<String, String>) -> Result<Installed, Failure> {
    if let Some(error) = params.get("error") {
        return Err(if error == "access_denied" {
            Failure::Denied
        } else {
            Failure::SlackRefused(slack_code(error))
        });
    }
    verify_state(
        &ready.client_secret,
        params.get("state").map(String::as_str),
        now(),
        ready.state_ttl,
    )?;
    let code = params
        .get("code")
        .filter(|c| !c.is_empty())
        .ok_or(Failure::NoCode)?;
    let form = [
        ("code", code.as_str()),
        ("redirect_uri", ready.redirect_uri.as_str()),
        ("client_id", ready.client_id.as_str()),
        ("client_secret", ready.client_secret.expose()),
    ];
    // Once only: a code works once, so a retry after a lost answer could
    // only earn `invalid_code`; the installer starts again instead.
    let reply = ready
        .slack
        .call_once("oauth.v2.access", None, &Body::Form(&form))
        .await
        .map_err(Failure::Exchange)?;
    let grant = Grant::read(&reply)?;
    if !(ready.allowed_workspaces.is_empty()
        || ready.default_workspace.as_deref() == Some(grant.record.team_id.as_str())
        || ready.allowed_workspaces.contains(&grant.record.team_id))
    {
        // Slack installed the app when it issued the token: revoked, the
        // refused workspace is not left holding a working bot token.
        // Retried like any call (revoking twice does no harm); a retry
        // after a lost answer finds the token already revoked.
        let revoked = ready
            .slack
            .call(
                "auth.revoke",
                Some(&grant.record.access_token),
                &Body::Form(&[]),
            )
            .await;
        if let Err(e) = revoked
            && !matches!(e.code.as_str(), "token_revoked" | "invalid_auth")
        {
            warn!(team = %grant.record.team_id, error = %e, "cannot revoke the token Slack issued to a workspace that may not install; remove the app from that workspace by hand");
        }
        return Err(Failure::NotAllowed(grant.record.team_id));
    }
    let mut redis = ready.redis.clone();
    admin::store_installed(
        &mut redis,
        &ready.key_prefix,
        &grant.record,
        grant.expires_in,
    )
    .await
    .map_err(Failure::Store)?;
    Ok(Installed {
        rotating: grant.record.refresh_token.is_some(),
        team_id: grant.record.team_id,
        team_name: grant.team_name,
        scopes: grant.scopes,
    })
}

/// What `oauth.v2.access` granted, as the record to store.
struct Grant {
    record: TokenRecord,
    expires_in: Option<i64>,
    team_name: String,
    scopes: String,
}

impl Grant {
    fn read(reply: &Value) -> Result<Grant, Failure> {
        let text = |pointer: &str| {
            reply
                .pointer(pointer)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let token_type = text("/token_type").unwrap_or_default();
        let Some(access_token) = text("/access_token").filter(|_| token_type == "bot") else {
            return Err(Failure::NoBotToken(token_type));
        };
        let Some(team_id) = text("/team/id") else {
            // An org-wide install names the enterprise, not a team.
            return Err(Failure::EnterpriseInstall);
        };
        // With rotation on, Slack sends both; a refresh token alone would
        // make the worker refresh a token it cannot date, so both or none.
        let expires_in = reply
            .get("expires_in")
            .and_then(Value::as_i64)
            .filter(|secs| *secs > 0);
        let refresh_token = text("/refresh_token").map(Secret::new);
        Ok(Grant {
            record: TokenRecord {
                access_token: Secret::new(access_token),
                expires_at: expires_in.map(|secs| now() + secs),
                refresh_token,
                bot_user_id: text("/bot_user_id"),
                team_id: team_id.clone(),
            },
            expires_in,
            team_name: text("/team/name").unwrap_or(team_id),
            scopes: text("/scope").unwrap_or_default(),
        })
    }
}

/// An error code from the callback's query as the page and log may show it:
/// Slack's codes are short snake_case words, anything else is not Slack's.
fn slack_code(raw: &str) -> String {
    if !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        raw.to_string()
    } else {
        "an unrecognised error".to_string()
    }
}

fn not_configured(why: &str) -> Response {
    telemetry::record_install("not_configured");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Slack install is off",
        why,
        "Restart the worker after setting it.",
    )
}

/// A small plain HTML page; every text is escaped.
fn page(status: StatusCode, title: &str, message: &str, next: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><h1>{title}</h1>\n<p>{message}</p>\n<p>{next}</p></body></html>\n",
        title = escape(title),
        message = escape(message),
        next = escape(next),
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The callback's URL holds a code: no other site should see it.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(600);
    const NOW: i64 = 1_800_000_000;

    fn key() -> Secret {
        Secret::new("client-secret-for-tests")
    }

    #[test]
    fn an_installer_without_a_verified_email_is_told_so_as_a_bad_request() {
        let unverified = Failure::Exchange(crate::deliver::slack::SlackError::new(
            "oauth.v2.access",
            "user_email_unverified",
            crate::deliver::slack::client::classify("user_email_unverified"),
        ));
        assert_eq!(unverified.status(), StatusCode::BAD_REQUEST);
        assert!(unverified.to_string().contains("verify it in Slack"));
    }

    #[test]
    fn a_fresh_state_verifies_until_it_expires() {
        let state = sign_state(&key(), NOW).unwrap();
        assert_eq!(verify_state(&key(), Some(&state), NOW, TTL), Ok(()));
        assert_eq!(verify_state(&key(), Some(&state), NOW + 599, TTL), Ok(()));
        assert_eq!(
            verify_state(&key(), Some(&state), NOW + 600, TTL),
            Err(StateError::Expired { ttl_minutes: 10 })
        );
    }

    #[test]
    fn states_differ_and_hold_no_secret() {
        let a = sign_state(&key(), NOW).unwrap();
        let b = sign_state(&key(), NOW).unwrap();
        assert_ne!(a, b, "each carries its own nonce");
        assert!(!a.contains(key().expose()));
        let parts: Vec<&str> = a.split('.').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[0], NOW.to_string());
        assert_eq!(parts[2].len(), 64, "hex of a SHA-256 MAC");
    }

    #[test]
    fn a_tampered_state_is_refused() {
        let state = sign_state_with_nonce(&key(), NOW, "00112233445566778899aabbccddeeff").unwrap();
        // A later issue time, to outlive its lifetime.
        let later = state.replacen(&NOW.to_string(), &(NOW + 3600).to_string(), 1);
        assert_eq!(
            verify_state(&key(), Some(&later), NOW + 3600, TTL),
            Err(StateError::Invalid)
        );
        // Another nonce, one flipped MAC digit, a truncated MAC.
        let nonce = state.replacen("0011", "1111", 1);
        assert_eq!(
            verify_state(&key(), Some(&nonce), NOW, TTL),
            Err(StateError::Invalid)
        );
        let mut flipped = state.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            verify_state(&key(), Some(&flipped), NOW, TTL),
            Err(StateError::Invalid)
        );
        assert_eq!(
            verify_state(&key(), Some(&state[..state.len() - 2]), NOW, TTL),
            Err(StateError::Invalid)
        );
        // Signed with another key.
        let other = sign_state(&Secret::new("another-secret"), NOW).unwrap();
        assert_eq!(
            verify_state(&key(), Some(&other), NOW, TTL),
            Err(StateError::Invalid)
        );
    }

    #[test]
    fn missing_malformed_and_future_states_are_refused() {
        assert_eq!(
            verify_state(&key(), None, NOW, TTL),
            Err(StateError::Missing)
        );
        assert_eq!(
            verify_state(&key(), Some(""), NOW, TTL),
            Err(StateError::Missing)
        );
        for bad in [
            "x",
            "1.2",
            "abc.00ff.00",
            "1800000000..00",
            "1800000000.zz.00",
            &"9".repeat(500),
        ] {
            assert_eq!(
                verify_state(&key(), Some(bad), NOW, TTL),
                Err(StateError::Invalid),
                "{bad}"
            );
        }
        let ahead = sign_state(&key(), NOW + 30).unwrap();
        assert_eq!(
            verify_state(&key(), Some(&ahead), NOW, TTL),
            Ok(()),
            "a replica's clock a little ahead"
        );
        let far_ahead = sign_state(&key(), NOW + 3600).unwrap();
        assert_eq!(
            verify_state(&key(), Some(&far_ahead), NOW, TTL),
            Err(StateError::Invalid)
        );
    }

    #[test]
    fn the_lifetime_is_the_setting() {
        let state = sign_state(&key(), NOW).unwrap();
        let short = Duration::from_secs(60);
        assert_eq!(verify_state(&key(), Some(&state), NOW + 59, short), Ok(()));
        assert_eq!(
            verify_state(&key(), Some(&state), NOW + 60, short),
            Err(StateError::Expired { ttl_minutes: 1 })
        );
    }

    #[test]
    fn slack_error_codes_from_the_query_are_shown_only_when_they_look_like_codes() {
        assert_eq!(
            slack_code("invalid_team_for_non_distributed_app"),
            "invalid_team_for_non_distributed_app"
        );
        assert_eq!(slack_code("<script>"), "an unrecognised error");
        assert_eq!(slack_code(""), "an unrecognised error");
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(escape("Team <b>&\"'"), "Team &lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn a_grant_becomes_the_token_record() {
        let rotating = serde_json::json!({
            "ok": true, "access_token": "xoxe.xoxb-1-abc", "token_type": "bot",
            "scope": "chat:write,channels:join", "bot_user_id": "U0BOT", "app_id": "A1",
            "expires_in": 43200, "refresh_token": "xoxe-1-def",
            "team": {"id": "T1", "name": "Ops"}, "enterprise": null,
            "is_enterprise_install": false,
        });
        let grant = Grant::read(&rotating).unwrap();
        assert_eq!(grant.record.team_id, "T1");
        assert_eq!(grant.team_name, "Ops");
        assert_eq!(grant.expires_in, Some(43200));
        assert!(grant.record.expires_at.is_some());
        assert_eq!(
            grant.record.refresh_token.as_ref().map(Secret::expose),
            Some("xoxe-1-def")
        );
        assert_eq!(grant.record.bot_user_id.as_deref(), Some("U0BOT"));

        let plain = serde_json::json!({
            "ok": true, "access_token": "xoxb-1", "token_type": "bot", "scope": "chat:write",
            "bot_user_id": "U0BOT", "team": {"id": "T2"},
        });
        let grant = Grant::read(&plain).unwrap();
        assert_eq!(grant.team_name, "T2", "no name: the id");
        assert!(grant.record.refresh_token.is_none() && grant.record.expires_at.is_none());

        let org = serde_json::json!({
            "ok": true, "access_token": "xoxb-1", "token_type": "bot", "team": null,
            "enterprise": {"id": "E1"}, "is_enterprise_install": true,
        });
        assert!(matches!(Grant::read(&org), Err(Failure::EnterpriseInstall)));
        let user_only = serde_json::json!({
            "ok": true, "authed_user": {"id": "U1", "access_token": "xoxp-1", "token_type": "user"},
            "team": {"id": "T3"},
        });
        let err = Grant::read(&user_only).err().unwrap();
        assert!(matches!(err, Failure::NoBotToken(_)));
        assert!(!err.to_string().contains("xoxp"), "{err}");
    }
}
