//! A stateful fake of the Slack Web API for tests.
//!
//! It serves `http://127.0.0.1:PORT/api/<method>` from an axum server spawned
//! on the current tokio runtime and behaves like Slack as documented:
//! errors are HTTP 200 with `{"ok":false,"error":"…"}`, rate limiting is HTTP
//! 429 with `Retry-After`, unknown methods are HTTP 404 `unknown_method`.
//!
//! Everything is programmable from the test (tokens, channels, users, OAuth
//! refresh tokens and install codes, rate limits, faults, an outage: HTTP
//! 503 from every method, or Slack unreachable: connections reset) and every
//! request is recorded. `GET /oauth/v2/authorize` stands in for Slack's consent page:
//! it approves (or, when told, denies) as the installer the test chose and
//! sends the browser back to `redirect_uri` with a code, as Slack does.
//!
//! Interactivity: [`FakeSlack::click`] builds the request Slack sends to an
//! app's interactivity URL when someone clicks a button (a signed
//! `block_actions` form post, see [`Click`]), with a `response_url` on this
//! fake; `POST /actions/…` records what the app answers there
//! ([`FakeSlack::responses`]).
//! Waiting helpers use a `tokio::sync::watch` channel with a timeout, never
//! sleeps.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

/// Scopes given to tokens created by [`TokenSpec::bot`] and to access tokens
/// minted by `oauth.v2.access` unless configured otherwise.
pub const DEFAULT_BOT_SCOPES: &[&str] = &[
    "chat:write",
    "chat:write.public",
    "channels:join",
    "im:write",
    "users:read",
    "users:read.email",
    "channels:read",
    "groups:read",
    "channels:history",
    "groups:history",
    "im:history",
];

/// Serialized length of `blocks` above which `chat.postMessage` answers
/// `msg_blocks_too_long` (Slack rejects somewhere near 13k characters).
pub const MAX_BLOCKS_CHARS: usize = 13_000;
/// Maximum number of blocks in one message.
pub const MAX_BLOCKS: usize = 50;
/// Maximum number of attachments in one message.
pub const MAX_ATTACHMENTS: usize = 100;
/// `chat.postMessage` truncates text above this with warning `message_truncated`.
pub const MAX_POST_TEXT_CHARS: usize = 40_000;
/// `chat.update` answers `msg_too_long` above this.
pub const MAX_UPDATE_TEXT_CHARS: usize = 4_000;
/// Lifetime of access tokens minted by `oauth.v2.access` (seconds), unless
/// a test sets another with [`FakeSlack::set_access_token_lifetime`].
pub const ACCESS_TOKEN_EXPIRES_IN: u64 = 43_200;

/// Methods the fake implements; anything else is `unknown_method` (HTTP 404).
pub const KNOWN_METHODS: &[&str] = &[
    "chat.postMessage",
    "chat.update",
    "users.lookupByEmail",
    "conversations.join",
    "conversations.open",
    "auth.test",
    "auth.revoke",
    "oauth.v2.access",
    "conversations.list",
    "conversations.history",
    "conversations.replies",
];

/// `conversations.list`: default and maximum `limit`.
pub const LIST_DEFAULT_LIMIT: usize = 100;
pub const LIST_MAX_LIMIT: usize = 1000;
/// `conversations.history`: default and maximum `limit` (larger values are capped).
pub const HISTORY_DEFAULT_LIMIT: usize = 100;
pub const HISTORY_MAX_LIMIT: usize = 999;
/// `conversations.replies`: default and maximum `limit`.
pub const REPLIES_MAX_LIMIT: usize = 1000;

// ---------------------------------------------------------------------------
// Public configuration types
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    /// `token_revoked`
    Revoked,
    /// `token_expired`
    Expired,
    /// `account_inactive`
    AccountInactive,
}

#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub team_id: String,
    pub bot_user_id: String,
    pub scopes: Vec<String>,
    pub state: TokenState,
    /// An org-wide app's token (Enterprise Grid): `conversations.list`
    /// needs `team_id`, "required if token belongs to org-wide app".
    pub org_wide: bool,
}

impl TokenSpec {
    /// A valid bot token with [`DEFAULT_BOT_SCOPES`].
    pub fn bot(team_id: &str, bot_user_id: &str) -> Self {
        TokenSpec {
            team_id: team_id.to_string(),
            bot_user_id: bot_user_id.to_string(),
            scopes: DEFAULT_BOT_SCOPES.iter().map(|s| s.to_string()).collect(),
            state: TokenState::Valid,
            org_wide: false,
        }
    }

    /// Same token, installed org-wide.
    pub fn org_wide(mut self) -> Self {
        self.org_wide = true;
        self
    }

    /// Same token with exactly these scopes.
    pub fn with_scopes(mut self, scopes: &[&str]) -> Self {
        self.scopes = scopes.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn with_state(mut self, state: TokenState) -> Self {
        self.state = state;
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    pub bot_is_member: bool,
    pub archived: bool,
    pub private: bool,
}

impl Default for ChannelSpec {
    /// A public, unarchived channel the bot is a member of.
    fn default() -> Self {
        ChannelSpec {
            bot_is_member: true,
            archived: false,
            private: false,
        }
    }
}

impl ChannelSpec {
    pub fn member() -> Self {
        Self::default()
    }
    pub fn not_member() -> Self {
        ChannelSpec {
            bot_is_member: false,
            ..Self::default()
        }
    }
    pub fn archived() -> Self {
        ChannelSpec {
            archived: true,
            ..Self::default()
        }
    }
    pub fn private(bot_is_member: bool) -> Self {
        ChannelSpec {
            bot_is_member,
            archived: false,
            private: true,
        }
    }
}

/// A failure to inject.
#[derive(Clone, Debug)]
pub enum Fault {
    /// HTTP `status` with an HTML body (what a load balancer in front of
    /// Slack answers), e.g. `Http(500)`, `Http(503)`.
    Http(u16),
    /// HTTP `status` with a JSON body `{"ok":false,"error":error}`, e.g.
    /// `HttpJson(503, "service_unavailable")`.
    HttpJson(u16, String),
    /// HTTP 200 `{"ok":false,"error":code}`.
    Api(String),
    /// HTTP 429, `Retry-After: retry_after_secs`, `{"ok":false,"error":"ratelimited"}`.
    RateLimited { retry_after_secs: u64 },
    /// Never answers; the request is recorded in `requests()` with
    /// `status: None` and is not a post.
    Hang,
    /// Waits, then processes the request normally.
    Delay(Duration),
    /// Waits until the token is cancelled (by the test, on an event it saw),
    /// then processes the request normally. The request is recorded in
    /// `requests()` on arrival, with `status: None`; a post it makes is in
    /// `posts()` once released.
    HoldUntil(tokio_util::sync::CancellationToken),
    /// Processes the request (a post is recorded and stays in the channel)
    /// and never answers: the answer is lost, as when the caller dies or the
    /// network drops after Slack accepted the call.
    AcceptThenHang,
    /// Processes the request at once (a post is recorded) and answers after
    /// the delay, as when the answer is slow on its way back: a caller that
    /// dies meanwhile leaves a post it never heard of.
    AcceptThenDelay(Duration),
    /// Processes the request (a post is recorded and stays in the channel),
    /// then answers with a replying fault (`Http`, `HttpJson`, `Api`): Slack's
    /// `internal_error` and `fatal_error` say "it's possible some aspect of
    /// the operation succeeded", and a 5xx from a proxy can follow a post
    /// Slack took.
    AcceptThenFail(Box<Fault>),
}

impl Fault {
    pub fn api(code: &str) -> Self {
        Fault::Api(code.to_string())
    }
}

// ---------------------------------------------------------------------------
// Recorded data
// ---------------------------------------------------------------------------

/// A successful `chat.postMessage` (in `posts()`) or `chat.update` (in `updates()`).
#[derive(Clone, Debug)]
pub struct RecordedPost {
    pub method: String,
    /// `channel` as the client sent it (`C…`, `#name`, `name`, `U…`, `D…`).
    pub channel: String,
    /// The resolved conversation id (`C…`, `G…`, `D…`).
    pub channel_id: String,
    pub team_id: String,
    pub text: Option<String>,
    pub blocks: Option<Value>,
    pub attachments: Option<Value>,
    pub metadata: Option<Value>,
    pub thread_ts: Option<String>,
    pub token: String,
    /// The message's ts (for updates: the ts of the updated message).
    pub ts: String,
    /// All arguments as received (form values are strings).
    pub body: Value,
    pub received_at: Instant,
}

/// Every request the fake answered (or is hanging on).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// HTTP status returned; `None` for a hanging request.
    pub status: Option<u16>,
    /// The `error` code for `ok:false` answers (and `ratelimited` for 429s).
    pub error: Option<String>,
    pub token: Option<String>,
    pub content_type: Option<String>,
    /// Arguments as parsed (form values are strings); `Null` when unparsed.
    pub params: Value,
    pub received_at: Instant,
}

/// Tokens minted by a successful `oauth.v2.access` refresh.
#[derive(Clone, Debug)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub team_id: String,
    pub bot_user_id: String,
    pub expires_in: u64,
    /// The refresh token that was exchanged.
    pub used_refresh_token: String,
}

/// Tokens minted by a successful `oauth.v2.access` code exchange (an install).
#[derive(Clone, Debug)]
pub struct InstalledTokens {
    pub access_token: String,
    /// Set when token rotation is on.
    pub refresh_token: Option<String>,
    pub expires_in: Option<u64>,
    pub team_id: String,
    pub bot_user_id: String,
    pub scopes: Vec<String>,
    /// The code that was exchanged.
    pub code: String,
}

/// A post an app made to a click's `response_url`.
#[derive(Clone, Debug)]
pub struct RecordedResponse {
    /// The path of the `response_url` it went to (`/actions/T…/…`).
    pub path: String,
    pub content_type: Option<String>,
    /// The JSON body (`Null` if it was not JSON).
    pub body: Value,
    pub received_at: Instant,
}

impl RecordedResponse {
    /// The message's `text`.
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or_default()
    }

    /// Shown only to the clicker, leaving the original message alone.
    pub fn is_ephemeral(&self) -> bool {
        self.body["response_type"] == "ephemeral" && self.body["replace_original"] == false
    }
}

/// How long an authorization code can be exchanged, as Slack documents.
pub const AUTHORIZATION_CODE_LIFETIME: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Channel {
    id: String,
    name: String,
    spec: ChannelSpec,
}

#[derive(Clone, Debug)]
struct User {
    id: String,
    email: String,
    deleted: bool,
}

#[derive(Clone, Debug)]
struct RefreshEntry {
    team_id: String,
    bot_user_id: String,
    scopes: Vec<String>,
    /// When the token stops being accepted (set when it is used).
    revoked_at: Option<Instant>,
}

/// An authorization code minted by the consent page (or a test).
#[derive(Clone, Debug)]
struct AuthCode {
    team_id: String,
    team_name: String,
    bot_user_id: String,
    scopes: Vec<String>,
    /// The `redirect_uri` the authorize request sent; the exchange must send it again.
    redirect_uri: Option<String>,
    issued_at: Instant,
    used: bool,
}

/// Who approves installs at the fake consent page.
#[derive(Clone, Debug)]
enum Installer {
    Approve { team_id: String, team_name: String },
    Deny,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, TokenSpec>,
    channels: Vec<Channel>,
    users: HashMap<String, User>,
    dms: HashMap<String, String>,
    oauth_client: Option<(String, String)>,
    refresh_tokens: HashMap<String, RefreshEntry>,
    refresh_grace: Duration,
    refresh_count: usize,
    issued: Vec<IssuedTokens>,
    auth_codes: HashMap<String, AuthCode>,
    /// Whether installs mint rotating tokens (`xoxe.xoxb-…` with a refresh token).
    token_rotation: bool,
    installer: Option<Installer>,
    installs: Vec<InstalledTokens>,
    /// Query arguments of every `GET /oauth/v2/authorize`.
    authorize_requests: Vec<HashMap<String, String>>,
    /// `expires_in` of minted access tokens; `None` is [`ACCESS_TOKEN_EXPIRES_IN`].
    access_token_lifetime: Option<u64>,
    /// When minted access tokens start answering `token_expired`, as Slack's do.
    token_expires_at: HashMap<String, Instant>,
    channel_rate: Option<(f64, u32)>,
    workspace_rate: Option<(f64, u32)>,
    buckets: HashMap<(String, String), Bucket>,
    rate_limited: usize,
    fail_next: HashMap<String, VecDeque<Fault>>,
    channel_faults: HashMap<String, Fault>,
    outage: bool,
    /// A reply under a message that is gone is posted to the channel
    /// (`ok`, no `thread_ts`) instead of refused with `thread_not_found`.
    orphan_replies_to_channel: bool,
    posts: Vec<RecordedPost>,
    /// Thread replies people wrote in Slack (not the app's posts: kept out
    /// of `posts()`), shown by `conversations.replies` and counted on
    /// their parent in `conversations.history`.
    people_replies: Vec<RecordedPost>,
    /// Messages that exist (channel id, ts): not forgotten by
    /// `clear_records`, removed by `delete_message`. A reply's `thread_ts`
    /// and an update's `ts` must name one.
    messages: HashSet<(String, String)>,
    updates: Vec<RecordedPost>,
    requests: Vec<RecordedRequest>,
    /// Posts to `response_url`s, in arrival order.
    responses: Vec<RecordedResponse>,
    /// Paths of the `response_url`s clicks were given.
    response_urls: std::collections::HashSet<String>,
    last_ts_micros: u64,
    id_counter: u64,
    /// Largest page `conversations.list` returns, whatever `limit` asks.
    list_page_cap: Option<usize>,
    /// How many more `conversations.list` cursors Slack no longer takes.
    expired_list_cursors: usize,
    /// Per-(team, method) limits: (per second, burst), keyed by method.
    method_rates: HashMap<String, (f64, u32)>,
    method_buckets: HashMap<(String, String), Bucket>,
    /// Former names of renamed channels, by id (oldest first).
    previous_names: HashMap<String, Vec<String>>,
}

impl Inner {
    fn next_ts(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let v = now.max(self.last_ts_micros + 1);
        self.last_ts_micros = v;
        format!("{}.{:06}", v / 1_000_000, v % 1_000_000)
    }

    fn mint_code(
        &mut self,
        team_id: &str,
        team_name: &str,
        scopes: Vec<String>,
        redirect_uri: Option<String>,
    ) -> String {
        let n = self.next_id();
        let code = format!("{n}.{}", uuid::Uuid::new_v4().simple());
        self.auth_codes.insert(
            code.clone(),
            AuthCode {
                team_id: team_id.to_string(),
                team_name: team_name.to_string(),
                bot_user_id: format!("U0BOT{n}"),
                scopes,
                redirect_uri,
                issued_at: Instant::now(),
                used: false,
            },
        );
        code
    }

    fn next_id(&mut self) -> u64 {
        self.id_counter += 1;
        self.id_counter
    }

    fn random_suffix(&mut self) -> String {
        let n = self.next_id();
        format!("{n}-{}", uuid::Uuid::new_v4().simple())
    }

    fn channel_by_id(&self, id: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.id == id)
    }

    fn channel_by_name(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// Looks a conversation up by id or name, not applying permissions.
    fn lookup_channel(&self, given: &str) -> Option<&Channel> {
        if let Some(name) = given.strip_prefix('#') {
            return self.channel_by_name(name);
        }
        self.channel_by_id(given)
            .or_else(|| self.channel_by_name(given))
    }

    fn dm_for_user(&mut self, user_id: &str) -> String {
        if let Some(d) = self.dms.get(user_id) {
            return d.clone();
        }
        let n = self.next_id();
        let d = format!("D{:010X}", 0xF0_0000_0000_u64 + n);
        self.dms.insert(user_id.to_string(), d.clone());
        d
    }

    fn is_dm_id(&self, id: &str) -> bool {
        self.dms.values().any(|d| d == id)
    }

    /// The channel id a `channel` argument resolves to, if any, for fault matching.
    fn resolve_for_match(&self, given: &str) -> Option<String> {
        if let Some(c) = self.lookup_channel(given) {
            return Some(c.id.clone());
        }
        if is_user_id(given) {
            return self.dms.get(given).cloned();
        }
        self.is_dm_id(given).then(|| given.to_string())
    }

    fn channel_fault(&self, given: &str) -> Option<Fault> {
        if let Some(f) = self.channel_faults.get(given) {
            return Some(f.clone());
        }
        let resolved = self.resolve_for_match(given)?;
        self.channel_faults
            .iter()
            .find(|(k, _)| self.resolve_for_match(k).as_deref() == Some(resolved.as_str()))
            .map(|(_, f)| f.clone())
    }
}

struct Shared {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// While set, Slack cannot be reached: connections are reset.
    unreachable: AtomicBool,
    /// Connections reset while unreachable.
    resets: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Handle to a running fake Slack. Cheap to clone.
#[derive(Clone)]
pub struct FakeSlack {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Arc<tokio::task::JoinHandle<()>>,
}

impl FakeSlack {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> FakeSlack {
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed,
            unreachable: AtomicBool::new(false),
            resets: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/{method}", any(handle))
            .route("/oauth/v2/authorize", axum::routing::get(authorize))
            .route("/actions/{*rest}", axum::routing::post(response_url))
            .fallback(|| async {
                json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"ok":false,"error":"unknown_method"}),
                )
            })
            .with_state(shared.clone());
        // A deep accept queue: while Slack is unreachable, clients reconnect
        // as fast as they are reset, and an overflowing queue would leave
        // handshakes half-open (a hang until the client's timeout) instead.
        let socket = tokio::net::TcpSocket::new_v4().expect("fake slack socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind fake slack");
        let listener = socket.listen(4096).expect("listen fake slack");
        let addr = listener.local_addr().expect("local addr");
        let listener = ResettingListener {
            listener,
            shared: shared.clone(),
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).into_future().await;
        });
        FakeSlack {
            shared,
            addr,
            server: Arc::new(server),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/api` (methods at `/api/<method>`).
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// `http://127.0.0.1:PORT/oauth/v2/authorize`, the consent page.
    pub fn authorize_url(&self) -> String {
        format!("http://{}/oauth/v2/authorize", self.addr)
    }

    /// `http://127.0.0.1:PORT/api/<method>`
    pub fn method_url(&self, method: &str) -> String {
        format!("{}/{method}", self.api_url())
    }

    /// Stops accepting connections (Slack unreachable). Requests already
    /// being served on open connections may still complete.
    pub fn shutdown(&self) {
        self.server.abort();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    // ----- tokens -----

    pub fn add_token(&self, token: &str, spec: TokenSpec) {
        self.lock().tokens.insert(token.to_string(), spec);
    }

    /// Adds a valid bot token with [`DEFAULT_BOT_SCOPES`].
    pub fn add_bot_token(&self, token: &str, team_id: &str, bot_user_id: &str) {
        self.add_token(token, TokenSpec::bot(team_id, bot_user_id));
    }

    pub fn set_token_state(&self, token: &str, state: TokenState) {
        if let Some(t) = self.lock().tokens.get_mut(token) {
            t.state = state;
        }
    }

    pub fn revoke(&self, token: &str) {
        self.set_token_state(token, TokenState::Revoked);
    }

    pub fn expire(&self, token: &str) {
        self.set_token_state(token, TokenState::Expired);
    }

    pub fn token(&self, token: &str) -> Option<TokenSpec> {
        self.lock().tokens.get(token).cloned()
    }

    // ----- channels & users -----

    pub fn add_channel(&self, id: &str, name: &str, spec: ChannelSpec) {
        let mut g = self.lock();
        g.channels.retain(|c| c.id != id);
        g.channels.push(Channel {
            id: id.to_string(),
            name: name.trim_start_matches('#').to_string(),
            spec,
        });
    }

    pub fn set_channel(&self, id: &str, spec: ChannelSpec) {
        if let Some(c) = self.lock().channels.iter_mut().find(|c| c.id == id) {
            c.spec = spec;
        }
    }

    pub fn archive_channel(&self, id: &str) {
        if let Some(c) = self.lock().channels.iter_mut().find(|c| c.id == id) {
            c.spec.archived = true;
        }
    }

    pub fn bot_is_member(&self, id: &str) -> bool {
        self.lock()
            .channel_by_id(id)
            .map(|c| c.spec.bot_is_member)
            .unwrap_or(false)
    }

    pub fn unarchive_channel(&self, id: &str) {
        if let Some(c) = self.lock().channels.iter_mut().find(|c| c.id == id) {
            c.spec.archived = false;
        }
    }

    /// Renames a channel: the old name no longer resolves (`#old` is
    /// `channel_not_found`), the id keeps working.
    pub fn rename_channel(&self, id: &str, new_name: &str) {
        let mut g = self.lock();
        let new_name = new_name.trim_start_matches('#').to_string();
        let Some(c) = g.channels.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let old = std::mem::replace(&mut c.name, new_name);
        g.previous_names
            .entry(id.to_string())
            .or_default()
            .push(old);
    }

    /// Deletes a conversation: its id and name answer `channel_not_found`
    /// everywhere afterwards (recorded posts stay in `posts()`).
    pub fn delete_channel(&self, id: &str) {
        let mut g = self.lock();
        g.channels.retain(|c| c.id != id);
        g.dms.retain(|_, d| d != id);
        g.previous_names.remove(id);
    }

    /// `conversations.list` returns at most `n` conversations per page
    /// (at least 1), whatever `limit` asks, so tests can prove a client
    /// follows `next_cursor`.
    pub fn set_list_page_cap(&self, n: usize) {
        self.lock().list_page_cap = Some(n.max(1));
    }

    /// The next `n` `conversations.list` calls that carry a cursor get
    /// `invalid_cursor` ("Value passed for cursor was not valid or is no
    /// longer valid"), as when a listing outlives its cursor.
    pub fn expire_next_list_cursors(&self, n: usize) {
        self.lock().expired_list_cursors = n;
    }

    pub fn clear_list_page_cap(&self) {
        self.lock().list_page_cap = None;
    }

    pub fn add_user(&self, id: &str, email: &str) {
        self.lock().users.insert(
            id.to_string(),
            User {
                id: id.to_string(),
                email: email.to_string(),
                deleted: false,
            },
        );
    }

    pub fn deactivate_user(&self, id: &str) {
        if let Some(u) = self.lock().users.get_mut(id) {
            u.deleted = true;
        }
    }

    /// The stable `D…` id of the DM with this user (created on first use).
    pub fn dm_channel_id(&self, user_id: &str) -> String {
        self.lock().dm_for_user(user_id)
    }

    // ----- OAuth -----

    pub fn set_oauth_client(&self, client_id: &str, client_secret: &str) {
        self.lock().oauth_client = Some((client_id.to_string(), client_secret.to_string()));
    }

    pub fn add_refresh_token(&self, refresh_token: &str, team_id: &str, bot_user_id: &str) {
        let scopes = DEFAULT_BOT_SCOPES.iter().map(|s| s.to_string()).collect();
        self.add_refresh_token_with_scopes(refresh_token, team_id, bot_user_id, scopes);
    }

    pub fn add_refresh_token_with_scopes(
        &self,
        refresh_token: &str,
        team_id: &str,
        bot_user_id: &str,
        scopes: Vec<String>,
    ) {
        self.lock().refresh_tokens.insert(
            refresh_token.to_string(),
            RefreshEntry {
                team_id: team_id.to_string(),
                bot_user_id: bot_user_id.to_string(),
                scopes,
                revoked_at: None,
            },
        );
    }

    /// How long a used refresh token keeps working (default 0: revoked at once).
    pub fn set_refresh_grace(&self, grace: Duration) {
        self.lock().refresh_grace = grace;
    }

    /// `expires_in` of the access tokens `oauth.v2.access` mints from now on
    /// (Slack's is 12 hours; emulators and tests use shorter ones). They
    /// answer `token_expired` once that time has passed.
    pub fn set_access_token_lifetime(&self, secs: u64) {
        self.lock().access_token_lifetime = Some(secs);
    }

    /// Mints an authorization code for an install into `team_id` with
    /// [`DEFAULT_BOT_SCOPES`], as Slack's consent page would for an
    /// authorize request that sent `redirect_uri`. It works once, for
    /// [`AUTHORIZATION_CODE_LIFETIME`].
    pub fn authorization_code(&self, team_id: &str, redirect_uri: &str) -> String {
        let scopes = DEFAULT_BOT_SCOPES.iter().map(|s| s.to_string()).collect();
        self.lock().mint_code(
            team_id,
            &format!("Team {team_id}"),
            scopes,
            Some(redirect_uri.to_string()),
        )
    }

    /// Installs mint rotating tokens (`xoxe.xoxb-…`, a refresh token and
    /// `expires_in`), as when the app has token rotation turned on.
    pub fn set_token_rotation(&self, on: bool) {
        self.lock().token_rotation = on;
    }

    /// The consent page approves every install as an admin of this workspace.
    pub fn approve_installs_as(&self, team_id: &str, team_name: &str) {
        self.lock().installer = Some(Installer::Approve {
            team_id: team_id.to_string(),
            team_name: team_name.to_string(),
        });
    }

    /// The consent page answers every install with "Cancel" (`error=access_denied`).
    pub fn deny_installs(&self) {
        self.lock().installer = Some(Installer::Deny);
    }

    /// Tokens minted by code exchanges, oldest first.
    pub fn installs(&self) -> Vec<InstalledTokens> {
        self.lock().installs.clone()
    }

    /// The query of every visit to the consent page, oldest first.
    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        self.lock().authorize_requests.clone()
    }

    /// Number of successful refreshes.
    pub fn refresh_count(&self) -> usize {
        self.lock().refresh_count
    }

    /// Tokens minted by successful refreshes, oldest first.
    pub fn issued_tokens(&self) -> Vec<IssuedTokens> {
        self.lock().issued.clone()
    }

    // ----- rate limits -----

    /// Per-(team, channel) token bucket for `chat.postMessage`.
    pub fn set_channel_rate_limit(&self, per_second: f64, burst: u32) {
        let mut g = self.lock();
        g.channel_rate = Some((per_second, burst.max(1)));
        g.buckets.clear();
    }

    pub fn clear_channel_rate_limit(&self) {
        let mut g = self.lock();
        g.channel_rate = None;
        g.buckets.clear();
    }

    /// Per-team token bucket for `chat.postMessage` across all channels
    /// (Slack: "several hundred per minute"; e.g. `(5.0, 300)`). Default off.
    pub fn set_workspace_rate_limit(&self, per_second: f64, burst: u32) {
        let mut g = self.lock();
        g.workspace_rate = Some((per_second, burst.max(1)));
        g.buckets.clear();
    }

    pub fn clear_workspace_rate_limit(&self) {
        let mut g = self.lock();
        g.workspace_rate = None;
        g.buckets.clear();
    }

    /// Per-(team, method) token bucket, like Slack's tiers (Tier 2 is about
    /// 20 per minute, Tier 3 about 50): over it, `method` answers HTTP 429
    /// with `Retry-After` and `ratelimited`. Every call with a valid token
    /// counts, failed ones too. Default off. Independent of the
    /// `chat.postMessage` channel and workspace limits.
    pub fn set_method_rate_limit(&self, method: &str, per_minute: u32, burst: u32) {
        let mut g = self.lock();
        g.method_rates.insert(
            method.to_string(),
            (f64::from(per_minute.max(1)) / 60.0, burst.max(1)),
        );
        g.method_buckets.retain(|(_, m), _| m != method);
    }

    pub fn clear_method_rate_limit(&self, method: &str) {
        let mut g = self.lock();
        g.method_rates.remove(method);
        g.method_buckets.retain(|(_, m), _| m != method);
    }

    /// Number of HTTP 429 answers so far (rate limit and injected).
    pub fn rate_limited_count(&self) -> usize {
        self.lock().rate_limited
    }

    // ----- faults -----

    /// The next `n` calls of `method` get `fault` (queued after earlier ones).
    pub fn fail_next(&self, method: &str, n: usize, fault: Fault) {
        let mut g = self.lock();
        let q = g.fail_next.entry(method.to_string()).or_default();
        for _ in 0..n {
            q.push_back(fault.clone());
        }
    }

    /// Answers the next `answered` posts at once and holds the `held` after
    /// them until the returned token is cancelled (then they are processed).
    pub fn answer_then_hold(
        &self,
        answered: usize,
        held: usize,
    ) -> tokio_util::sync::CancellationToken {
        let release = tokio_util::sync::CancellationToken::new();
        self.fail_next("chat.postMessage", answered, Fault::Delay(Duration::ZERO));
        self.fail_next("chat.postMessage", held, Fault::HoldUntil(release.clone()));
        release
    }

    /// Every `chat.postMessage`/`chat.update` to this channel (id, `#name`,
    /// name or user id) gets `fault` until `clear_faults()`.
    pub fn fail_channel(&self, channel: &str, fault: Fault) {
        self.lock()
            .channel_faults
            .insert(channel.to_string(), fault);
    }

    /// Clears `fail_next`, `fail_channel` and the outage.
    pub fn clear_faults(&self) {
        let mut g = self.lock();
        g.fail_next.clear();
        g.channel_faults.clear();
        g.outage = false;
    }

    /// Slack's two answers to a reply whose parent was deleted: refused
    /// with `thread_not_found` (off, the default), or (on) taken as a
    /// channel message, `ok` with no `thread_ts` in the answer's `message`.
    pub fn set_orphan_replies_to_channel(&self, on: bool) {
        self.lock().orphan_replies_to_channel = on;
    }

    /// While on, every method answers HTTP 503 (HTML body).
    pub fn set_outage(&self, on: bool) {
        self.lock().outage = on;
    }

    /// While on, Slack cannot be reached: every new connection is reset at
    /// once, and an open one as soon as it carries another request, so no
    /// request is processed (as when the network to slack.com is down or a
    /// proxy in between refuses). Requests already being processed finish.
    pub fn set_unreachable(&self, on: bool) {
        self.shared.unreachable.store(on, Ordering::SeqCst);
    }

    /// Connections reset while unreachable, so far.
    pub fn reset_count(&self) -> usize {
        self.shared.resets.load(Ordering::SeqCst)
    }

    // ----- inspection -----

    pub fn posts(&self) -> Vec<RecordedPost> {
        self.lock().posts.clone()
    }

    /// Posts recorded so far, without copying them.
    pub fn post_count(&self) -> usize {
        self.lock().posts.len()
    }

    /// The posts after the first `start`, in arrival order (to follow a long
    /// run without copying every post each time).
    pub fn posts_since(&self, start: usize) -> Vec<RecordedPost> {
        self.lock().posts.get(start..).unwrap_or_default().to_vec()
    }

    pub fn posts_to(&self, channel_id: &str) -> Vec<RecordedPost> {
        self.lock()
            .posts
            .iter()
            .filter(|p| p.channel_id == channel_id)
            .cloned()
            .collect()
    }

    /// The largest number of posts to `channel_id` whose `received_at` fall
    /// within any span of `window` (to assert a client's own rate limiting).
    pub fn max_posts_in_window(&self, channel_id: &str, window: Duration) -> usize {
        let times: Vec<Instant> = self
            .posts_to(channel_id)
            .iter()
            .map(|p| p.received_at)
            .collect();
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]) >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    pub fn updates(&self) -> Vec<RecordedPost> {
        self.lock().updates.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// What apps posted to `response_url`s.
    pub fn responses(&self) -> Vec<RecordedResponse> {
        self.lock().responses.clone()
    }

    /// Returns once at least `n` posts to `response_url`s are recorded.
    pub async fn wait_for_responses(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedResponse>, String> {
        self.wait_until(timeout, |g| {
            (g.responses.len() >= n).then(|| g.responses.clone())
        })
        .await
        .map_err(|g| {
            format!("timed out after {timeout:?} waiting for {n} response_url post(s)\n{g}")
        })
    }

    /// Requests of `method` so far (answered or held), without copying them.
    pub fn request_count(&self, method: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    pub fn requests_for(&self, method: &str) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }

    /// A person replies in the thread of the message `thread_ts`, as
    /// people do under an alert: from then on Slack shows that message
    /// with `thread_ts` equal to its own `ts`, and a reply count.
    pub fn reply_as_person(&self, channel_id: &str, thread_ts: &str, user_id: &str, text: &str) {
        let mut g = self.lock();
        let ts = g.next_ts();
        g.messages.insert((channel_id.to_string(), ts.clone()));
        let team_id = g
            .posts
            .iter()
            .find(|p| p.channel_id == channel_id)
            .map(|p| p.team_id.clone())
            .unwrap_or_default();
        g.people_replies.push(RecordedPost {
            method: "person".to_string(),
            channel: channel_id.to_string(),
            channel_id: channel_id.to_string(),
            team_id,
            text: Some(text.to_string()),
            blocks: None,
            attachments: None,
            metadata: None,
            thread_ts: Some(thread_ts.to_string()),
            token: format!("{PERSON_TOKEN_PREFIX}{user_id}"),
            ts,
            body: json!({"user": user_id, "text": text}),
            received_at: Instant::now(),
        });
    }

    /// Deletes a message, as a person in Slack would: replies to it get
    /// `thread_not_found`, updates of it `message_not_found`.
    pub fn delete_message(&self, channel_id: &str, ts: &str) {
        self.lock()
            .messages
            .remove(&(channel_id.to_string(), ts.to_string()));
    }

    /// Forgets recorded posts, updates and requests (not the configuration).
    pub fn clear_records(&self) {
        let mut g = self.lock();
        g.posts.clear();
        g.people_replies.clear();
        g.updates.clear();
        g.requests.clear();
        g.responses.clear();
        g.rate_limited = 0;
    }

    /// Returns once at least `n` posts are recorded.
    pub async fn wait_for_posts(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedPost>, String> {
        self.wait_until(timeout, |g| (g.posts.len() >= n).then(|| g.posts.clone()))
            .await
            .map_err(|g| format!("timed out after {timeout:?} waiting for {n} post(s)\n{g}"))
    }

    /// Returns once at least `n` posts to `channel_id` are recorded.
    pub async fn wait_for_posts_to(
        &self,
        channel_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedPost>, String> {
        self.wait_until(timeout, |g| {
            let v: Vec<_> = g
                .posts
                .iter()
                .filter(|p| p.channel_id == channel_id)
                .cloned()
                .collect();
            (v.len() >= n).then_some(v)
        })
        .await
        .map_err(|g| {
            format!("timed out after {timeout:?} waiting for {n} post(s) to {channel_id}\n{g}")
        })
    }

    /// Returns once at least `n` requests of `method` have been answered (or
    /// are hanging).
    pub async fn wait_for_requests(
        &self,
        method: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, String> {
        self.wait_until(timeout, |g| {
            let v: Vec<_> = g
                .requests
                .iter()
                .filter(|r| r.method == method)
                .cloned()
                .collect();
            (v.len() >= n).then_some(v)
        })
        .await
        .map_err(|g| {
            format!("timed out after {timeout:?} waiting for {n} {method} request(s)\n{g}")
        })
    }

    pub async fn wait_for_updates(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedPost>, String> {
        self.wait_until(timeout, |g| {
            (g.updates.len() >= n).then(|| g.updates.clone())
        })
        .await
        .map_err(|g| format!("timed out after {timeout:?} waiting for {n} update(s)\n{g}"))
    }

    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Inner) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.changed.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let g = self.lock();
                if let Some(v) = check(&g) {
                    return Ok(v);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    let g = self.lock();
                    if let Some(v) = check(&g) {
                        return Ok(v);
                    }
                    return Err(describe(&g));
                }
            }
        }
    }

    /// A human-readable summary of what the fake received.
    pub fn describe(&self) -> String {
        describe(&self.lock())
    }
}

fn describe(g: &Inner) -> String {
    let mut s = format!("posts received ({}):\n", g.posts.len());
    for p in &g.posts {
        let text: String = p
            .text
            .clone()
            .unwrap_or_default()
            .chars()
            .take(100)
            .collect();
        s.push_str(&format!(
            "  - {} channel={} ({}) ts={} text={:?}\n",
            p.method, p.channel_id, p.channel, p.ts, text
        ));
    }
    s.push_str(&format!("requests ({}):\n", g.requests.len()));
    for r in g.requests.iter().rev().take(50).rev() {
        s.push_str(&format!(
            "  - {} status={} error={}\n",
            r.method,
            r.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "hang".into()),
            r.error.as_deref().unwrap_or("-")
        ));
    }
    s
}

// ---------------------------------------------------------------------------
// Connections (reset while Slack is unreachable)
// ---------------------------------------------------------------------------

/// Accepts connections, resetting them while [`FakeSlack::set_unreachable`] is on.
struct ResettingListener {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for ResettingListener {
    type Io = ResettingStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.listener.accept().await else {
                // Out of file descriptors, say: the client retries.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let stream = ResettingStream {
                stream,
                shared: self.shared.clone(),
            };
            if stream.reset_if_unreachable() {
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A served connection that is reset, instead of read, while Slack is unreachable.
struct ResettingStream {
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
}

impl ResettingStream {
    /// A zero linger makes closing the socket send RST, not FIN: the client
    /// sees its connection reset, not a server that answered and closed.
    fn reset_if_unreachable(&self) -> bool {
        if !self.shared.unreachable.load(Ordering::SeqCst) {
            return false;
        }
        let _ = self.stream.set_zero_linger();
        self.shared.resets.fetch_add(1, Ordering::SeqCst);
        true
    }
}

impl tokio::io::AsyncRead for ResettingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Checked before reading a request, never before writing an answer:
        // a request Slack processed is answered.
        if self.reset_if_unreachable() {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ResettingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------
// HTTP handling
// ---------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    body: String,
    content_type: &'static str,
    retry_after: Option<u64>,
    error: Option<String>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: body.to_string(),
            content_type: "application/json; charset=utf-8",
            retry_after: None,
            error: None,
        }
    }

    fn err(code: &str) -> Reply {
        Reply::err_with(code, Map::new())
    }

    fn err_with(code: &str, extra: Map<String, Value>) -> Reply {
        let mut body = Map::new();
        body.insert("ok".into(), Value::Bool(false));
        body.insert("error".into(), Value::String(code.into()));
        body.extend(extra);
        Reply {
            status: StatusCode::OK,
            body: Value::Object(body).to_string(),
            content_type: "application/json; charset=utf-8",
            retry_after: None,
            error: Some(code.into()),
        }
    }

    fn http_html(status: u16) -> Reply {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Reply {
            status,
            body: format!(
                "<html><head><title>{s}</title></head><body><h1>{s}</h1></body></html>",
                s = status
            ),
            content_type: "text/html; charset=utf-8",
            retry_after: None,
            error: None,
        }
    }

    fn http_json(status: u16, code: &str) -> Reply {
        let mut r = Reply::err(code);
        r.status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    }

    fn ratelimited(secs: u64) -> Reply {
        let mut r = Reply::err("ratelimited");
        r.status = StatusCode::TOO_MANY_REQUESTS;
        r.retry_after = Some(secs.max(1));
        r
    }

    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    let mut r = Reply::ok(body);
    r.status = status;
    r.into_response()
}

fn fault_reply(f: &Fault) -> Option<Reply> {
    match f {
        Fault::Http(s) => Some(Reply::http_html(*s)),
        Fault::HttpJson(s, code) => Some(Reply::http_json(*s, code)),
        Fault::Api(code) => Some(Reply::err(code)),
        Fault::RateLimited { retry_after_secs } => Some(Reply::ratelimited(*retry_after_secs)),
        Fault::Hang
        | Fault::Delay(_)
        | Fault::HoldUntil(_)
        | Fault::AcceptThenHang
        | Fault::AcceptThenDelay(_)
        | Fault::AcceptThenFail(_) => None,
    }
}

/// Parsed request arguments.
struct Req {
    method: String,
    params: Map<String, Value>,
    /// Token from the `Authorization: Bearer` header.
    bearer: Option<String>,
    /// `Authorization: Basic` credentials.
    basic: Option<(String, String)>,
    content_type: Option<String>,
    json_body: bool,
    warnings: Vec<&'static str>,
}

impl Req {
    fn str(&self, key: &str) -> Option<String> {
        match self.params.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// Non-empty string argument.
    fn nonempty(&self, key: &str) -> Option<String> {
        self.str(key).filter(|s| !s.is_empty())
    }

    /// A structured argument (JSON value, or a JSON-encoded string).
    fn structured(&self, key: &str) -> Result<Option<Value>, ()> {
        match self.params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => serde_json::from_str(s).map(Some).map_err(|_| ()),
            Some(v) => Ok(Some(v.clone())),
        }
    }

    /// The token: Bearer header, else a `token` form/query argument (never a
    /// JSON body attribute, as in Slack).
    fn token(&self) -> Option<String> {
        self.bearer.clone().or_else(|| {
            if self.json_body {
                None
            } else {
                self.nonempty("token")
            }
        })
    }
}

fn accepts_json(method: &str) -> bool {
    matches!(
        method,
        "chat.postMessage" | "chat.update" | "conversations.join" | "conversations.open"
    )
}

fn required_scope(method: &str) -> Option<&'static str> {
    match method {
        "chat.postMessage" | "chat.update" => Some("chat:write"),
        "users.lookupByEmail" => Some("users:read.email"),
        "conversations.join" => Some("channels:join"),
        "conversations.open" => Some("im:write"),
        _ => None,
    }
}

fn is_user_id(s: &str) -> bool {
    (s.starts_with('U') || s.starts_with('W'))
        && s.len() > 1
        && s[1..].chars().all(|c| c.is_ascii_alphanumeric())
}

fn parse_form(s: &str, into: &mut Map<String, Value>) {
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        into.insert(percent_decode(k), Value::String(percent_decode(v)));
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn parse_request(
    method: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Req, Reply> {
    let mut params = Map::new();
    if let Some(q) = query {
        parse_form(q, &mut params);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string());
    let mut json_body = false;
    let mut warnings = Vec::new();
    if !body.is_empty() {
        let ct = match &content_type {
            Some(ct) => ct.to_ascii_lowercase(),
            None => return Err(Reply::err("missing_post_type")),
        };
        let mime = ct.split(';').next().unwrap_or("").trim().to_string();
        match mime.as_str() {
            "application/json" => {
                if accepts_json(method) {
                    json_body = true;
                    if !ct.contains("charset") {
                        warnings.push("missing_charset");
                    }
                    match serde_json::from_slice::<Value>(body) {
                        Ok(Value::Object(m)) => params.extend(m),
                        _ => return Err(Reply::err("invalid_json")),
                    }
                }
                // Methods without JSON support ignore a JSON body, as Slack
                // does: their arguments are then simply missing.
            }
            "application/x-www-form-urlencoded" | "text/plain" => {
                let s = std::str::from_utf8(body).map_err(|_| Reply::err("invalid_form_data"))?;
                parse_form(s, &mut params);
            }
            _ => return Err(Reply::err("invalid_post_type")),
        }
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut bearer = None;
    let mut basic = None;
    if let Some(t) = auth.strip_prefix("Bearer ") {
        let t = t.trim();
        if !t.is_empty() {
            bearer = Some(t.to_string());
        }
    } else if let Some(b) = auth.strip_prefix("Basic ")
        && let Some(dec) = base64_decode(b).and_then(|v| String::from_utf8(v).ok())
        && let Some((id, secret)) = dec.split_once(':')
    {
        basic = Some((id.to_string(), secret.to_string()));
    }
    Ok(Req {
        method: method.to_string(),
        params,
        bearer,
        basic,
        content_type,
        json_body,
        warnings,
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(method): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string());
    let record = |reply: Option<&Reply>, token: Option<String>, params: Value| {
        let mut g = shared.lock();
        if reply.map(|r| r.status) == Some(StatusCode::TOO_MANY_REQUESTS) {
            g.rate_limited += 1;
        }
        g.requests.push(RecordedRequest {
            method: method.clone(),
            status: reply.map(|r| r.status.as_u16()),
            error: reply.and_then(|r| r.error.clone()),
            token,
            content_type: content_type.clone(),
            params,
            received_at,
        });
        drop(g);
        shared.bump();
    };

    // 1. outage, unknown method, injected per-method faults.
    let early = {
        let mut g = shared.lock();
        if g.outage {
            Some(Ok(Reply::http_html(503)))
        } else if !KNOWN_METHODS.contains(&method.as_str()) {
            let mut r = Reply::err_with(
                "unknown_method",
                Map::from_iter([("req_method".to_string(), Value::String(method.clone()))]),
            );
            r.status = StatusCode::NOT_FOUND;
            Some(Ok(r))
        } else {
            g.fail_next
                .get_mut(&method)
                .and_then(|q| q.pop_front())
                .map(Err)
        }
    };
    let mut fault = match early {
        Some(Ok(reply)) => {
            record(Some(&reply), None, Value::Null);
            return reply.into_response();
        }
        Some(Err(f)) => Some(f),
        None => None,
    };

    // 2. arguments.
    let req = match parse_request(&method, query.as_deref(), &headers, &body) {
        Ok(r) => r,
        Err(reply) => {
            record(Some(&reply), None, Value::Null);
            return reply.into_response();
        }
    };
    let params = Value::Object(req.params.clone());
    let token = req.token();

    // 3. per-channel faults.
    if fault.is_none()
        && matches!(method.as_str(), "chat.postMessage" | "chat.update")
        && let Some(ch) = req.str("channel")
    {
        fault = shared.lock().channel_fault(&ch);
    }
    match fault {
        Some(Fault::Hang) => {
            record(None, token, params);
            return std::future::pending::<Response>().await;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::AcceptThenHang) => {
            let reply = process(&mut shared.lock(), &req, received_at);
            record(Some(&reply), token, params);
            return std::future::pending::<Response>().await;
        }
        Some(Fault::AcceptThenDelay(delay)) => {
            let reply = process(&mut shared.lock(), &req, received_at);
            record(Some(&reply), token, params);
            tokio::time::sleep(delay).await;
            return reply.into_response();
        }
        Some(Fault::AcceptThenFail(answer)) => {
            process(&mut shared.lock(), &req, received_at);
            let reply = fault_reply(&answer).expect("AcceptThenFail answers with a replying fault");
            record(Some(&reply), token, params);
            return reply.into_response();
        }
        Some(Fault::HoldUntil(release)) => {
            record(None, token.clone(), params.clone());
            release.cancelled().await;
            let reply = process(&mut shared.lock(), &req, received_at);
            shared.bump();
            return reply.into_response();
        }
        Some(f) => {
            let reply = fault_reply(&f).expect("replying fault");
            record(Some(&reply), token, params);
            return reply.into_response();
        }
        None => {}
    }

    // 4. the method itself.
    let reply = {
        let mut g = shared.lock();
        process(&mut g, &req, received_at)
    };
    record(Some(&reply), token, params);
    reply.into_response()
}

fn process(g: &mut Inner, req: &Req, received_at: Instant) -> Reply {
    if req.method == "oauth.v2.access" {
        return oauth_v2_access(g, req);
    }
    let token = match req.token() {
        Some(t) => t,
        None => return Reply::err("not_authed"),
    };
    let spec = match g.tokens.get(&token) {
        Some(s) => s.clone(),
        None => return Reply::err("invalid_auth"),
    };
    match spec.state {
        TokenState::Valid => {}
        TokenState::Revoked => return Reply::err("token_revoked"),
        TokenState::Expired => return Reply::err("token_expired"),
        TokenState::AccountInactive => return Reply::err("account_inactive"),
    }
    if g.token_expires_at
        .get(&token)
        .is_some_and(|at| received_at >= *at)
    {
        return Reply::err("token_expired");
    }
    if let Err(secs) = take_method_token(g, &spec.team_id, &req.method) {
        return Reply::ratelimited(secs);
    }
    if let Some(needed) = required_scope(&req.method)
        && !spec.scopes.iter().any(|s| s == needed)
    {
        return Reply::err_with(
            "missing_scope",
            Map::from_iter([
                ("needed".to_string(), Value::String(needed.into())),
                ("provided".to_string(), Value::String(spec.scopes.join(","))),
            ]),
        );
    }
    let mut reply = match req.method.as_str() {
        "auth.test" => auth_test(&spec),
        "auth.revoke" => auth_revoke(g, req, &token),
        "chat.postMessage" => post_message(g, req, &spec, &token, received_at),
        "chat.update" => chat_update(g, req, &spec, &token, received_at),
        "users.lookupByEmail" => lookup_by_email(g, req, &spec),
        "conversations.join" => conversations_join(g, req),
        "conversations.open" => conversations_open(g, req),
        "conversations.list" if g.expired_list_cursors > 0 && req.nonempty("cursor").is_some() => {
            g.expired_list_cursors -= 1;
            Reply::err("invalid_cursor")
        }
        "conversations.list" => conversations_list(g, req, &spec),
        "conversations.history" => conversations_history(g, req, &spec),
        "conversations.replies" => conversations_replies(g, req, &spec),
        _ => Reply::err("unknown_method"),
    };
    if !req.warnings.is_empty() && reply.error.is_none() {
        add_warnings(&mut reply, &req.warnings);
    }
    reply
}

fn add_warnings(reply: &mut Reply, warnings: &[&str]) {
    if let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(&reply.body) {
        let mut all: Vec<String> = m
            .get("response_metadata")
            .and_then(|r| r.get("warnings"))
            .and_then(|w| w.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        all.extend(warnings.iter().map(|w| w.to_string()));
        m.insert("warning".into(), Value::String(all.join(",")));
        let rm = m.entry("response_metadata").or_insert_with(|| json!({}));
        if let Value::Object(rm) = rm {
            rm.insert("warnings".into(), json!(all));
        }
        reply.body = Value::Object(m).to_string();
    }
}

fn bot_id(spec: &TokenSpec) -> String {
    format!("B{}", spec.bot_user_id.get(1..).unwrap_or(""))
}

/// `auth.revoke`: the calling token stops working (`test=1` only says it would).
fn auth_revoke(g: &mut Inner, req: &Req, token: &str) -> Reply {
    let testing = matches!(req.str("test").as_deref(), Some("1" | "true"));
    if !testing && let Some(spec) = g.tokens.get_mut(token) {
        spec.state = TokenState::Revoked;
    }
    Reply::ok(json!({"ok": true, "revoked": !testing}))
}

fn auth_test(spec: &TokenSpec) -> Reply {
    let team_domain = spec.team_id.to_ascii_lowercase();
    Reply::ok(json!({
        "ok": true,
        "url": format!("https://{team_domain}.slack.com/"),
        "team": format!("Team {}", spec.team_id),
        "user": "alert-router",
        "team_id": spec.team_id,
        "user_id": spec.bot_user_id,
        "bot_id": bot_id(spec),
        "is_enterprise_install": false,
    }))
}

/// Resolves a `channel` argument for posting.
fn resolve_post_channel(g: &mut Inner, given: &str, spec: &TokenSpec) -> Result<String, Reply> {
    if is_user_id(given) {
        return match g.users.get(given) {
            Some(u) if !u.deleted => Ok(g.dm_for_user(given)),
            _ => Err(Reply::err("channel_not_found")),
        };
    }
    if given.starts_with('D') && g.is_dm_id(given) {
        return Ok(given.to_string());
    }
    let ch = match g.lookup_channel(given) {
        Some(c) => c.clone(),
        None => return Err(Reply::err("channel_not_found")),
    };
    if ch.spec.private && !ch.spec.bot_is_member {
        return Err(Reply::err("channel_not_found"));
    }
    if ch.spec.archived {
        return Err(Reply::err("is_archived"));
    }
    if !ch.spec.bot_is_member && !spec.scopes.iter().any(|s| s == "chat:write.public") {
        return Err(Reply::err("not_in_channel"));
    }
    Ok(ch.id)
}

struct Content {
    text: Option<String>,
    blocks: Option<Value>,
    attachments: Option<Value>,
    metadata: Option<Value>,
}

fn invalid_blocks(msg: String) -> Reply {
    Reply::err_with(
        "invalid_blocks",
        Map::from_iter([(
            "response_metadata".to_string(),
            json!({ "messages": [format!("[ERROR] {msg}")] }),
        )]),
    )
}

fn text_len(v: &Value, pointer: &str) -> usize {
    v.pointer(pointer)
        .and_then(|t| t.as_str())
        .map(|s| s.chars().count())
        .unwrap_or(0)
}

fn validate_blocks(blocks: &Value) -> Result<(), Reply> {
    let arr = match blocks {
        Value::Array(a) => a,
        _ => return Err(Reply::err("invalid_blocks_format")),
    };
    if arr.len() > MAX_BLOCKS {
        return Err(invalid_blocks(format!(
            "no more than {MAX_BLOCKS} items allowed [json-pointer:/blocks]"
        )));
    }
    for (i, b) in arr.iter().enumerate() {
        let ty = match b.get("type").and_then(|t| t.as_str()) {
            Some(t) if b.is_object() => t,
            _ => {
                return Err(invalid_blocks(format!(
                    "missing required field: type [json-pointer:/blocks/{i}]"
                )));
            }
        };
        match ty {
            "section" if text_len(b, "/text/text") > 3000 => {
                return Err(invalid_blocks(format!(
                    "must be less than 3001 characters [json-pointer:/blocks/{i}/text/text]"
                )));
            }
            "header" if text_len(b, "/text/text") > 150 => {
                return Err(invalid_blocks(format!(
                    "must be less than 151 characters [json-pointer:/blocks/{i}/text/text]"
                )));
            }
            "actions" => {
                let elements = b.get("elements").and_then(|e| e.as_array());
                for (j, e) in elements.into_iter().flatten().enumerate() {
                    if e.get("type").and_then(|t| t.as_str()) != Some("button") {
                        continue;
                    }
                    let p = format!("/blocks/{i}/elements/{j}");
                    if text_len(e, "/text/text") > 75 {
                        return Err(invalid_blocks(format!(
                            "must be less than 76 characters [json-pointer:{p}/text/text]"
                        )));
                    }
                    if text_len(e, "/value") > 2000 {
                        return Err(invalid_blocks(format!(
                            "must be less than 2001 characters [json-pointer:{p}/value]"
                        )));
                    }
                    if text_len(e, "/action_id") > 255 {
                        return Err(invalid_blocks(format!(
                            "must be less than 256 characters [json-pointer:{p}/action_id]"
                        )));
                    }
                }
            }
            _ => {}
        }
    }
    if blocks.to_string().chars().count() > MAX_BLOCKS_CHARS {
        return Err(Reply::err("msg_blocks_too_long"));
    }
    Ok(())
}

fn parse_content(req: &Req) -> Result<Content, Reply> {
    let text = req.str("text");
    let blocks = req
        .structured("blocks")
        .map_err(|_| Reply::err("invalid_blocks_format"))?;
    let attachments = req
        .structured("attachments")
        .map_err(|_| Reply::err("invalid_attachments"))?;
    let metadata = req
        .structured("metadata")
        .map_err(|_| Reply::err("invalid_metadata_format"))?;
    if let Some(b) = &blocks {
        validate_blocks(b)?;
    }
    if let Some(a) = &attachments {
        match a {
            Value::Array(arr) if arr.len() > MAX_ATTACHMENTS => {
                return Err(Reply::err("too_many_attachments"));
            }
            Value::Array(_) => {}
            _ => return Err(Reply::err("invalid_attachments")),
        }
    }
    if let Some(m) = &metadata {
        if !m.is_object() {
            return Err(Reply::err("invalid_metadata_format"));
        }
        let type_ok = m.get("event_type").map(|t| t.is_string()).unwrap_or(false);
        let payload_ok = m
            .get("event_payload")
            .map(|p| p.is_object())
            .unwrap_or(false);
        if !type_ok || !payload_ok {
            return Err(Reply::err("invalid_metadata_schema"));
        }
    }
    let has_text = text.as_deref().map(|t| !t.is_empty()).unwrap_or(false);
    let has_blocks = blocks
        .as_ref()
        .and_then(|b| b.as_array())
        .map(|a| !a.is_empty())
        .unwrap_or(false);
    let has_attachments = attachments
        .as_ref()
        .and_then(|a| a.as_array())
        .map(|a| !a.is_empty())
        .unwrap_or(false);
    if !has_text && !has_blocks && !has_attachments {
        return Err(Reply::err("no_text"));
    }
    Ok(Content {
        text,
        blocks,
        attachments,
        metadata,
    })
}

/// Refills the bucket and returns its tokens and the seconds until one is available.
fn refill(g: &mut Inner, key: (String, String), (per_second, burst): (f64, u32)) -> f64 {
    let now = Instant::now();
    let b = g.buckets.entry(key).or_insert(Bucket {
        tokens: burst as f64,
        last: now,
    });
    let elapsed = now.duration_since(b.last).as_secs_f64();
    b.tokens = (b.tokens + elapsed * per_second).min(burst as f64);
    b.last = now;
    b.tokens
}

fn wait_secs(tokens: f64, per_second: f64) -> u64 {
    let wait = (1.0 - tokens) / per_second.max(f64::MIN_POSITIVE);
    (wait.ceil() as u64).max(1)
}

/// Takes one token from the (team, channel) bucket and the workspace bucket,
/// or returns the Retry-After seconds.
fn take_rate_token(g: &mut Inner, team: &str, channel_id: &str) -> Result<(), u64> {
    let mut keys = Vec::new();
    let mut retry = 0;
    if let Some(rate) = g.channel_rate {
        let key = (team.to_string(), channel_id.to_string());
        let tokens = refill(g, key.clone(), rate);
        if tokens < 1.0 {
            retry = retry.max(wait_secs(tokens, rate.0));
        }
        keys.push(key);
    }
    if let Some(rate) = g.workspace_rate {
        let key = (team.to_string(), String::new());
        let tokens = refill(g, key.clone(), rate);
        if tokens < 1.0 {
            retry = retry.max(wait_secs(tokens, rate.0));
        }
        keys.push(key);
    }
    if retry > 0 {
        return Err(retry);
    }
    for k in keys {
        if let Some(b) = g.buckets.get_mut(&k) {
            b.tokens -= 1.0;
        }
    }
    Ok(())
}

fn message_json(spec: &TokenSpec, ts: &str, c: &Content, thread_ts: Option<&str>) -> Value {
    let mut m = json!({
        "type": "message",
        "user": spec.bot_user_id,
        "bot_id": bot_id(spec),
        "app_id": "A0FAKESLACK",
        "team": spec.team_id,
        "ts": ts,
        "text": c.text.clone().unwrap_or_default(),
    });
    if let Some(b) = &c.blocks {
        m["blocks"] = b.clone();
    }
    if let Some(a) = &c.attachments {
        m["attachments"] = a.clone();
    }
    if let Some(md) = &c.metadata {
        m["metadata"] = md.clone();
    }
    if let Some(t) = thread_ts {
        m["thread_ts"] = Value::String(t.to_string());
    }
    m
}

/// A message timestamp as Slack writes it: `1700000000.000100`.
fn is_message_ts(ts: &str) -> bool {
    ts.split_once('.').is_some_and(|(seconds, micros)| {
        !seconds.is_empty()
            && micros.len() == 6
            && seconds
                .bytes()
                .chain(micros.bytes())
                .all(|b| b.is_ascii_digit())
    })
}

fn post_message(
    g: &mut Inner,
    req: &Req,
    spec: &TokenSpec,
    token: &str,
    received_at: Instant,
) -> Reply {
    let Some(given) = req.nonempty("channel") else {
        return Reply::err("channel_not_found");
    };
    let channel_id = match resolve_post_channel(g, &given, spec) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if let Err(secs) = take_rate_token(g, &spec.team_id, &channel_id) {
        return Reply::ratelimited(secs);
    }
    let mut content = match parse_content(req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut warnings = Vec::new();
    let recorded_text = content.text.clone();
    if let Some(t) = &content.text
        && t.chars().count() > MAX_POST_TEXT_CHARS
    {
        content.text = Some(t.chars().take(MAX_POST_TEXT_CHARS).collect());
        warnings.push("message_truncated");
    }
    let mut thread_ts = req.nonempty("thread_ts");
    if let Some(parent) = &thread_ts {
        if !is_message_ts(parent) {
            return Reply::err("invalid_thread_ts");
        }
        if !g.messages.contains(&(channel_id.clone(), parent.clone())) {
            if !g.orphan_replies_to_channel {
                return Reply::err("thread_not_found");
            }
            thread_ts = None;
        }
    }
    let ts = g.next_ts();
    g.messages.insert((channel_id.clone(), ts.clone()));
    g.posts.push(RecordedPost {
        method: req.method.clone(),
        channel: given,
        channel_id: channel_id.clone(),
        team_id: spec.team_id.clone(),
        text: recorded_text,
        blocks: content.blocks.clone(),
        attachments: content.attachments.clone(),
        metadata: content.metadata.clone(),
        thread_ts: thread_ts.clone(),
        token: token.to_string(),
        ts: ts.clone(),
        body: Value::Object(req.params.clone()),
        received_at,
    });
    let mut reply = Reply::ok(json!({
        "ok": true,
        "channel": channel_id,
        "ts": ts,
        "message": message_json(spec, &ts, &content, thread_ts.as_deref()),
    }));
    if !warnings.is_empty() {
        add_warnings(&mut reply, &warnings);
    }
    reply
}

fn chat_update(
    g: &mut Inner,
    req: &Req,
    spec: &TokenSpec,
    token: &str,
    received_at: Instant,
) -> Reply {
    let Some(channel) = req.nonempty("channel") else {
        return Reply::err("channel_not_found");
    };
    let known = g.channel_by_id(&channel).is_some() || g.is_dm_id(&channel);
    if !known {
        return Reply::err("channel_not_found");
    }
    // A private channel the bot is not in does not exist for it.
    if let Some(c) = g.channel_by_id(&channel)
        && c.spec.private
        && !c.spec.bot_is_member
    {
        return Reply::err("channel_not_found");
    }
    // chat.update answers `is_inactive` for "a frozen, archived or deleted
    // channel" (not chat.postMessage's `is_archived`).
    if let Some(c) = g.channel_by_id(&channel)
        && c.spec.archived
    {
        return Reply::err("is_inactive");
    }
    let Some(ts) = req.nonempty("ts") else {
        return Reply::err("message_not_found");
    };
    if !g.messages.contains(&(channel.clone(), ts.clone())) {
        return Reply::err("message_not_found");
    }
    let Some(original) = g
        .posts
        .iter()
        .find(|p| p.channel_id == channel && p.ts == ts)
        .cloned()
    else {
        return Reply::err("message_not_found");
    };
    if original.team_id != spec.team_id {
        return Reply::err("cant_update_message");
    }
    let content = match parse_content(req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if content
        .text
        .as_ref()
        .map(|t| t.chars().count() > MAX_UPDATE_TEXT_CHARS)
        .unwrap_or(false)
    {
        return Reply::err("msg_too_long");
    }
    g.updates.push(RecordedPost {
        method: req.method.clone(),
        channel: channel.clone(),
        channel_id: channel.clone(),
        team_id: spec.team_id.clone(),
        text: content.text.clone(),
        blocks: content.blocks.clone(),
        attachments: content.attachments.clone(),
        metadata: content.metadata.clone(),
        thread_ts: original.thread_ts.clone(),
        token: token.to_string(),
        ts: ts.clone(),
        body: Value::Object(req.params.clone()),
        received_at,
    });
    Reply::ok(json!({
        "ok": true,
        "channel": channel,
        "ts": ts,
        "text": content.text.clone().unwrap_or_default(),
        "message": message_json(spec, &ts, &content, original.thread_ts.as_deref()),
    }))
}

fn lookup_by_email(g: &mut Inner, req: &Req, spec: &TokenSpec) -> Reply {
    let Some(email) = req.nonempty("email") else {
        return Reply::err("invalid_arguments");
    };
    let user = g
        .users
        .values()
        .find(|u| u.email.eq_ignore_ascii_case(&email) && !u.deleted);
    match user {
        Some(u) => {
            let name = u.email.split('@').next().unwrap_or("").to_string();
            Reply::ok(json!({
                "ok": true,
                "user": {
                    "id": u.id,
                    "team_id": spec.team_id,
                    "name": name,
                    "deleted": false,
                    "real_name": name,
                    "is_bot": false,
                    "profile": {
                        "email": u.email,
                        "real_name": name,
                        "display_name": name,
                    },
                },
            }))
        }
        None => Reply::err("users_not_found"),
    }
}

fn channel_json(c: &Channel) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "is_channel": !c.spec.private,
        "is_group": c.spec.private,
        "is_im": false,
        "is_mpim": false,
        "is_private": c.spec.private,
        "is_archived": c.spec.archived,
        "is_member": c.spec.bot_is_member,
        "name_normalized": c.name,
    })
}

fn conversations_join(g: &mut Inner, req: &Req) -> Reply {
    let Some(given) = req.nonempty("channel") else {
        return Reply::err("channel_not_found");
    };
    if g.is_dm_id(&given) {
        return Reply::err("method_not_supported_for_channel_type");
    }
    // conversations.join takes an id, not a name.
    let Some(idx) = g.channels.iter().position(|c| c.id == given) else {
        return Reply::err("channel_not_found");
    };
    let ch = g.channels[idx].clone();
    if ch.spec.private {
        return Reply::err(if ch.spec.bot_is_member {
            "method_not_supported_for_channel_type"
        } else {
            "channel_not_found"
        });
    }
    if ch.spec.archived {
        return Reply::err("is_archived");
    }
    let already = ch.spec.bot_is_member;
    g.channels[idx].spec.bot_is_member = true;
    let mut body = json!({"ok": true, "channel": channel_json(&g.channels[idx])});
    if already {
        body["warning"] = json!("already_in_channel");
        body["response_metadata"] = json!({"warnings": ["already_in_channel"]});
    }
    Reply::ok(body)
}

fn conversations_open(g: &mut Inner, req: &Req) -> Reply {
    if let Some(ch) = req.nonempty("channel") {
        if g.is_dm_id(&ch) {
            return Reply::ok(json!({"ok": true, "channel": {"id": ch}}));
        }
        return Reply::err("channel_not_found");
    }
    let Some(users) = req.nonempty("users") else {
        return Reply::err("users_list_not_supplied");
    };
    let list: Vec<&str> = users
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if list.len() != 1 {
        // Multi-person DMs are not modelled by the fake.
        return Reply::err("invalid_arguments");
    }
    let user = list[0];
    match g.users.get(user) {
        None => Reply::err("user_not_found"),
        Some(u) if u.deleted => Reply::err("user_disabled"),
        Some(_) => {
            let existed = g.dms.contains_key(user);
            let d = g.dm_for_user(user);
            let mut body = json!({"ok": true, "channel": {"id": d}});
            if existed {
                body["no_op"] = json!(true);
                body["already_open"] = json!(true);
            }
            Reply::ok(body)
        }
    }
}

// ----- conversations.list / conversations.history -----

fn has_scope(spec: &TokenSpec, scope: &str) -> bool {
    spec.scopes.iter().any(|s| s == scope)
}

fn missing_scope_reply(spec: &TokenSpec, needed: &str) -> Reply {
    Reply::err_with(
        "missing_scope",
        Map::from_iter([
            ("needed".to_string(), Value::String(needed.into())),
            ("provided".to_string(), Value::String(spec.scopes.join(","))),
        ]),
    )
}

/// A Slack boolean argument: `true`/`1` in a form or query, `true` or a
/// non-zero number in JSON. Anything else (absent, `false`, `0`) is false.
fn value_truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().map(|f| f != 0.0).unwrap_or(false),
        Some(Value::String(s)) => s.trim() == "1" || s.trim().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

fn truthy(req: &Req, key: &str) -> bool {
    value_truthy(req.params.get(key))
}

/// `limit`: `Ok(None)` when absent, empty or 0 (the method's default);
/// `Err` when not a non-negative integer.
fn parse_limit(req: &Req) -> Result<Option<usize>, ()> {
    match req.str("limit") {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => s
            .trim()
            .parse::<usize>()
            .map(|n| (n > 0).then_some(n))
            .map_err(|_| ()),
    }
}

/// A Slack timestamp (`1234567890.123456`, or whole seconds) in microseconds.
fn parse_ts_micros(s: &str) -> Option<u64> {
    let s = s.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut f: String = frac.chars().take(6).collect();
    while f.len() < 6 {
        f.push('0');
    }
    secs.parse::<u64>()
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(f.parse::<u64>().ok()?)
}

fn ts_arg(req: &Req, key: &str) -> Result<Option<u64>, ()> {
    match req.nonempty(key) {
        None => Ok(None),
        Some(s) => parse_ts_micros(&s).map(Some).ok_or(()),
    }
}

/// An opaque cursor: base64 of `prefix:value` (Slack's look like
/// `dGVhbTpDMDYxRkE1UEI=`, i.e. `team:C061FA5PB`).
fn encode_cursor(prefix: &str, value: &str) -> String {
    base64_encode(format!("{prefix}:{value}").as_bytes())
}

/// `Ok(None)` without a cursor; `invalid_cursor` for one this method did not issue.
fn decode_cursor(req: &Req, prefix: &str) -> Result<Option<String>, Reply> {
    let Some(c) = req.nonempty("cursor") else {
        return Ok(None);
    };
    base64_decode(&c)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(':'))
                .map(str::to_string)
        })
        .filter(|v| !v.is_empty())
        .map(Some)
        .ok_or_else(|| Reply::err("invalid_cursor"))
}

/// Takes one token from the (team, method) bucket set by
/// `set_method_rate_limit`, or returns the Retry-After seconds.
fn take_method_token(g: &mut Inner, team: &str, method: &str) -> Result<(), u64> {
    let Some(&(per_second, burst)) = g.method_rates.get(method) else {
        return Ok(());
    };
    let now = Instant::now();
    let b = g
        .method_buckets
        .entry((team.to_string(), method.to_string()))
        .or_insert(Bucket {
            tokens: burst as f64,
            last: now,
        });
    let elapsed = now.duration_since(b.last).as_secs_f64();
    b.tokens = (b.tokens + elapsed * per_second).min(burst as f64);
    b.last = now;
    if b.tokens < 1.0 {
        return Err(wait_secs(b.tokens, per_second));
    }
    b.tokens -= 1.0;
    Ok(())
}

/// A channel as `conversations.list` shows it: `channel_json` plus the
/// other fields of Slack's limited conversation object.
fn list_channel_json(g: &Inner, c: &Channel) -> Value {
    let mut v = channel_json(c);
    v["created"] = json!(1_700_000_000);
    v["creator"] = json!("U0CREATOR");
    v["is_general"] = json!(false);
    v["unlinked"] = json!(0);
    v["is_shared"] = json!(false);
    v["is_ext_shared"] = json!(false);
    v["is_org_shared"] = json!(false);
    v["pending_shared"] = json!([]);
    v["is_pending_ext_shared"] = json!(false);
    v["topic"] = json!({"value": "", "creator": "", "last_set": 0});
    v["purpose"] = json!({"value": "", "creator": "", "last_set": 0});
    v["previous_names"] = json!(g.previous_names.get(&c.id).cloned().unwrap_or_default());
    v
}

fn conversations_list(g: &Inner, req: &Req, spec: &TokenSpec) -> Reply {
    // "team_id: encoded team id to list channels in, required if token
    // belongs to org-wide app" (the org's workspaces are this fake's one).
    match req.nonempty("team_id") {
        None if spec.org_wide => return Reply::err("missing_argument"),
        Some(team) if team != spec.team_id => return Reply::err("team_access_not_granted"),
        _ => {}
    }
    let limit = match parse_limit(req) {
        Ok(l) => l.unwrap_or(LIST_DEFAULT_LIMIT),
        Err(()) => return Reply::err("invalid_limit"),
    };
    if limit > LIST_MAX_LIMIT {
        return Reply::err("invalid_limit");
    }
    let types_arg = req.str("types").unwrap_or_default();
    let mut types: Vec<&str> = types_arg
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if types.is_empty() {
        types.push("public_channel");
    }
    let mut missing: Vec<&str> = Vec::new();
    for t in &types {
        let scope = match *t {
            "public_channel" => "channels:read",
            "private_channel" => "groups:read",
            "mpim" => "mpim:read",
            "im" => "im:read",
            _ => return Reply::err("invalid_types"),
        };
        if !has_scope(spec, scope) && !missing.contains(&scope) {
            missing.push(scope);
        }
    }
    if !missing.is_empty() {
        return missing_scope_reply(spec, &missing.join(","));
    }
    let start = match decode_cursor(req, "team") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let public = types.contains(&"public_channel");
    let private = types.contains(&"private_channel");
    let im = types.contains(&"im");
    // (id, archived, object); multi-person DMs are not modelled.
    let mut all: Vec<(String, bool, Value)> = Vec::new();
    for c in &g.channels {
        // A bot sees the private channels it is a member of, no others.
        let listed = if c.spec.private {
            private && c.spec.bot_is_member
        } else {
            public
        };
        if listed {
            all.push((c.id.clone(), c.spec.archived, list_channel_json(g, c)));
        }
    }
    if im {
        for (user, d) in &g.dms {
            let deleted = g.users.get(user).map(|u| u.deleted).unwrap_or(false);
            all.push((
                d.clone(),
                false,
                json!({
                    "id": d,
                    "created": 1_700_000_000,
                    "is_im": true,
                    "is_org_shared": false,
                    "user": user,
                    "is_user_deleted": deleted,
                    "priority": 0,
                }),
            ));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(start) = &start {
        all.retain(|(id, _, _)| id >= start);
    }
    let page_size = g.list_page_cap.map_or(limit, |cap| limit.min(cap));
    let next_cursor = all
        .get(page_size)
        .map(|(id, _, _)| encode_cursor("team", id))
        .unwrap_or_default();
    // As in Slack, filters apply after the page is cut: a page can hold
    // fewer than `limit` channels (even none) while more follow.
    let exclude_archived = truthy(req, "exclude_archived");
    let channels: Vec<Value> = all
        .into_iter()
        .take(page_size)
        .filter(|(_, archived, _)| !(exclude_archived && *archived))
        .map(|(_, _, v)| v)
        .collect();
    Reply::ok(json!({
        "ok": true,
        "channels": channels,
        "response_metadata": {"next_cursor": next_cursor},
    }))
}

/// Whether a recorded post shows in its channel's history: top-level
/// messages and thread replies sent with `reply_broadcast`.
fn in_channel_history(p: &RecordedPost) -> bool {
    p.thread_ts.is_none() || value_truthy(p.body.get("reply_broadcast"))
}

/// What stands for a token in a person's reply ([`FakeSlack::reply_as_person`]), before their user id.
const PERSON_TOKEN_PREFIX: &str = "person:";

/// Replies by the `ts` of the message they reply to, in one conversation.
type Threads<'a> = HashMap<&'a str, Vec<&'a RecordedPost>>;

/// The threads of `channel`, gathered in one pass over the posts (a page
/// of history can show hundreds of messages, each with its reply count).
fn threads_in<'a>(g: &'a Inner, channel: &str) -> Threads<'a> {
    let mut threads: Threads<'a> = HashMap::new();
    for post in g
        .posts
        .iter()
        .chain(&g.people_replies)
        .filter(|p| p.channel_id == channel)
    {
        if let Some(parent) = post.thread_ts.as_deref() {
            threads.entry(parent).or_default().push(post);
        }
    }
    threads
}

/// A recorded post as `conversations.history` returns it (after any
/// `chat.update`), like the `message` of `chat.postMessage`; `threads` are
/// its conversation's ([`threads_in`]).
fn history_message(g: &Inner, p: &RecordedPost, with_metadata: bool, threads: &Threads) -> Value {
    if let Some(person) = p.token.strip_prefix(PERSON_TOKEN_PREFIX) {
        // A person's message: no bot or app fields.
        return json!({
            "type": "message",
            "user": person,
            "team": p.team_id,
            "ts": p.ts,
            "text": p.text.clone().unwrap_or_default(),
            "thread_ts": p.thread_ts,
        });
    }
    let spec = g
        .tokens
        .get(&p.token)
        .cloned()
        .unwrap_or_else(|| TokenSpec::bot(&p.team_id, "U0UNKNOWN"));
    let update = g
        .updates
        .iter()
        .rev()
        .find(|u| u.channel_id == p.channel_id && u.ts == p.ts);
    let mut content = match update {
        // chat.update replaces text, blocks and attachments wholesale.
        Some(u) => Content {
            text: u.text.clone(),
            blocks: u.blocks.clone(),
            attachments: u.attachments.clone(),
            metadata: u.metadata.clone().or_else(|| p.metadata.clone()),
        },
        None => Content {
            text: p
                .text
                .as_ref()
                .map(|t| t.chars().take(MAX_POST_TEXT_CHARS).collect()),
            blocks: p.blocks.clone(),
            attachments: p.attachments.clone(),
            metadata: p.metadata.clone(),
        },
    };
    if !with_metadata {
        content.metadata = None;
    }
    let mut m = message_json(&spec, &p.ts, &content, p.thread_ts.as_deref());
    if p.thread_ts.is_some() {
        m["subtype"] = json!("thread_broadcast");
        return m;
    }
    let replies = threads.get(p.ts.as_str()).map_or(&[][..], Vec::as_slice);
    if !replies.is_empty() {
        let mut users: Vec<String> = Vec::new();
        for r in replies {
            let u = match r.token.strip_prefix(PERSON_TOKEN_PREFIX) {
                Some(person) => person.to_string(),
                None => g
                    .tokens
                    .get(&r.token)
                    .map(|t| t.bot_user_id.clone())
                    .unwrap_or_else(|| "U0UNKNOWN".to_string()),
            };
            if !users.contains(&u) {
                users.push(u);
            }
        }
        let latest = replies
            .iter()
            .map(|r| r.ts.clone())
            .max()
            .unwrap_or_default();
        m["thread_ts"] = json!(p.ts);
        m["reply_count"] = json!(replies.len());
        m["reply_users_count"] = json!(users.len());
        m["reply_users"] = json!(users);
        m["latest_reply"] = json!(latest);
    }
    m
}

/// The conversation `conversations.history` and `conversations.replies`
/// may read, or their error: it must be a conversation id (names, `#names`
/// and user ids are `channel_not_found`) the token has the history scope
/// for, and a channel the bot is in.
fn readable_conversation(g: &Inner, req: &Req, spec: &TokenSpec) -> Result<String, Reply> {
    let Some(channel) = req.nonempty("channel") else {
        return Err(Reply::err("channel_not_found"));
    };
    let needed = if g.is_dm_id(&channel) {
        "im:history"
    } else {
        match g.channel_by_id(&channel) {
            None => return Err(Reply::err("channel_not_found")),
            Some(c) if c.spec.private && !c.spec.bot_is_member => {
                return Err(Reply::err("channel_not_found"));
            }
            Some(c) if c.spec.private => "groups:history",
            Some(_) => "channels:history",
        }
    };
    if !has_scope(spec, needed) {
        return Err(missing_scope_reply(spec, needed));
    }
    if let Some(c) = g.channel_by_id(&channel)
        && !c.spec.bot_is_member
    {
        return Err(Reply::err("not_in_channel"));
    }
    Ok(channel)
}

fn conversations_history(g: &Inner, req: &Req, spec: &TokenSpec) -> Reply {
    let channel = match readable_conversation(g, req, spec) {
        Ok(channel) => channel,
        Err(reply) => return reply,
    };
    let limit = match parse_limit(req) {
        Ok(l) => l.unwrap_or(HISTORY_DEFAULT_LIMIT).min(HISTORY_MAX_LIMIT),
        Err(()) => return Reply::err("invalid_arguments"),
    };
    let Ok(oldest) = ts_arg(req, "oldest") else {
        return Reply::err("invalid_ts_oldest");
    };
    let Ok(latest) = ts_arg(req, "latest") else {
        return Reply::err("invalid_ts_latest");
    };
    let before = match decode_cursor(req, "next_ts") {
        Ok(None) => None,
        Ok(Some(v)) => match parse_ts_micros(&v) {
            Some(t) => Some(t),
            None => return Reply::err("invalid_cursor"),
        },
        Err(r) => return r,
    };
    let inclusive = truthy(req, "inclusive");
    let mut msgs: Vec<(u64, &RecordedPost)> = g
        .posts
        .iter()
        .filter(|p| p.channel_id == channel && in_channel_history(p))
        .filter_map(|p| parse_ts_micros(&p.ts).map(|t| (t, p)))
        .filter(|(t, _)| match oldest {
            Some(o) if inclusive => *t >= o,
            Some(o) => *t > o,
            None => true,
        })
        .filter(|(t, _)| match latest {
            Some(l) if inclusive => *t <= l,
            Some(l) => *t < l,
            None => true,
        })
        .filter(|(t, _)| before.is_none_or(|b| *t <= b))
        .collect();
    // Newest first.
    msgs.sort_by_key(|m| std::cmp::Reverse(m.0));
    let has_more = msgs.len() > limit;
    let with_metadata = truthy(req, "include_all_metadata");
    let threads = threads_in(g, &channel);
    let messages: Vec<Value> = msgs
        .iter()
        .take(limit)
        .map(|(_, p)| history_message(g, p, with_metadata, &threads))
        .collect();
    let mut body = json!({
        "ok": true,
        "messages": messages,
        "has_more": has_more,
        "pin_count": 0,
        "channel_actions_ts": null,
        "channel_actions_count": 0,
    });
    if let Some(l) = req.nonempty("latest") {
        body["latest"] = json!(l);
    }
    if has_more {
        body["response_metadata"] =
            json!({"next_cursor": encode_cursor("next_ts", &msgs[limit].1.ts)});
    }
    Reply::ok(body)
}

/// `conversations.replies`: the thread of the message `ts`, the parent first
/// (on the first page), then its replies oldest first; `oldest`, `latest`
/// and `inclusive` bound the replies; `thread_not_found` when `ts` is no
/// message of the conversation.
fn conversations_replies(g: &Inner, req: &Req, spec: &TokenSpec) -> Reply {
    let channel = match readable_conversation(g, req, spec) {
        Ok(channel) => channel,
        Err(reply) => return reply,
    };
    let Some(ts) = req.nonempty("ts") else {
        return Reply::err("thread_not_found");
    };
    let parent = g.posts.iter().find(|p| {
        p.channel_id == channel
            && p.ts == ts
            && p.thread_ts.is_none()
            && g.messages.contains(&(channel.clone(), ts.clone()))
    });
    let Some(parent) = parent else {
        return Reply::err("thread_not_found");
    };
    let limit = match parse_limit(req) {
        Ok(l) => l.unwrap_or(REPLIES_MAX_LIMIT).min(REPLIES_MAX_LIMIT),
        Err(()) => return Reply::err("invalid_arguments"),
    };
    let Ok(oldest) = ts_arg(req, "oldest") else {
        return Reply::err("invalid_ts_oldest");
    };
    let Ok(latest) = ts_arg(req, "latest") else {
        return Reply::err("invalid_ts_latest");
    };
    let from = match decode_cursor(req, "from_ts") {
        Ok(None) => None,
        Ok(Some(v)) => match parse_ts_micros(&v) {
            Some(t) => Some(t),
            None => return Reply::err("invalid_cursor"),
        },
        Err(r) => return r,
    };
    let inclusive = truthy(req, "inclusive");
    let mut replies: Vec<(u64, &RecordedPost)> = g
        .posts
        .iter()
        .chain(&g.people_replies)
        .filter(|p| p.channel_id == channel && p.thread_ts.as_deref() == Some(ts.as_str()))
        .filter_map(|p| parse_ts_micros(&p.ts).map(|t| (t, p)))
        .filter(|(t, _)| match oldest {
            Some(o) if inclusive => *t >= o,
            Some(o) => *t > o,
            None => true,
        })
        .filter(|(t, _)| match latest {
            Some(l) if inclusive => *t <= l,
            Some(l) => *t < l,
            None => true,
        })
        .filter(|(t, _)| from.is_none_or(|f| *t >= f))
        .collect();
    // Oldest first.
    replies.sort_by_key(|m| m.0);
    let has_more = replies.len() > limit;
    let with_metadata = truthy(req, "include_all_metadata");
    let threads = threads_in(g, &channel);
    let first_page = from.is_none();
    let messages: Vec<Value> = first_page
        .then_some(parent)
        .into_iter()
        .chain(replies.iter().take(limit).map(|(_, p)| *p))
        .map(|p| {
            let mut message = history_message(g, p, with_metadata, &threads);
            // Only a reply also sent to the channel is a `thread_broadcast`.
            if !in_channel_history(p)
                && let Some(m) = message.as_object_mut()
            {
                m.remove("subtype");
            }
            message
        })
        .collect();
    let mut body = json!({"ok": true, "messages": messages, "has_more": has_more});
    if has_more {
        body["response_metadata"] =
            json!({"next_cursor": encode_cursor("from_ts", &replies[limit].1.ts)});
    }
    Reply::ok(body)
}

fn oauth_v2_access(g: &mut Inner, req: &Req) -> Reply {
    let (client_id, client_secret) = match &req.basic {
        Some((id, secret)) => (Some(id.clone()), Some(secret.clone())),
        None => (req.nonempty("client_id"), req.nonempty("client_secret")),
    };
    let Some((want_id, want_secret)) = g.oauth_client.clone() else {
        return Reply::err("invalid_client_id");
    };
    if client_id.as_deref() != Some(want_id.as_str()) {
        return Reply::err("invalid_client_id");
    }
    if client_secret.as_deref() != Some(want_secret.as_str()) {
        return Reply::err("bad_client_secret");
    }
    match req.str("grant_type").as_deref() {
        Some("refresh_token") => {}
        // `grant_type` is optional for the code exchange, as in Slack's SDKs.
        None | Some("authorization_code") => return exchange_code(g, req),
        Some(_) => return Reply::err("invalid_grant_type"),
    }
    let Some(used) = req.nonempty("refresh_token") else {
        return Reply::err("invalid_refresh_token");
    };
    let now = Instant::now();
    let grace = g.refresh_grace;
    let entry = match g.refresh_tokens.get_mut(&used) {
        Some(e) => e,
        None => return Reply::err("invalid_refresh_token"),
    };
    if let Some(at) = entry.revoked_at
        && now >= at
    {
        return Reply::err("invalid_refresh_token");
    }
    if entry.revoked_at.is_none() {
        entry.revoked_at = Some(now + grace);
    }
    let entry = entry.clone();
    let scopes = entry.scopes.clone();
    let expires_in = g.access_token_lifetime.unwrap_or(ACCESS_TOKEN_EXPIRES_IN);
    let suffix = g.random_suffix();
    let access = format!("xoxe.xoxb-1-{suffix}");
    g.token_expires_at
        .insert(access.clone(), now + Duration::from_secs(expires_in));
    let suffix = g.random_suffix();
    let refresh = format!("xoxe-1-{suffix}");
    g.tokens.insert(
        access.clone(),
        TokenSpec {
            team_id: entry.team_id.clone(),
            bot_user_id: entry.bot_user_id.clone(),
            scopes: scopes.clone(),
            state: TokenState::Valid,
            org_wide: false,
        },
    );
    g.refresh_tokens.insert(
        refresh.clone(),
        RefreshEntry {
            team_id: entry.team_id.clone(),
            bot_user_id: entry.bot_user_id.clone(),
            scopes: scopes.clone(),
            revoked_at: None,
        },
    );
    g.refresh_count += 1;
    g.issued.push(IssuedTokens {
        access_token: access.clone(),
        refresh_token: refresh.clone(),
        team_id: entry.team_id.clone(),
        bot_user_id: entry.bot_user_id.clone(),
        expires_in,
        used_refresh_token: used,
    });
    Reply::ok(json!({
        "ok": true,
        "app_id": "A0FAKESLACK",
        "scope": scopes.join(","),
        "token_type": "bot",
        "access_token": access,
        "bot_user_id": entry.bot_user_id,
        "refresh_token": refresh,
        "expires_in": expires_in,
        "team": {"id": entry.team_id, "name": format!("Team {}", entry.team_id)},
        "enterprise": null,
        "is_enterprise_install": false,
    }))
}

/// `oauth.v2.access` with a code: once, in time, with the same `redirect_uri`.
fn exchange_code(g: &mut Inner, req: &Req) -> Reply {
    let Some(code) = req.nonempty("code") else {
        return Reply::err("invalid_code");
    };
    let Some(entry) = g.auth_codes.get_mut(&code) else {
        return Reply::err("invalid_code");
    };
    if entry.used || entry.issued_at.elapsed() >= AUTHORIZATION_CODE_LIFETIME {
        return Reply::err("invalid_code");
    }
    if let Some(want) = &entry.redirect_uri
        && req.str("redirect_uri").as_deref() != Some(want.as_str())
    {
        return Reply::err("bad_redirect_uri");
    }
    entry.used = true;
    let entry = entry.clone();
    let now = Instant::now();
    let suffix = g.random_suffix();
    let rotating = g.token_rotation;
    let expires_in = g.access_token_lifetime.unwrap_or(ACCESS_TOKEN_EXPIRES_IN);
    let access = if rotating {
        format!("xoxe.xoxb-1-{suffix}")
    } else {
        format!("xoxb-1-{suffix}")
    };
    g.tokens.insert(
        access.clone(),
        TokenSpec {
            team_id: entry.team_id.clone(),
            bot_user_id: entry.bot_user_id.clone(),
            scopes: entry.scopes.clone(),
            state: TokenState::Valid,
            org_wide: false,
        },
    );
    let refresh = rotating.then(|| format!("xoxe-1-{}", g.random_suffix()));
    if let Some(refresh) = &refresh {
        g.token_expires_at
            .insert(access.clone(), now + Duration::from_secs(expires_in));
        g.refresh_tokens.insert(
            refresh.clone(),
            RefreshEntry {
                team_id: entry.team_id.clone(),
                bot_user_id: entry.bot_user_id.clone(),
                scopes: entry.scopes.clone(),
                revoked_at: None,
            },
        );
    }
    g.installs.push(InstalledTokens {
        access_token: access.clone(),
        refresh_token: refresh.clone(),
        expires_in: rotating.then_some(expires_in),
        team_id: entry.team_id.clone(),
        bot_user_id: entry.bot_user_id.clone(),
        scopes: entry.scopes.clone(),
        code,
    });
    let mut body = json!({
        "ok": true,
        "access_token": access,
        "token_type": "bot",
        "scope": entry.scopes.join(","),
        "bot_user_id": entry.bot_user_id,
        "app_id": "A0FAKESLACK",
        "team": {"id": entry.team_id, "name": entry.team_name},
        "enterprise": null,
        "authed_user": {"id": "U0INSTALLER"},
        "is_enterprise_install": false,
    });
    if let Some(refresh) = refresh {
        body["refresh_token"] = json!(refresh);
        body["expires_in"] = json!(expires_in);
    }
    Reply::ok(body)
}

/// `GET /oauth/v2/authorize`: Slack's consent page, answered at once as the
/// installer the test chose. Errors are pages, as Slack shows them; the
/// answer is a redirect back to `redirect_uri` with `code` (or
/// `error=access_denied`) and the `state` unchanged.
async fn authorize(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let mut args = Map::new();
    parse_form(query.as_deref().unwrap_or(""), &mut args);
    let args: HashMap<String, String> = args
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
        .collect();
    let page = |text: &str| {
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!("<html><body><h1>Something went wrong</h1><p>{text}</p></body></html>"),
        )
            .into_response()
    };
    shared.lock().authorize_requests.push(args.clone());
    shared.bump();
    let mut g = shared.lock();
    let arg = |name: &str| args.get(name).filter(|v| !v.is_empty()).cloned();
    if g.oauth_client.as_ref().map(|(id, _)| id) != arg("client_id").as_ref() {
        return page("invalid_client_id");
    }
    let Some(redirect_uri) = arg("redirect_uri") else {
        // Slack would use the app's one Redirect URL; the fake knows none.
        return page("bad_redirect_uri: the fake needs redirect_uri");
    };
    let Ok(mut back) = url::Url::parse(&redirect_uri) else {
        return page("bad_redirect_uri");
    };
    let scopes: Vec<String> = arg("scope")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if scopes.is_empty() {
        return page("invalid_scope: no bot scopes requested");
    }
    let outcome = match g.installer.clone() {
        None => return page("no one is signed in (call approve_installs_as or deny_installs)"),
        Some(Installer::Deny) => ("error", "access_denied".to_string()),
        Some(Installer::Approve { team_id, team_name }) => (
            "code",
            g.mint_code(&team_id, &team_name, scopes, Some(redirect_uri.clone())),
        ),
    };
    drop(g);
    {
        let mut pairs = back.query_pairs_mut();
        pairs.append_pair(outcome.0, &outcome.1);
        if let Some(state) = arg("state") {
            pairs.append_pair("state", &state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

// ---------------------------------------------------------------------------
// Interactivity: clicks as Slack sends them, and their response_url
// ---------------------------------------------------------------------------

/// A click on a button of a message, as Slack reports it to the app.
#[derive(Clone, Debug)]
pub struct Click {
    pub team_id: String,
    pub user_id: String,
    /// The clicker's name (Slack sends it as `user.name` and `user.username`).
    pub user_name: String,
    pub channel_id: String,
    pub message_ts: String,
    pub action_id: String,
    /// The button's `value`, as the app set it.
    pub value: String,
    /// The message as posted, which Slack sends along whole: its blocks,
    /// its fallback text and its attachments (`Null`: none).
    pub blocks: Value,
    pub text: String,
    pub attachments: Value,
}

impl Click {
    /// A click by `user_id` on a button with this `action_id` and `value`,
    /// on a message the test made up.
    pub fn new(team_id: &str, user_id: &str, action_id: &str, value: &str) -> Click {
        Click {
            team_id: team_id.to_string(),
            user_id: user_id.to_string(),
            user_name: user_id.to_lowercase(),
            channel_id: "C0FAKECLICK".to_string(),
            message_ts: "1700000000.000100".to_string(),
            action_id: action_id.to_string(),
            value: value.to_string(),
            blocks: json!([]),
            text: String::new(),
            attachments: Value::Null,
        }
    }

    /// A click by `user_id` on the button `action_id` of a recorded post;
    /// `None` when the post has no such button.
    pub fn on_post(post: &RecordedPost, action_id: &str, user_id: &str) -> Option<Click> {
        let value = button_value(post, action_id)?;
        Some(Click {
            team_id: post.team_id.clone(),
            user_id: user_id.to_string(),
            user_name: user_id.to_lowercase(),
            channel_id: post.channel_id.clone(),
            message_ts: post.ts.clone(),
            action_id: action_id.to_string(),
            value,
            blocks: blocks_of(post),
            text: post.text.clone().unwrap_or_default(),
            attachments: match &post.attachments {
                Some(Value::String(text)) => serde_json::from_str(text).unwrap_or(Value::Null),
                Some(attachments) => attachments.clone(),
                None => Value::Null,
            },
        })
    }
}

/// A post's blocks, whether sent as JSON or as a form field holding JSON.
fn blocks_of(post: &RecordedPost) -> Value {
    match &post.blocks {
        Some(Value::String(text)) => serde_json::from_str(text).unwrap_or(Value::Null),
        Some(blocks) => blocks.clone(),
        None => json!([]),
    }
}

/// The `value` of the button `action_id` in a recorded post's `actions` blocks.
pub fn button_value(post: &RecordedPost, action_id: &str) -> Option<String> {
    blocks_of(post)
        .as_array()?
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
        .find(|e| e["action_id"] == action_id)?["value"]
        .as_str()
        .map(str::to_string)
}

/// `v0=` + hex HMAC-SHA256 keyed by the signing secret over
/// `v0:{timestamp}:{body}`: Slack's `X-Slack-Signature`.
pub fn slack_signature(signing_secret: &str, timestamp: &str, body: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(signing_secret.as_bytes())
        .expect("HMAC takes any key");
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// The request Slack sends for a click: a form body with one field,
/// `payload` (the JSON), and the two signature headers.
#[derive(Clone, Debug)]
pub struct SignedClick {
    /// `payload=<url-encoded JSON>`, byte for byte what is signed.
    pub body: String,
    /// `X-Slack-Request-Timestamp`.
    pub timestamp: String,
    /// `X-Slack-Signature`.
    pub signature: String,
    /// The payload as JSON.
    pub payload: Value,
    pub response_url: String,
}

impl SignedClick {
    /// The request to the app's interactivity URL, with Slack's headers.
    pub fn request(&self, http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        http.post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", &self.timestamp)
            .header("x-slack-signature", &self.signature)
            .body(self.body.clone())
    }

    /// The same request with another signature (a forgery).
    pub fn with_signature(&self, signature: &str) -> SignedClick {
        SignedClick {
            signature: signature.to_string(),
            ..self.clone()
        }
    }
}

impl FakeSlack {
    /// The request Slack sends when `click` happens now, signed with
    /// `signing_secret`; its `response_url` is on this fake.
    pub fn click(&self, click: &Click, signing_secret: &str) -> SignedClick {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.click_at(click, signing_secret, now)
    }

    /// [`FakeSlack::click`] with `X-Slack-Request-Timestamp` = `timestamp`
    /// (Unix seconds), e.g. an old request.
    pub fn click_at(&self, click: &Click, signing_secret: &str, timestamp: i64) -> SignedClick {
        let (response_url, trigger_id) = {
            let mut g = self.lock();
            let n = g.next_id();
            let path = format!(
                "/actions/{}/{n}/{}",
                click.team_id,
                uuid::Uuid::new_v4().simple()
            );
            g.response_urls.insert(path.clone());
            (
                format!("{}{path}", self.base_url()),
                format!("{n}.{}", uuid::Uuid::new_v4().simple()),
            )
        };
        let action_ts = format!("{timestamp}.{:06}", timestamp.rem_euclid(1_000_000));
        // The fields of Slack's block_actions reference, for a button in a
        // channel message of a non-enterprise workspace.
        let payload = json!({
            "type": "block_actions",
            "user": {
                "id": click.user_id,
                "username": click.user_name,
                "name": click.user_name,
                "team_id": click.team_id,
            },
            "api_app_id": "A0FAKEAPP",
            "token": "fake-verification-token",
            "container": {
                "type": "message",
                "message_ts": click.message_ts,
                "channel_id": click.channel_id,
                "is_ephemeral": false,
            },
            "trigger_id": trigger_id,
            "team": {"id": click.team_id, "domain": "fake-workspace"},
            "enterprise": null,
            "is_enterprise_install": false,
            "channel": {"id": click.channel_id, "name": "fake-channel"},
            "message": {
                "type": "message",
                "subtype": "bot_message",
                "bot_id": "B0FAKEBOT",
                "app_id": "A0FAKEAPP",
                "ts": click.message_ts,
                "team": click.team_id,
                "text": click.text,
                "blocks": click.blocks,
                "attachments": click.attachments,
            },
            "state": {"values": {}},
            "response_url": response_url,
            "actions": [{
                "action_id": click.action_id,
                "block_id": "fake-block",
                "text": {"type": "plain_text", "text": "Acknowledge", "emoji": true},
                "value": click.value,
                "style": "primary",
                "type": "button",
                "action_ts": action_ts,
            }],
        });
        // Slack's JSON escapes every `/` (`https:\/\/hooks.slack.com\/…`); a
        // `/` only ever occurs inside JSON strings, so this is that encoding.
        let json = payload.to_string().replace('/', "\\/");
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("payload", &json)
            .finish();
        let timestamp = timestamp.to_string();
        SignedClick {
            signature: slack_signature(signing_secret, &timestamp, &body),
            body,
            timestamp,
            payload,
            response_url,
        }
    }
}

/// `POST /actions/…`: a click's `response_url`. Takes a JSON message, as
/// Slack's does; answers 200 `ok`, 400 `invalid_payload` for anything that
/// is not a JSON object, 404 `no_service` for a URL no click was given.
/// (Slack's limit of 5 posts within 30 minutes is not enforced.)
async fn response_url(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = |status: StatusCode, body: &'static str| {
        (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
    };
    let mut g = shared.lock();
    if !g.response_urls.contains(uri.path()) {
        return text(StatusCode::NOT_FOUND, "no_service");
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_json = content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"));
    g.responses.push(RecordedResponse {
        path: uri.path().to_string(),
        content_type,
        body: parsed.clone(),
        received_at: Instant::now(),
    });
    drop(g);
    shared.bump();
    if is_json && parsed.is_object() {
        text(StatusCode::OK, "ok")
    } else {
        text(StatusCode::BAD_REQUEST, "invalid_payload")
    }
}
