//! Fault soak: three worker processes, the real broker and Redis, thousands of events with poison, through Slack errors, 429 storms, an outage, a killed worker, a broker restart and revoked and expired tokens; every destination ends delivered once, at its place, or dead-lettered with its reason.
//!
//! `SOAK_PROFILE=short` (the default; part of `cargo test`, about 1,700
//! messages in seven phases) or `SOAK_PROFILE=long` (release checks: over
//! 20,000 messages, four cycles of faults, each killing a worker, and two
//! broker restarts). `SOAK_SEED=N` publishes another event mix; the mix is
//! reproducible from its seed, the interleaving with the faults is not.
//! `-- --nocapture` shows the summary (and the workers' log lines).
//!
//! Restarting RabbitMQ closes every client's connections, so this test lives
//! alone in its binary (cargo runs test binaries one after another) and
//! restarts the broker at most once in the short profile.
//!
//! The phases that kill a worker carry no email traffic: an email the SMTP
//! server accepted just before its worker was killed, before the worker
//! could record it, is sent again by the next one (SMTP has nothing like
//! the lost-post check Slack's history allows). Everything else is expected
//! to reach each destination exactly once.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use alert_router::broker::{HEADER_DETAIL, HEADER_REASON};
use serde_json::{Value, json};
use support::fake_slack::{ChannelSpec, Fault, RecordedPost, TokenSpec};
use support::smtp_sink::ReceivedMail;
use support::{BrokerStopped, TestEnv, WorkerProcess, rabbitmqctl};

// ---------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------

/// One stretch of the soak: what it publishes and what goes wrong meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing fails; every workspace's channel names get resolved.
    Warmup,
    /// Bursts of HTTP 5xx, `internal_error`, `fatal_error`, and a few token
    /// errors (`invalid_auth`, `token_revoked`, `token_expired`) as HTTP 200.
    SlackErrors,
    /// Bursts of HTTP 429 with `Retry-After`.
    RateLimitStorm,
    /// Every method answers 503, then Slack cannot be reached at all:
    /// Slack targets go by email.
    Outage,
    /// A worker is killed (SIGKILL) mid-burst and a new one started.
    KillWorker,
    /// RabbitMQ is stopped and started mid-burst.
    BrokerRestart,
    /// One workspace's token is revoked, another's expires (and is
    /// refreshed); the revoked workspace is then installed again.
    Tokens,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Warmup => "warm-up",
            Phase::SlackErrors => "slack 5xx/errors",
            Phase::RateLimitStorm => "429 storm",
            Phase::Outage => "outage (503, unreachable)",
            Phase::KillWorker => "worker SIGKILL",
            Phase::BrokerRestart => "broker restart",
            Phase::Tokens => "revoke/expire tokens",
        }
    }

    /// Whether its events may need email: not while a worker is killed.
    fn email_traffic(self) -> bool {
        self != Phase::KillWorker
    }
}

struct Profile {
    name: &'static str,
    phases: Vec<Phase>,
    /// Valid events per phase.
    events_per_phase: usize,
    /// Each worker's `amqp.prefetch`. What a killed worker held is checked
    /// in Slack's history afterwards, within Tier 3 (50 calls a minute per
    /// workspace), so this bounds how long recovering from a kill takes.
    prefetch: u16,
    /// Failure timeout of each wait; the short profile finishes far sooner.
    settle_timeout: Duration,
}

impl Profile {
    fn from_env() -> Profile {
        use Phase::*;
        match std::env::var("SOAK_PROFILE").as_deref() {
            Ok("long") => {
                let mut phases = vec![Warmup];
                for cycle in 0..4 {
                    phases.extend([SlackErrors, RateLimitStorm, Outage, KillWorker]);
                    if cycle % 2 == 1 {
                        phases.push(BrokerRestart);
                    }
                    phases.push(Tokens);
                }
                Profile {
                    name: "long",
                    phases,
                    events_per_phase: 900,
                    prefetch: 25,
                    settle_timeout: Duration::from_secs(600),
                }
            }
            Ok("short") | Err(_) => Profile {
                name: "short",
                phases: vec![
                    Warmup,
                    SlackErrors,
                    RateLimitStorm,
                    Outage,
                    KillWorker,
                    BrokerRestart,
                    Tokens,
                ],
                events_per_phase: 230,
                prefetch: 10,
                settle_timeout: Duration::from_secs(150),
            },
            Ok(other) => panic!("SOAK_PROFILE is `short` or `long`, not {other:?}"),
        }
    }
}

/// SplitMix64: a seeded, dependency-free generator, so a mix can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------
// The world: workspaces, channels, people, rules
// ---------------------------------------------------------------------------

/// The bot scopes of README's app manifest. Without `chat:write.public` the
/// bot joins a public channel to post in it, and so can read its history
/// for the lost-post check after a crash.
const MANIFEST_SCOPES: &[&str] = &[
    "chat:write",
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

/// The app's OAuth client, for refreshing the rotating workspace's token.
const CLIENT_ID: &str = "1234.5678";
const CLIENT_SECRET: &str = "soak-client-secret";

/// Worker log lines the soak waits for or counts.
const CONSUMING: &str = "consuming";
const LOST_BROKER: &str = "lost RabbitMQ; reconnecting";
const ALREADY_DELIVERED: &str = "already delivered; not sending again";
/// Warnings and errors, plus the lines the soak waits for and counts.
const LOG_FILTER: &str = "warn,alert_router::worker=info,alert_router::deliver=info";

const ONCALL: &str = "oncall@example.com";
const PAYMENTS_ONCALL: &str = "payments-oncall@example.com";
const SECURITY_ONCALL: &str = "security-oncall@example.com";
const SECURITY_TEAM: &str = "security-team@example.com";
/// A mailbox the mail server refuses for good (550): dead-lettered at once.
const BOUNCE: &str = "nobody@example.com";

const PAY: &str = "C0SOAKPAY";
const OPS: &str = "C0SOAKOPS";
const SEC: &str = "C0SOAKSEC";
const PRIV: &str = "G0SOAKPRIV";
/// Public, without the bot: the first post joins it.
const JOIN: &str = "C0SOAKJOIN";

/// Channels by name, by id and by bare name; DMs by user id, by email and to
/// the assignee; plain email targets; rule and default fallback addresses.
const RULES: &str = r##"version: 1
defaults:
  slack_channel: C0ESCALATE
  email: ["oncall@example.com"]
unmatched: dead-letter
rules:
  - name: payments
    matchers: ['team="payments"']
    notify:
      - slack_channel: "#soak-payments"
      - slack_user: U0SOAK01
    email: ["payments-oncall@example.com"]
  - name: ops
    matchers: ['team="ops"']
    notify:
      - slack_channel: C0SOAKOPS
      - slack_email: user02@example.com
  - name: security
    matchers: ['team="security"']
    notify:
      - slack_channel: soak-security
      - email: security-team@example.com
    email: ["security-oncall@example.com"]
  - name: sre
    matchers: ['team="sre"']
    notify:
      - slack_channel: G0SOAKPRIV
      - slack_channel: C0SOAKJOIN
      - assignee
"##;

/// People U0SOAK01..=U0SOAK12 (`userNN@example.com`); 1 and 2 are in the rules.
const PEOPLE: usize = 12;

fn user_id(k: usize) -> String {
    format!("U0SOAK{k:02}")
}

fn user_email(k: usize) -> String {
    format!("user{k:02}@example.com")
}

/// Addresses of plain email targets; never anyone's fallback.
fn notify_email(k: usize) -> String {
    format!("notify{k:02}@example.com")
}

/// A workspace of the soak and its current bot token.
struct Workspace {
    id: String,
    token: String,
}

/// The default workspace; half the events.
const WS_A: usize = 0;
/// Its token is revoked in the tokens phase, then it is installed again.
const WS_B: usize = 1;
/// Its token rotates; it expires in the tokens phase and is refreshed.
const WS_C: usize = 2;

// ---------------------------------------------------------------------------
// What each event should become
// ---------------------------------------------------------------------------

/// One place an event must reach once (two routes to it merge into one).
#[derive(Debug, Clone)]
struct Dest {
    /// Where Slack shows it (`C…`, `G…`, or the person's `D…`); `None` for email targets.
    conversation: Option<String>,
    /// The target as the worker names it in a fallback email.
    targets: BTreeSet<String>,
    /// Where its email may go: the target's own address, else its fallback.
    addresses: BTreeSet<String>,
    /// The mail server refuses the address: dead-lettered `undeliverable`.
    bounces: bool,
}

#[derive(Debug)]
struct ExpectedEvent {
    id: String,
    phase: usize,
    dests: Vec<Dest>,
    /// Published while its workspace's token was revoked: email only.
    revoked: bool,
    bounces: bool,
}

/// A message that must end in the dead-letter queue.
#[derive(Debug, Clone)]
struct ExpectedDead {
    label: String,
    reason: &'static str,
    /// Part of the `x-alert-router-detail` that explains it.
    detail: &'static str,
}

/// What a person (by number) is called in this event: one form per person,
/// so a Slack lookup failing mid-outage cannot split one person in two.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Id,
    Email,
}

/// Builds one event's targets and the destinations they must reach.
struct EventPlan {
    forms: BTreeMap<usize, Form>,
    assignee: Option<(usize, Form)>,
    own_targets: Vec<Value>,
    dests: BTreeMap<String, Dest>,
}

impl EventPlan {
    fn add(
        &mut self,
        key: String,
        conversation: Option<String>,
        target: String,
        address: String,
        bounces: bool,
    ) {
        let dest = self.dests.entry(key).or_insert_with(|| Dest {
            conversation,
            targets: BTreeSet::new(),
            addresses: BTreeSet::new(),
            bounces,
        });
        dest.targets.insert(target);
        dest.addresses.insert(address);
    }

    /// A DM to person `k` routed with `fallback` (the rule's `email`, or `defaults.email`).
    fn person(&mut self, soak: &World, k: usize, fallback: &str) {
        let form = *self.forms.entry(k).or_insert(Form::Id);
        let (target, address) = match form {
            Form::Id => {
                // A DM to the assignee's Slack user falls back to their email.
                let assignee = self.assignee == Some((k, Form::Id));
                let address = if assignee {
                    user_email(k)
                } else {
                    fallback.to_string()
                };
                (format!("slack_user:{}", user_id(k)), address)
            }
            Form::Email => (format!("slack_email:{}", user_email(k)), user_email(k)),
        };
        let dm = soak.dms[k].clone();
        self.add(format!("dm:{k}"), Some(dm), target, address, false);
    }

    fn channel(&mut self, id: &str, target: String, fallback: &str) {
        self.add(
            format!("chan:{id}"),
            Some(id.to_string()),
            target,
            fallback.to_string(),
            false,
        );
    }

    fn email(&mut self, address: &str) {
        self.add(
            format!("mail:{address}"),
            None,
            format!("email:{address}"),
            address.to_string(),
            address == BOUNCE,
        );
    }
}

/// The fixed parts of the world the generator needs.
struct World {
    workspaces: Vec<String>,
    /// `D…` conversation of person k (index 0 unused).
    dms: Vec<String>,
}

const TEAMS: [&str; 5] = ["payments", "ops", "security", "sre", "none"];
const TYPES: [&str; 3] = ["escalation.triggered", "issue.created", "issue.updated"];
const SEVERITIES: [&str; 5] = ["critical", "high", "medium", "low", "info"];

/// What the generator was asked for.
struct Draw<'a> {
    id: &'a str,
    phase: usize,
    workspace: usize,
    team: &'a str,
    /// Plain email targets (and bouncing ones) allowed.
    allow_email: bool,
    dedup_key: Option<&'a str>,
}

/// Generates a valid event: its JSON and what it must become.
fn valid_event(rng: &mut Rng, world: &World, draw: &Draw<'_>) -> (Value, ExpectedEvent) {
    let Draw {
        id,
        phase,
        workspace,
        team,
        allow_email,
        dedup_key,
    } = *draw;
    let mut plan = EventPlan {
        forms: BTreeMap::new(),
        assignee: None,
        own_targets: Vec::new(),
        dests: BTreeMap::new(),
    };
    // Person 1 is a DM by id in the payments rule, person 2 by email in ops.
    plan.forms.insert(1, Form::Id);
    plan.forms.insert(2, Form::Email);
    // An assignee, always for sre (whose rule notifies them).
    if team == "sre" || rng.percent(40) {
        let k = 3 + rng.below(PEOPLE - 2);
        let form = if rng.percent(50) {
            Form::Id
        } else {
            Form::Email
        };
        plan.forms.insert(k, form);
        plan.assignee = Some((k, form));
    }

    match team {
        "payments" => {
            plan.channel(PAY, "slack_channel:#soak-payments".into(), PAYMENTS_ONCALL);
            plan.person(world, 1, PAYMENTS_ONCALL);
        }
        "ops" => {
            plan.channel(OPS, format!("slack_channel:{OPS}"), ONCALL);
            plan.person(world, 2, ONCALL);
        }
        "security" => {
            plan.channel(SEC, "slack_channel:soak-security".into(), SECURITY_ONCALL);
            plan.email(SECURITY_TEAM);
        }
        "sre" => {
            plan.channel(PRIV, format!("slack_channel:{PRIV}"), ONCALL);
            plan.channel(JOIN, format!("slack_channel:{JOIN}"), ONCALL);
            let (k, _) = plan.assignee.expect("sre events have an assignee");
            plan.person(world, k, ONCALL);
        }
        _ => {}
    }

    // The event's own targets, on top of the rules (they fall back to defaults.email).
    let own = if team == "none" {
        1 + rng.below(3)
    } else {
        rng.below(3)
    };
    for _ in 0..own {
        match rng.below(if allow_email { 6 } else { 4 }) {
            0 | 1 => {
                let k = 3 + rng.below(PEOPLE - 2);
                let form = *plan.forms.entry(k).or_insert(if rng.percent(50) {
                    Form::Id
                } else {
                    Form::Email
                });
                plan.own_targets.push(match form {
                    Form::Id => json!({"slack_user": user_id(k)}),
                    Form::Email => json!({"slack_email": user_email(k)}),
                });
                plan.person(world, k, ONCALL);
            }
            // Merges with the ops rule's channel, named by id there.
            2 => {
                plan.own_targets.push(json!({"slack_channel": "#soak-ops"}));
                plan.channel(OPS, "slack_channel:#soak-ops".into(), ONCALL);
            }
            // Merges with the payments rule's channel, named `#soak-payments` there.
            3 => {
                plan.own_targets.push(json!({"slack_channel": PAY}));
                plan.channel(PAY, format!("slack_channel:{PAY}"), ONCALL);
            }
            4 => {
                let address = notify_email(1 + rng.below(PEOPLE));
                if !plan.dests.contains_key(&format!("mail:{address}")) {
                    plan.own_targets.push(json!({"email": address}));
                    plan.email(&address);
                }
            }
            _ => {
                if rng.percent(25) && !plan.dests.contains_key(&format!("mail:{BOUNCE}")) {
                    plan.own_targets.push(json!({"email": BOUNCE}));
                    plan.email(BOUNCE);
                }
            }
        }
    }
    if plan.dests.is_empty() {
        // A `none` event whose draws all merged away still names someone.
        plan.own_targets.push(json!({"slack_channel": "#soak-ops"}));
        plan.channel(OPS, "slack_channel:#soak-ops".into(), ONCALL);
    }

    let mut event = json!({
        "id": id,
        "type": rng.pick(&TYPES),
        "severity": rng.pick(&SEVERITIES),
        "title": format!("Soak {id}: checkout latency <!channel> & more"),
        "workspace": world.workspaces[workspace],
        "labels": {"team": team, "phase": phase.to_string()},
        "summary": "p99 above the SLO for 5 minutes",
    });
    if let Some((k, form)) = plan.assignee {
        event["assignee"] = match form {
            Form::Id => {
                json!({"name": format!("Person {k}"), "email": user_email(k), "slack_user": user_id(k)})
            }
            Form::Email => json!({"name": format!("Person {k}"), "email": user_email(k)}),
        };
    }
    if !plan.own_targets.is_empty() {
        event["targets"] = Value::Array(plan.own_targets.clone());
    }
    if let Some(key) = dedup_key {
        event["dedup_key"] = json!(key);
    }
    let dests: Vec<Dest> = plan.dests.into_values().collect();
    let expected = ExpectedEvent {
        id: id.to_string(),
        phase,
        bounces: dests.iter().any(|d| d.bounces),
        dests,
        revoked: false,
    };
    (event, expected)
}

/// Kinds of poison [`poison`] makes; the last one is an oversized body.
const POISON_KINDS: usize = 11;
const TOO_LARGE: usize = POISON_KINDS - 1;

/// Poison of kind `kind` (below [`POISON_KINDS`]), unique by `n`: its body
/// and why it is dead-lettered.
fn poison(kind: usize, n: usize, world: &World) -> (Vec<u8>, &'static str, &'static str) {
    let id = format!("soak-poison-{n:05}");
    let ws = &world.workspaces[WS_A];
    let valid = |extra: Value| {
        let mut event = json!({"id": id, "type": "escalation.triggered", "severity": "high",
                               "title": format!("Poison {n}"), "workspace": ws,
                               "labels": {"team": "ops"}});
        if let (Some(base), Value::Object(extra)) = (event.as_object_mut(), extra) {
            base.extend(extra);
        }
        event.to_string().into_bytes()
    };
    match kind {
        0 => (
            format!(r#"{{"id":"{id}","type":"escalation.triggered","severity":"#).into_bytes(),
            "invalid_json",
            "not valid JSON",
        ),
        1 => {
            let mut body = vec![0xff, 0xfe];
            body.extend_from_slice(id.as_bytes());
            (body, "invalid_json", "not UTF-8")
        }
        2 => (
            valid(json!({"severity": "urgent"})),
            "invalid_event",
            "`severity`",
        ),
        3 => (
            json!({"type": "issue.created", "severity": "low", "title": id})
                .to_string()
                .into_bytes(),
            "invalid_event",
            "`id`",
        ),
        4 => (
            valid(json!({"type": "Escalation Triggered"})),
            "invalid_event",
            "`type`",
        ),
        5 => (
            format!(r#"["{id}", 1, 2]"#).into_bytes(),
            "invalid_event",
            "invalid type",
        ),
        6 => (
            valid(json!({"targets": [{"pager": "on-call"}]})),
            "invalid_event",
            "`targets[0]`",
        ),
        7 => (
            valid(json!({"workspace": format!("T0UNKNOWN{n}")})),
            "forbidden_target",
            "slack.allowed_workspaces",
        ),
        8 => (
            valid(json!({"targets": [{"email": format!("someone{n}@evil.example")}]})),
            "forbidden_target",
            "email.allowed_domains",
        ),
        9 => (
            valid(json!({"labels": {"team": "nobody"}})),
            "no_route",
            "no rule matches",
        ),
        _ => {
            // Over `amqp.max_body_bytes` (256 KiB by default).
            let summary = "x".repeat(300 * 1024);
            (
                valid(json!({"summary": summary})),
                "too_large",
                "over the limit",
            )
        }
    }
}

// ---------------------------------------------------------------------------
// What happened: posts and mails, as they arrive
// ---------------------------------------------------------------------------

/// A fallback email as the soak reads it.
struct Mail {
    /// The "Sent by email because" line: the targets it stands in for, and why.
    because: String,
}

#[derive(Default)]
struct Ledger {
    posts_seen: usize,
    mails_seen: usize,
    /// (event id, conversation) → posts there.
    posts: HashMap<(String, String), usize>,
    /// (event id, address) → emails there.
    mails: HashMap<(String, String), Vec<Mail>>,
    /// Posts or mails the soak cannot tie to an event (no metadata, no "Event:" line).
    unattributed: Vec<String>,
}

impl Ledger {
    fn ingest(&mut self, env: &TestEnv) {
        let posts = env.slack.posts_since(self.posts_seen);
        self.posts_seen += posts.len();
        for post in &posts {
            match post_event_id(post) {
                Some(id) => *self.posts.entry((id, post.channel_id.clone())).or_default() += 1,
                None => self.unattributed.push(format!(
                    "a post to {} without the event id in its metadata",
                    post.channel_id
                )),
            }
        }
        let mails = env.smtp.mails_since(self.mails_seen);
        self.mails_seen += mails.len();
        for mail in &mails {
            match read_mail(mail) {
                Some((id, because)) => {
                    for to in &mail.to {
                        self.mails
                            .entry((id.clone(), to.to_lowercase()))
                            .or_default()
                            .push(Mail {
                                because: because.clone(),
                            });
                    }
                }
                None => self
                    .unattributed
                    .push(format!("an email to {:?} without an Event: line", mail.to)),
            }
        }
    }

    fn posts_at(&self, id: &str, conversation: &str) -> usize {
        self.posts
            .get(&(id.to_string(), conversation.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Emails of the event to one of the destination's addresses: all of
    /// them, and those naming one of its targets.
    fn mails_for(&self, id: &str, dest: &Dest) -> (usize, usize) {
        let mut any = 0;
        let mut naming = 0;
        for address in &dest.addresses {
            for mail in self
                .mails
                .get(&(id.to_string(), address.clone()))
                .into_iter()
                .flatten()
            {
                any += 1;
                if dest.targets.iter().any(|t| names_target(&mail.because, t)) {
                    naming += 1;
                }
            }
        }
        (any, naming)
    }

    /// Reached by Slack or by an email to one of its addresses (an address
    /// gets one email per event, whichever of its targets needed it first).
    fn reached(&self, event: &ExpectedEvent, dest: &Dest) -> bool {
        dest.conversation
            .as_deref()
            .is_some_and(|c| self.posts_at(&event.id, c) > 0)
            || self.mails_for(&event.id, dest).0 > 0
    }
}

fn post_event_id(post: &RecordedPost) -> Option<String> {
    post.metadata.as_ref()?["event_payload"]["event_id"]
        .as_str()
        .map(str::to_string)
}

/// The event id and the "Sent by email because" line of a fallback email.
fn read_mail(mail: &ReceivedMail) -> Option<(String, String)> {
    let body = mail.text_body()?;
    let id = body
        .lines()
        .find_map(|l| l.strip_prefix("Event: "))?
        .split(" (")
        .next()?
        .to_string();
    let because = body
        .lines()
        .find_map(|l| l.strip_prefix("Sent by email because: "))
        .unwrap_or_default()
        .to_string();
    Some((id, because))
}

/// Whether `because` lists `target` (followed by its reason, the next target, or the end).
fn names_target(because: &str, target: &str) -> bool {
    because.match_indices(target).any(|(at, _)| {
        let before_ok = at == 0 || because[..at].ends_with("; ");
        let after = &because[at + target.len()..];
        before_ok && (after.is_empty() || after.starts_with(':') || after.starts_with(';'))
    })
}

// ---------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------

/// Events that share a `dedup_key`, published one after another.
struct Incident {
    key: String,
    workspace: usize,
    team: &'static str,
    /// Events of it still to publish.
    left: usize,
}

struct PhaseReport {
    phase: Phase,
    valid: usize,
    poison: usize,
    took: Duration,
}

struct Soak {
    env: TestEnv,
    profile: Profile,
    seed: u64,
    rng: Rng,
    world: World,
    workspaces: Vec<Workspace>,
    workers: Vec<WorkerProcess>,
    workers_started: usize,
    kills: usize,
    broker_restarts: usize,
    ledger: Ledger,
    events: Vec<ExpectedEvent>,
    /// Indexes into `events` not yet reached everywhere.
    unsettled: Vec<usize>,
    /// Messages that must end in the dead-letter queue, by body.
    dead: HashMap<Vec<u8>, ExpectedDead>,
    poison_count: usize,
    bounce_events: usize,
    reports: Vec<PhaseReport>,
    /// Lines from workers that are gone (killed), kept for the counts.
    retired_log_lines: Vec<String>,
    /// The rotating workspace's first refresh token: where the chain of refreshes starts.
    initial_refresh_token: String,
    started: Instant,
}

impl Soak {
    async fn start(profile: Profile, seed: u64) -> Soak {
        let mut env = TestEnv::start(RULES).await;
        let s = &mut env.settings;
        // A killed worker's claims free within five seconds (a shorter lease
        // is lost by workers that stall on this loaded machine).
        s.delivery.claim_lease = Duration::from_secs(5);
        // Distinct delays (one queue each), about 20 s in all: enough for a
        // claim a killed worker held to lapse while its event retries.
        s.delivery.retry_delays = [500, 1000, 2000, 3000, 5000, 8000]
            .map(Duration::from_millis)
            .to_vec();
        // A token stored again is seen within a second.
        s.slack.token_cache_ttl = Duration::from_secs(1);
        // Posts held across the broker restart (for as long as `rabbitmqctl
        // stop_app` takes) must not time out: a post whose answer is lost is
        // retried without the lost-post check when the history's allowance
        // has no call to spare.
        s.slack.request_timeout = Duration::from_secs(30);
        s.amqp.prefetch = profile.prefetch;

        let id = env.id.clone();
        let ws_b = format!("T{}B", id.to_uppercase());
        let ws_c = format!("T{}C", id.to_uppercase());
        s.slack.allowed_workspaces = vec![env.workspace.clone(), ws_b.clone(), ws_c.clone()];
        s.email.allowed_domains = vec!["example.com".into()];

        let slack = &env.slack;
        let bot = |team: &str| TokenSpec::bot(team, "U0BOT").with_scopes(MANIFEST_SCOPES);
        slack.add_token(&env.token, bot(&env.workspace));
        for (id, name, spec) in [
            (PAY, "soak-payments", ChannelSpec::member()),
            (OPS, "soak-ops", ChannelSpec::member()),
            (SEC, "soak-security", ChannelSpec::member()),
            (PRIV, "soak-sre-private", ChannelSpec::private(true)),
            (JOIN, "soak-join", ChannelSpec::not_member()),
        ] {
            slack.add_channel(id, name, spec);
        }
        let mut dms = vec![String::new()];
        for k in 1..=PEOPLE {
            slack.add_user(&user_id(k), &user_email(k));
            dms.push(slack.dm_channel_id(&user_id(k)));
        }
        // Built at run time: no token-shaped literal in the tree.
        let token_b = format!("xox{}-soak-b0-{id}", "b");
        slack.add_token(&token_b, bot(&ws_b));
        env.store_token(&ws_b, &token_b).await;
        let token_c = format!("xox{}-soak-c-{id}", "b");
        let refresh_c = format!("xox{}-soak-c-{id}", "e");
        slack.add_token(&token_c, bot(&ws_c));
        slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
        let scopes = MANIFEST_SCOPES.iter().map(|s| s.to_string()).collect();
        slack.add_refresh_token_with_scopes(&refresh_c, &ws_c, "U0BOT", scopes);
        env.store_token_record(
            &ws_c,
            &json!({"access_token": token_c, "refresh_token": refresh_c,
                    "expires_at": chrono::Utc::now().timestamp() + 30_000,
                    "team_id": ws_c, "bot_user_id": "U0BOT"}),
        )
        .await;
        env.smtp.reject_recipient(BOUNCE, 550);

        let workspaces = vec![
            Workspace {
                id: env.workspace.clone(),
                token: env.token.clone(),
            },
            Workspace {
                id: ws_b,
                token: token_b,
            },
            Workspace {
                id: ws_c,
                token: token_c,
            },
        ];
        let world = World {
            workspaces: workspaces.iter().map(|w| w.id.clone()).collect(),
            dms,
        };
        let mut soak = Soak {
            env,
            profile,
            seed,
            rng: Rng(seed),
            world,
            workspaces,
            workers: Vec::new(),
            workers_started: 0,
            kills: 0,
            broker_restarts: 0,
            ledger: Ledger::default(),
            events: Vec::new(),
            unsettled: Vec::new(),
            dead: HashMap::new(),
            poison_count: 0,
            bounce_events: 0,
            reports: Vec::new(),
            retired_log_lines: Vec::new(),
            initial_refresh_token: refresh_c,
            started: Instant::now(),
        };
        for _ in 0..3 {
            soak.start_worker();
        }
        for i in 0..soak.workers.len() {
            soak.wait_for_worker_log(i, CONSUMING, 1).await;
        }
        soak
    }

    fn start_worker(&mut self) {
        let worker = self.env.start_worker_process_with(&[
            ("SLACK_CLIENT_ID", CLIENT_ID),
            ("SLACK_CLIENT_SECRET", CLIENT_SECRET),
            ("RUST_LOG", LOG_FILTER),
        ]);
        self.workers.push(worker);
        self.workers_started += 1;
    }

    // ----- publishing -----

    /// Publishes `n` valid events (and poison among them: about one message in 16).
    async fn publish(&mut self, phase_index: usize, n: usize) {
        let phase = self.profile.phases[phase_index];
        let mut published = 0;
        let mut incident: Option<Incident> = None;
        while published < n {
            if self.rng.below(16) == 0 {
                let kind = self.rng.below(POISON_KINDS - 1);
                self.publish_poison(kind).await;
                continue;
            }
            let continues = incident.as_ref().is_some_and(|i| i.left > 0);
            let (workspace, team, dedup_key) = if let (true, Some(i)) = (continues, &mut incident) {
                i.left -= 1;
                (i.workspace, i.team, Some(i.key.clone()))
            } else {
                let workspace = self.rng.pick(&[WS_A, WS_A, WS_B, WS_C]);
                let teams: &[&'static str] = if phase.email_traffic() {
                    &TEAMS
                } else {
                    // No plain email targets while a worker is killed.
                    &["payments", "ops", "sre", "none"]
                };
                let team = self.rng.pick(teams);
                // About one event in ten starts a small incident (2–3 events).
                incident = (self.rng.below(10) == 0).then(|| Incident {
                    key: format!("soak-incident-{}", self.events.len()),
                    workspace,
                    team,
                    left: 1 + self.rng.below(2),
                });
                (workspace, team, incident.as_ref().map(|i| i.key.clone()))
            };
            // Warm-up starts with every workspace resolving its channel names,
            // so an outage never meets a name it has not seen.
            let (workspace, team) = if phase == Phase::Warmup && published < 3 {
                (published, "payments")
            } else {
                (workspace, team)
            };
            let id = format!("soak-{phase_index:02}-{:05}", self.events.len());
            let draw = Draw {
                id: &id,
                phase: phase_index,
                workspace,
                team,
                allow_email: phase.email_traffic(),
                dedup_key: dedup_key.as_deref(),
            };
            let (event, mut expected) = valid_event(&mut self.rng, &self.world, &draw);
            let body = event.to_string().into_bytes();
            if expected.bounces {
                self.bounce_events += 1;
                self.dead.insert(
                    body.clone(),
                    ExpectedDead {
                        label: id.clone(),
                        reason: "undeliverable",
                        detail: "550",
                    },
                );
            }
            expected.revoked = self.revoked_now(workspace);
            let key = event["type"].as_str().unwrap_or("unknown").to_string();
            self.publish_body(&key, &body).await;
            self.unsettled.push(self.events.len());
            self.events.push(expected);
            published += 1;
        }
    }

    async fn publish_poison(&mut self, kind: usize) {
        let n = self.poison_count;
        self.poison_count += 1;
        let (body, reason, detail) = poison(kind, n, &self.world);
        self.dead.insert(
            body.clone(),
            ExpectedDead {
                label: format!("poison {n} ({reason})"),
                reason,
                detail,
            },
        );
        self.publish_body("escalation.triggered", &body).await;
    }

    /// Publishes with confirms, again after a reconnect if the broker went
    /// away meanwhile (another test run may restart it). A message stored
    /// twice is an event redelivered, which the worker must handle anyway.
    async fn publish_body(&mut self, routing_key: &str, body: &[u8]) {
        while self.env.try_publish_raw(routing_key, body).await.is_err() {
            self.reconnect_to_broker().await;
        }
    }

    /// Ready messages in `queue`, reconnecting if the broker went away meanwhile.
    async fn ready(&mut self, queue: &str) -> u32 {
        loop {
            match self.env.try_ready_count(queue).await {
                Ok(ready) => return ready,
                Err(_) => self.reconnect_to_broker().await,
            }
        }
    }

    /// Opens the soak's own connection again once the broker answers.
    async fn reconnect_to_broker(&mut self) {
        let deadline = Instant::now() + self.profile.settle_timeout;
        while let Err(e) = self.env.try_reconnect_broker().await {
            assert!(Instant::now() < deadline, "RabbitMQ did not come back: {e}");
            // Polling interval of the reconnect, not a wait for an outcome.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Whether the workspace's token is revoked at Slack right now.
    fn revoked_now(&self, workspace: usize) -> bool {
        self.env
            .slack
            .token(&self.workspaces[workspace].token)
            .is_some_and(|t| t.state == support::fake_slack::TokenState::Revoked)
    }

    // ----- waiting -----

    /// Destinations not reached yet (bounces excluded: they are dead letters).
    fn refresh_unsettled(&mut self) -> usize {
        self.ledger.ingest(&self.env);
        let (events, ledger) = (&self.events, &self.ledger);
        self.unsettled.retain(|&i| {
            let event = &events[i];
            event
                .dests
                .iter()
                .any(|d| !d.bounces && !ledger.reached(event, d))
        });
        self.unsettled
            .iter()
            .map(|&i| {
                let event = &self.events[i];
                event
                    .dests
                    .iter()
                    .filter(|d| !d.bounces && !self.ledger.reached(event, d))
                    .count()
            })
            .sum()
    }

    /// The first few destinations not reached yet, for a failure message.
    fn unreached_sample(&self) -> Vec<String> {
        self.unsettled
            .iter()
            .flat_map(|&i| {
                let event = &self.events[i];
                event
                    .dests
                    .iter()
                    .filter(|d| !d.bounces && !self.ledger.reached(event, d))
                    .map(move |d| {
                        format!(
                            "{} → {} ({}; email to {})",
                            event.id,
                            d.conversation.as_deref().unwrap_or("email only"),
                            d.targets.iter().cloned().collect::<Vec<_>>().join(", "),
                            d.addresses.iter().cloned().collect::<Vec<_>>().join(" or ")
                        )
                    })
            })
            .take(8)
            .collect()
    }

    /// Destinations of the events of `phase_index`.
    fn destinations_in_phase(&self, phase_index: usize) -> usize {
        self.events
            .iter()
            .filter(|e| e.phase == phase_index)
            .map(|e| e.dests.len())
            .sum()
    }

    /// Destinations of the events of `phase_index` reached so far.
    fn reached_in_phase(&self, phase_index: usize, by_email_only: bool) -> usize {
        self.events
            .iter()
            .filter(|e| e.phase == phase_index)
            .flat_map(|e| e.dests.iter().map(move |d| (e, d)))
            .filter(|(e, d)| {
                if by_email_only {
                    d.conversation.is_some() && self.ledger.mails_for(&e.id, d).0 > 0
                } else {
                    !d.bounces && self.ledger.reached(e, d)
                }
            })
            .count()
    }

    /// Waits until `done` holds, ingesting what arrived; fails after the profile's timeout.
    async fn wait_until(&mut self, what: &str, mut done: impl FnMut(&mut Soak) -> bool) {
        let deadline = Instant::now() + self.profile.settle_timeout;
        loop {
            self.ledger.ingest(&self.env);
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "soak: timed out waiting for {what} ({} destinations unreached; first: {:#?})",
                self.refresh_unsettled(),
                self.unreached_sample()
            );
            // Polling interval of the check, not a wait for the outcome.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Everything published so far is settled: every destination reached,
    /// every dead letter there, nothing in the work or retry queues.
    async fn settle(&mut self, what: &str) {
        let deadline = Instant::now() + self.profile.settle_timeout;
        loop {
            let unreached = self.refresh_unsettled();
            let (work, retry, dead) = self.queue_depths().await;
            if unreached == 0 && work == 0 && retry == 0 && dead as usize >= self.dead.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "soak: {what} did not settle: {unreached} destinations unreached, \
                 {work} in the work queue, {retry} in retry queues, {dead} of {} dead letters; \
                 first unreached: {:#?}",
                self.dead.len(),
                self.unreached_sample()
            );
            // Polling interval of the check, not a wait for the outcome.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Ready messages in the work queue, in all retry queues, and in the dead-letter queue.
    async fn queue_depths(&mut self) -> (u32, u32, u32) {
        let topology = support::topology(&self.env.settings);
        let work = self.ready(&topology.queue).await;
        let mut retry = 0;
        for queue in &topology.retry_queues {
            retry += self.ready(&queue.name).await;
        }
        let dead = self.ready(&topology.dead_letter_queue).await;
        (work, retry, dead)
    }

    fn log_count(&self, worker: usize, needle: &str) -> usize {
        self.workers[worker].log_count(needle)
    }

    /// Lines containing `needle` from every worker, the killed ones included.
    fn log_count_all(&self, needle: &str) -> usize {
        let retired = self
            .retired_log_lines
            .iter()
            .filter(|l| l.contains(needle))
            .count();
        retired
            + (0..self.workers.len())
                .map(|i| self.log_count(i, needle))
                .sum::<usize>()
    }

    async fn wait_for_worker_log(&mut self, worker: usize, needle: &str, n: usize) {
        let what = format!("worker {worker} to log {needle:?} (x{n})");
        self.wait_until(&what, |soak| soak.log_count(worker, needle) >= n)
            .await;
    }

    // ----- phases -----

    async fn run_phase(&mut self, phase_index: usize) {
        let phase = self.profile.phases[phase_index];
        let started = Instant::now();
        let (valid_before, poison_before) = (self.events.len(), self.poison_count);
        let n = self.profile.events_per_phase;
        match phase {
            Phase::Warmup => self.publish(phase_index, n).await,
            Phase::SlackErrors => self.slack_errors(phase_index, n).await,
            Phase::RateLimitStorm => self.rate_limit_storm(phase_index, n).await,
            Phase::Outage => self.outage(phase_index, n).await,
            Phase::KillWorker => self.kill_worker(phase_index, n).await,
            Phase::BrokerRestart => self.broker_restart(phase_index, n).await,
            Phase::Tokens => self.revoke_and_expire_tokens(phase_index, n).await,
        }
        // One oversized body per phase (300 KiB each).
        self.publish_poison(TOO_LARGE).await;
        self.settle(phase.name()).await;
        self.env.slack.clear_faults();
        self.reports.push(PhaseReport {
            phase,
            valid: self.events.len() - valid_before,
            poison: self.poison_count - poison_before,
            took: started.elapsed(),
        });
        eprintln!(
            "soak: phase {phase_index} {} settled in {:.1} s",
            phase.name(),
            started.elapsed().as_secs_f64()
        );
    }

    /// Five bursts of failing posts, each followed by a fifth of the events.
    async fn slack_errors(&mut self, phase_index: usize, n: usize) {
        let slack = self.env.slack.clone();
        for burst in 0..5 {
            for i in 0..24 {
                let fault = match (burst + i) % 12 {
                    0 | 1 => Fault::Http(500),
                    2 | 3 => Fault::Http(502),
                    4 | 5 => Fault::Http(503),
                    6 => Fault::Http(504),
                    7 => Fault::HttpJson(503, "service_unavailable".into()),
                    8 => Fault::api("internal_error"),
                    9 => Fault::api("fatal_error"),
                    // Token errors Slack reports as HTTP 200: email (or,
                    // for the rotating workspace's `token_expired`, a refresh).
                    10 => Fault::api(["invalid_auth", "token_revoked"][burst % 2]),
                    _ => Fault::api("token_expired"),
                };
                slack.fail_next("chat.postMessage", 1, fault);
            }
            slack.fail_next("users.lookupByEmail", 2, Fault::Http(503));
            self.publish(phase_index, n / 5).await;
        }
    }

    /// Five storms of 429s, each followed by a fifth of the events.
    async fn rate_limit_storm(&mut self, phase_index: usize, n: usize) {
        let slack = self.env.slack.clone();
        let ratelimited = |retry_after_secs| Fault::RateLimited { retry_after_secs };
        for _ in 0..5 {
            slack.fail_next("chat.postMessage", 30, ratelimited(1));
            // Longer than the in-process budget: deferred through a delay queue.
            slack.fail_next("chat.postMessage", 3, ratelimited(3));
            slack.fail_next("users.lookupByEmail", 2, ratelimited(1));
            self.publish(phase_index, n / 5).await;
        }
    }

    /// HTTP 503 from every method, then no connection at all; each must
    /// send Slack targets to email before it ends.
    async fn outage(&mut self, phase_index: usize, n: usize) {
        let slack = self.env.slack.clone();
        for unreachable in [false, true] {
            slack.set_outage(!unreachable);
            slack.set_unreachable(unreachable);
            let before = self.reached_in_phase(phase_index, true);
            self.publish(phase_index, n / 2).await;
            let what = if unreachable {
                "email fallbacks while Slack is unreachable"
            } else {
                "email fallbacks while Slack answers 503"
            };
            self.wait_until(what, |soak| {
                soak.reached_in_phase(phase_index, true) >= before + 20
            })
            .await;
        }
        slack.set_outage(false);
        slack.set_unreachable(false);
    }

    /// SIGKILL a worker a third of the way through a burst, and start another.
    async fn kill_worker(&mut self, phase_index: usize, n: usize) {
        // Slack takes each post at once and answers it slowly (now and then
        // with a 429), so the killed worker dies with posts in Slack that it
        // never heard of: the next worker must find them in the history.
        for _ in 0..n {
            let slow_answer = Fault::AcceptThenDelay(Duration::from_millis(400));
            self.env.slack.fail_next("chat.postMessage", 4, slow_answer);
            let ratelimited = Fault::RateLimited {
                retry_after_secs: 1,
            };
            self.env.slack.fail_next("chat.postMessage", 1, ratelimited);
        }
        self.publish(phase_index, n).await;
        let total = self.destinations_in_phase(phase_index);
        self.wait_until("a third of the burst to be posted", |soak| {
            soak.reached_in_phase(phase_index, false) >= total / 3
        })
        .await;
        let victim = self.kills % self.workers.len();
        let mut killed = self.workers.remove(victim);
        killed.child.kill().await.expect("SIGKILL the worker");
        self.retired_log_lines.extend(killed.log_lines());
        self.kills += 1;
        self.start_worker();
    }

    /// Stop RabbitMQ with posts held in Slack, start it again, publish more.
    async fn broker_restart(&mut self, phase_index: usize, n: usize) {
        // The first posts are answered; the next ones are held until the
        // broker is down, so their acks cannot reach it: it must redeliver
        // them, and they must not be posted again.
        const ANSWERED: usize = 40;
        const HELD: usize = 12;
        let slack = self.env.slack.clone();
        let release = tokio_util::sync::CancellationToken::new();
        slack.fail_next("chat.postMessage", ANSWERED, Fault::Delay(Duration::ZERO));
        slack.fail_next("chat.postMessage", HELD, Fault::HoldUntil(release.clone()));
        let posts_before = slack.request_count("chat.postMessage");
        let skipped_before = self.log_count_all(ALREADY_DELIVERED);
        self.publish(phase_index, n / 2).await;
        self.wait_until("posts to be held", |soak| {
            soak.env.slack.request_count("chat.postMessage") >= posts_before + ANSWERED + HELD
        })
        .await;
        let lost_before: Vec<usize> = (0..self.workers.len())
            .map(|i| self.log_count(i, LOST_BROKER))
            .collect();
        let consuming_before: Vec<usize> = (0..self.workers.len())
            .map(|i| self.log_count(i, CONSUMING))
            .collect();
        let stopped = tokio::task::spawn_blocking(BrokerStopped::stop)
            .await
            .expect("rabbitmqctl stop_app");
        // Slack takes the held posts while no ack can reach the broker.
        release.cancel();
        for (i, n) in lost_before.iter().enumerate() {
            self.wait_for_worker_log(i, LOST_BROKER, n + 1).await;
        }
        tokio::task::spawn_blocking(move || stopped.start())
            .await
            .expect("rabbitmqctl start_app, await_startup");
        self.broker_restarts += 1;
        self.reconnect_to_broker().await;
        for (i, n) in consuming_before.iter().enumerate() {
            self.wait_for_worker_log(i, CONSUMING, n + 1).await;
        }
        self.publish(phase_index, n - n / 2).await;
        self.settle("the events around the broker restart").await;
        let skipped = self.log_count_all(ALREADY_DELIVERED) - skipped_before;
        assert!(
            skipped >= HELD,
            "the held events were redelivered and recognised as sent ({skipped})"
        );
    }

    /// Revoke one workspace's token and expire another's, publish half the
    /// events, then install the revoked workspace again and publish the rest.
    async fn revoke_and_expire_tokens(&mut self, phase_index: usize, n: usize) {
        let slack = self.env.slack.clone();
        // Revoked: Slack answers `token_revoked`, targets go by email.
        slack.revoke(&self.workspaces[WS_B].token);
        // Expired: every token the workspace has had answers `token_expired`,
        // and the workers refresh it (see `assert_one_chain_of_refreshes`).
        let rotating = self.workspaces[WS_C].id.clone();
        slack.expire(&self.workspaces[WS_C].token);
        for issued in slack.issued_tokens() {
            if issued.team_id == rotating {
                slack.expire(&issued.access_token);
            }
        }
        let refreshes = slack.refresh_count();
        self.publish(phase_index, n / 2).await;
        self.settle("the events published while a token was revoked")
            .await;
        assert!(
            slack.refresh_count() > refreshes,
            "the expired token was refreshed"
        );
        // Installed again: a new token in Redis.
        let workspace = self.workspaces[WS_B].id.clone();
        let token = format!("xox{}-soak-b{}-{}", "b", self.reports.len(), self.env.id);
        slack.add_token(
            &token,
            TokenSpec::bot(&workspace, "U0BOT").with_scopes(MANIFEST_SCOPES),
        );
        self.env.store_token(&workspace, &token).await;
        self.workspaces[WS_B].token = token;
        self.publish(phase_index, n - n / 2).await;
    }

    // ----- the end -----

    /// Nothing unacknowledged and nothing ready in this soak's queues but the
    /// dead letters, as `rabbitmqctl` (which sees unacked deliveries) lists
    /// them. Acks are batched for a few milliseconds: polled until quiet.
    async fn wait_until_broker_quiet(&self) {
        let ns = self
            .env
            .settings
            .amqp
            .queue
            .trim_end_matches(".router")
            .to_string();
        let dead_letter_queue = self.env.settings.amqp.dead_letter_queue.clone();
        let deadline = Instant::now() + self.profile.settle_timeout;
        loop {
            let listing = tokio::task::spawn_blocking(|| {
                rabbitmqctl(&[
                    "list_queues",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                ])
            })
            .await
            .expect("rabbitmqctl list_queues");
            let ours: Vec<Vec<&str>> = listing
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .filter(|fields| fields.len() == 3 && fields[0].starts_with(&ns))
                .collect();
            let busy: Vec<String> = ours
                .iter()
                .filter(|f| f[2] != "0" || (f[1] != "0" && f[0] != dead_letter_queue))
                .map(|f| format!("{}: {} ready, {} unacked", f[0], f[1], f[2]))
                .collect();
            assert!(ours.len() >= 3, "the soak's queues are listed:\n{listing}");
            if busy.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "the broker still holds {busy:?}");
            // Polling interval of the check, not a wait for the outcome.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Idempotency records in Redis: how many say done, and the claims still
    /// held or attempt markers left behind.
    async fn idempotency_records(&self) -> (usize, Vec<String>) {
        let mut redis = support::redis_connection(&self.env.settings).await;
        let pattern = format!("{}:sent:*", self.env.settings.redis.key_prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut pending: Vec<String> = keys
            .iter()
            .filter(|k| k.ends_with(":attempt"))
            .map(|k| format!("attempt marker {k}"))
            .collect();
        let claims: Vec<&String> = keys.iter().filter(|k| !k.ends_with(":attempt")).collect();
        let mut done = 0;
        for chunk in claims.chunks(500) {
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(chunk)
                .query_async(&mut redis)
                .await
                .expect("MGET");
            for (key, value) in chunk.iter().zip(values) {
                match value {
                    Some(value) if value == "done" => done += 1,
                    Some(value) => pending.push(format!("claim {key} = {value}")),
                    None => {}
                }
            }
        }
        (done, pending)
    }

    /// Takes every dead letter: (body, reason, detail) per copy.
    async fn drain_dead_letters(&mut self) -> Vec<(Vec<u8>, Option<String>, String)> {
        let queue = self.env.settings.amqp.dead_letter_queue.clone();
        let count = self.ready(&queue).await;
        let mut consumer = self.env.dead_letters().await;
        let mut letters = Vec::new();
        for _ in 0..count {
            let letter = consumer.next().await;
            letters.push((
                letter.body.clone(),
                letter.header(HEADER_REASON),
                letter.header(HEADER_DETAIL).unwrap_or_default(),
            ));
        }
        letters
    }

    async fn finish(mut self) {
        let phases = self.profile.phases.len();
        self.settle("the whole soak").await;
        self.wait_until_broker_quiet().await;
        let (done_records, claims) = self.idempotency_records().await;
        let survivors = std::mem::take(&mut self.workers);
        let mut log_lines = std::mem::take(&mut self.retired_log_lines);
        for worker in survivors {
            log_lines.extend(worker.log_lines());
            let status = worker.stop().await;
            assert!(status.success(), "a worker stopped with {status}");
        }
        self.ledger.ingest(&self.env);
        let letters = self.drain_dead_letters().await;
        self.env.assert_nothing_pending().await;

        let findings = self.verify(&letters, &claims);
        self.print_summary(&letters, &log_lines, &findings, phases, done_records);
        let problems: Vec<String> = findings
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(name, list)| {
                format!(
                    "{name}: {} (first: {:#?})",
                    list.len(),
                    &list[..list.len().min(10)]
                )
            })
            .collect();
        self.env.cleanup().await;
        assert!(problems.is_empty(), "soak found:\n{}", problems.join("\n"));
    }

    /// Every expectation checked; the problems by kind.
    fn verify(
        &self,
        letters: &[(Vec<u8>, Option<String>, String)],
        claims: &[String],
    ) -> Vec<(&'static str, Vec<String>)> {
        let ledger = &self.ledger;
        let mut lost = Vec::new();
        let mut twice = Vec::new();
        let mut wrong_place = Vec::new();
        let mut revoked_posted = Vec::new();
        let mut dead_wrong = Vec::new();
        let mut dead_missing = Vec::new();
        let mut dead_unexpected = Vec::new();

        // Per destination: once, by Slack or by email.
        let mut expected_posts: BTreeSet<(String, String)> = BTreeSet::new();
        let mut expected_mails: BTreeSet<(String, String)> = BTreeSet::new();
        for event in &self.events {
            for dest in &event.dests {
                for address in &dest.addresses {
                    expected_mails.insert((event.id.clone(), address.clone()));
                }
                if dest.bounces {
                    continue;
                }
                let posts = dest
                    .conversation
                    .as_deref()
                    .map_or(0, |c| ledger.posts_at(&event.id, c));
                if let Some(c) = &dest.conversation {
                    expected_posts.insert((event.id.clone(), c.clone()));
                }
                let (mails, naming) = ledger.mails_for(&event.id, dest);
                if posts == 0 && mails == 0 {
                    lost.push(format!("{} → {:?}", event.id, dest));
                }
                if posts + naming > 1 {
                    twice.push(format!(
                        "{} → {:?}: {posts} posts, {naming} emails naming it",
                        event.id, dest
                    ));
                }
                if event.revoked && posts > 0 {
                    revoked_posted.push(format!(
                        "{} → {:?} posted with a revoked token",
                        event.id, dest.conversation
                    ));
                }
            }
        }
        // Nothing anywhere else, nothing twice at one place.
        for ((id, conversation), n) in &ledger.posts {
            if !expected_posts.contains(&(id.clone(), conversation.clone())) {
                wrong_place.push(format!("{id} posted to {conversation} ({n}x)"));
            }
            if *n > 1 {
                twice.push(format!("{id} posted to {conversation} {n} times"));
            }
        }
        for ((id, address), mails) in &ledger.mails {
            if !expected_mails.contains(&(id.clone(), address.clone())) {
                wrong_place.push(format!("{id} emailed to {address}"));
            }
            if mails.len() > 1 {
                twice.push(format!("{id} emailed to {address} {} times", mails.len()));
            }
        }
        wrong_place.extend(ledger.unattributed.iter().cloned());

        // Dead letters: each expected one there with its reason, nothing else.
        let mut copies: HashMap<&[u8], usize> = HashMap::new();
        for (body, reason, detail) in letters {
            match self.dead.get(body.as_slice()) {
                Some(expected) => {
                    *copies.entry(body.as_slice()).or_default() += 1;
                    if reason.as_deref() != Some(expected.reason)
                        || !detail.contains(expected.detail)
                    {
                        dead_wrong.push(format!(
                            "{}: reason {reason:?} detail {detail:?}, expected {} with {:?}",
                            expected.label, expected.reason, expected.detail
                        ));
                    }
                }
                None => dead_unexpected.push(format!(
                    "{reason:?} {detail:?}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )),
            }
        }
        for (body, expected) in &self.dead {
            if !copies.contains_key(body.as_slice()) {
                dead_missing.push(expected.label.clone());
            }
        }
        vec![
            ("destinations never reached", lost),
            ("destinations reached twice", twice),
            ("deliveries at the wrong place", wrong_place),
            ("posts with a revoked token", revoked_posted),
            ("dead letters with the wrong reason", dead_wrong),
            ("dead letters missing", dead_missing),
            ("messages dead-lettered unexpectedly", dead_unexpected),
            ("claims pending at the end", claims.to_vec()),
        ]
    }

    fn print_summary(
        &self,
        letters: &[(Vec<u8>, Option<String>, String)],
        log_lines: &[String],
        findings: &[(&'static str, Vec<String>)],
        phases: usize,
        done_records: usize,
    ) {
        let ledger = &self.ledger;
        let requests = self.env.slack.requests();
        let count = |f: &dyn Fn(&support::fake_slack::RecordedRequest) -> bool| {
            requests.iter().filter(|r| f(r)).count()
        };
        let status = |r: &support::fake_slack::RecordedRequest| r.status.unwrap_or(0);
        let error = |r: &support::fake_slack::RecordedRequest, codes: &[&str]| {
            r.error.as_deref().is_some_and(|e| codes.contains(&e))
        };
        let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
        for (_, reason, _) in letters {
            *by_reason
                .entry(reason.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        let unique_letters: BTreeSet<&[u8]> =
            letters.iter().map(|(b, _, _)| b.as_slice()).collect();

        println!();
        println!(
            "soak summary: profile {}, seed {}, {} phases, {:.0} s",
            self.profile.name,
            self.seed,
            phases,
            self.started.elapsed().as_secs_f64()
        );
        println!("| phase | valid events | poison | settled in |\n|---|---|---|---|");
        for (i, report) in self.reports.iter().enumerate() {
            println!(
                "| {i} {} | {} | {} | {:.1} s |",
                report.phase.name(),
                report.valid,
                report.poison,
                report.took.as_secs_f64()
            );
        }
        let dests: usize = self.events.iter().map(|e| e.dests.len()).sum();
        let bounced: usize = self
            .events
            .iter()
            .flat_map(|e| &e.dests)
            .filter(|d| d.bounces)
            .count();
        let posted: usize = ledger.posts.values().sum();
        let emails: usize = ledger.mails.values().map(Vec::len).sum();
        let (mut named, mut covered) = (0, 0);
        for event in &self.events {
            for dest in event.dests.iter().filter(|d| !d.bounces) {
                let posts = dest
                    .conversation
                    .as_deref()
                    .map_or(0, |c| ledger.posts_at(&event.id, c));
                let (mails, naming) = ledger.mails_for(&event.id, dest);
                if posts == 0 && naming > 0 {
                    named += 1;
                } else if posts == 0 && mails > 0 {
                    covered += 1;
                }
            }
        }
        let duplicates = findings
            .iter()
            .find(|(name, _)| *name == "destinations reached twice")
            .map_or(0, |(_, l)| l.len());
        let lost = findings
            .iter()
            .find(|(name, _)| *name == "destinations never reached")
            .map_or(0, |(_, l)| l.len());
        let rows = [
            (
                "messages published",
                format!(
                    "{} ({} valid events, {} of them with a bouncing address; {} poison)",
                    self.events.len() + self.poison_count,
                    self.events.len(),
                    self.bounce_events,
                    self.poison_count
                ),
            ),
            (
                "destinations",
                format!(
                    "{dests}: {posted} Slack posts, {named} by a fallback email naming them, \
                     {covered} by an email their address already got for the event, {bounced} bounced"
                ),
            ),
            ("fallback emails", emails.to_string()),
            (
                "dead letters",
                format!(
                    "{} ({} distinct messages): {}",
                    letters.len(),
                    unique_letters.len(),
                    by_reason
                        .iter()
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "slack faults answered",
                format!(
                    "{} HTTP 5xx, {} HTTP 429, {} token errors, {} connections reset",
                    count(&|r| status(r) >= 500),
                    count(&|r| status(r) == 429),
                    count(&|r| error(r, &["invalid_auth", "token_revoked", "token_expired"])),
                    self.env.slack.reset_count()
                ),
            ),
            (
                "token refreshes",
                format!(
                    "{} (oauth.v2.access calls: {})",
                    self.env.slack.refresh_count(),
                    self.env.slack.requests_for("oauth.v2.access").len()
                ),
            ),
            (
                "workers",
                format!(
                    "{} started, {} killed, broker restarted {}x",
                    self.workers_started, self.kills, self.broker_restarts
                ),
            ),
            (
                "lost-post check calls (history, replies)",
                format!(
                    "{}, {}",
                    self.env.slack.request_count("conversations.history"),
                    self.env.slack.request_count("conversations.replies")
                ),
            ),
            (
                "crashed posts found by history",
                log_lines
                    .iter()
                    .filter(|l| l.contains("a worker that crashed had posted this"))
                    .count()
                    .to_string(),
            ),
            (
                "posted without the lost-post check",
                log_lines
                    .iter()
                    .filter(|l| l.contains("a duplicate is possible"))
                    .count()
                    .to_string(),
            ),
            (
                "idempotency records",
                format!(
                    "{done_records} done, {} claims or attempt markers pending",
                    findings
                        .iter()
                        .find(|(name, _)| *name == "claims pending at the end")
                        .map_or(0, |(_, l)| l.len())
                ),
            ),
            ("duplicates", duplicates.to_string()),
            ("lost", lost.to_string()),
        ];
        println!("\n| figure | value |\n|---|---|");
        for (name, value) in rows {
            println!("| {name} | {value} |");
        }
        println!();
    }

    /// Every refresh succeeded and presented the refresh token the previous one
    /// issued: no refresh token was used twice by the competing workers.
    fn assert_one_chain_of_refreshes(&self) {
        let calls = self.env.slack.requests_for("oauth.v2.access");
        let issued = self.env.slack.issued_tokens();
        assert_eq!(calls.len(), issued.len(), "every refresh succeeded");
        for (i, call) in calls.iter().enumerate() {
            assert_eq!(call.error, None, "refresh {i} failed");
            let expected = if i == 0 {
                self.initial_refresh_token.as_str()
            } else {
                issued[i - 1].refresh_token.as_str()
            };
            assert_eq!(call.params["refresh_token"], expected, "refresh {i}");
        }
    }
}

#[tokio::test]
async fn every_destination_is_reached_once_or_dead_lettered_with_its_reason_through_faults() {
    let profile = Profile::from_env();
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("SOAK_SEED is a number"))
        .unwrap_or(20_261_202);
    eprintln!(
        "soak: profile {} ({} phases of {} events), seed {seed}",
        profile.name,
        profile.phases.len(),
        profile.events_per_phase
    );
    let mut soak = Soak::start(profile, seed).await;
    for phase in 0..soak.profile.phases.len() {
        soak.run_phase(phase).await;
    }
    soak.assert_one_chain_of_refreshes();
    soak.finish().await;
}
