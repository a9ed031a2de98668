//! Issue [4]: every form of target × every answer Slack gives, end to end
//! through the real broker and Redis.
//!
//! One test per Slack answer; inside it, one case per target form (and the
//! variants the answer needs, such as a channel deleted after its name was
//! cached). Every case has its own [`TestEnv`] namespace and worker, and the
//! cases of one test run concurrently; a failing case is reported with its
//! name, and all the failures of a test are listed together.
//!
//! What every case checks is the README's table "When Slack cannot take a
//! target" and `src/deliver/policy.rs`: where the post lands (channel forms
//! land in the channel and are posted to **by id**, direct messages to the
//! user), how many times (once), what was emailed and to whom, and that the
//! event was settled: acked, nothing dead-lettered or waiting in a retry queue.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use alert_router::config::{LogSettings, Secret, Secrets};
use futures_util::FutureExt;
use serde_json::{Value, json};
use support::fake_slack::{ChannelSpec, Fault, RecordedPost, TokenSpec};
use support::{ESCALATIONS, PAYMENTS, TestEnv, WAIT, topology};

/// No rules: the events name their own targets.
const RULES: &str = support::RULES_WITH_EMAIL;

/// The channel the channel forms name.
const TARGET_ID: &str = "C0TARGET";
const TARGET_NAME: &str = "target";
/// The person the direct-message forms name.
const PERSON: &str = "U0PERSON";
const PERSON_EMAIL: &str = "person@example.com";
/// `defaults.email`.
const DEFAULT_EMAIL: &str = "oncall@example.com";

const CLIENT_ID: &str = "1234.5678";
const CLIENT_SECRET: &str = "test-client-secret";

/// The ways an event can name its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// `{"slack_channel": "C0TARGET"}`
    ChannelId,
    /// `{"slack_channel": "#target"}`
    HashName,
    /// `{"slack_channel": "target"}`
    BareName,
    /// `{"slack_user": "U0PERSON"}`
    UserId,
    /// `{"slack_email": "person@example.com"}`
    SlackEmail,
    /// `"assignee"`, the assignee having a `slack_user` (and an email).
    AssigneeUser,
    /// `"assignee"`, the assignee having only an email.
    AssigneeEmail,
}

use Form::*;

const ALL: [Form; 7] = [
    ChannelId,
    HashName,
    BareName,
    UserId,
    SlackEmail,
    AssigneeUser,
    AssigneeEmail,
];
const CHANNELS: [Form; 3] = [ChannelId, HashName, BareName];
const PEOPLE: [Form; 4] = [UserId, SlackEmail, AssigneeUser, AssigneeEmail];

impl Form {
    fn label(self) -> &'static str {
        match self {
            ChannelId => "slack_channel C… id",
            HashName => "slack_channel #name",
            BareName => "slack_channel bare name",
            UserId => "slack_user U…",
            SlackEmail => "slack_email",
            AssigneeUser => "assignee (slack_user)",
            AssigneeEmail => "assignee (email only)",
        }
    }

    fn is_channel(self) -> bool {
        CHANNELS.contains(&self)
    }

    /// The event fields that name the recipient.
    fn fields(self) -> Value {
        match self {
            ChannelId => json!({"targets": [{"slack_channel": TARGET_ID}]}),
            HashName => json!({"targets": [{"slack_channel": format!("#{TARGET_NAME}")}]}),
            BareName => json!({"targets": [{"slack_channel": TARGET_NAME}]}),
            UserId => json!({"targets": [{"slack_user": PERSON}]}),
            SlackEmail => json!({"targets": [{"slack_email": PERSON_EMAIL}]}),
            AssigneeUser => json!({"targets": ["assignee"],
                "assignee": {"name": "Pat", "slack_user": PERSON, "email": PERSON_EMAIL}}),
            AssigneeEmail => json!({"targets": ["assignee"],
                "assignee": {"name": "Pat", "email": PERSON_EMAIL}}),
        }
    }

    /// The target as the worker names it (in reroute notices and emails):
    /// the assignee becomes their Slack user, else their email.
    fn target(self) -> String {
        match self {
            ChannelId => format!("slack_channel:{TARGET_ID}"),
            HashName => format!("slack_channel:#{TARGET_NAME}"),
            BareName => format!("slack_channel:{TARGET_NAME}"),
            UserId | AssigneeUser => format!("slack_user:{PERSON}"),
            SlackEmail | AssigneeEmail => format!("slack_email:{PERSON_EMAIL}"),
        }
    }

    /// The `channel` argument of a post that reaches the recipient: the
    /// channel's id whatever form named it, the user's id for a DM.
    fn channel_arg(self) -> &'static str {
        if self.is_channel() { TARGET_ID } else { PERSON }
    }

    /// Where the email goes when Slack cannot take the target: the target's
    /// own address (a `slack_email`, the assignee's email), else the rule's
    /// `email`, else `defaults.email` (README, "When Slack cannot take a
    /// target"). A bare `slack_user` has no address of its own.
    fn fallback_email(self) -> &'static str {
        match self {
            ChannelId | HashName | BareName | UserId => DEFAULT_EMAIL,
            SlackEmail | AssigneeUser | AssigneeEmail => PERSON_EMAIL,
        }
    }
}

/// One case: a fresh namespace with the target channel and the person.
struct Case {
    env: TestEnv,
    form: Form,
}

impl Case {
    async fn start(form: Form) -> Case {
        Case::start_with(form, ChannelSpec::member()).await
    }

    async fn start_with(form: Form, channel: ChannelSpec) -> Case {
        let env = TestEnv::start(RULES).await;
        env.slack.add_user(PERSON, PERSON_EMAIL);
        env.slack.add_channel(TARGET_ID, TARGET_NAME, channel);
        Case { env, form }
    }

    /// The event id for `what` in this case (the form in it, to tell the
    /// cases apart in the logs).
    fn event_id(&self, what: &str) -> String {
        format!("{what}-{:?}", self.form).to_lowercase()
    }

    async fn publish(&self, what: &str) {
        let id = self.event_id(what);
        self.env
            .publish(&self.env.event(&id, self.form.fields()))
            .await;
    }

    /// The conversation a post reaching the recipient lands in.
    fn landing(&self) -> String {
        if self.form.is_channel() {
            TARGET_ID.to_string()
        } else {
            self.env.slack.dm_channel_id(PERSON)
        }
    }

    /// Waits for `n` posts in the recipient's conversation.
    async fn wait_for_posts_to_recipient(&self, n: usize) -> Vec<RecordedPost> {
        self.env
            .slack
            .wait_for_posts_to(&self.landing(), n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("no post reached the recipient: {e}"))
    }

    /// Waits for `n` posts in the default channel.
    async fn wait_for_posts_to_default(&self, n: usize) -> Vec<RecordedPost> {
        self.env
            .slack
            .wait_for_posts_to(ESCALATIONS, n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("no post reached the default channel: {e}"))
    }

    /// Waits for one email and checks it went to `address` alone.
    async fn wait_for_email_to(&self, address: &str) {
        let mails = self
            .env
            .smtp
            .wait_for_mails(1, WAIT)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no fallback email: {e}\nSlack saw:\n{}",
                    self.env.slack.describe()
                )
            });
        assert_eq!(mails[0].to, [address], "the fallback email's recipient");
    }

    /// Exactly one post in all, reaching the recipient, with the right `channel` argument.
    fn assert_posted_once_to_recipient(&self) -> RecordedPost {
        let posts = self.env.slack.posts();
        assert_eq!(
            posts.len(),
            1,
            "exactly one post\n{}",
            self.env.slack.describe()
        );
        let post = posts[0].clone();
        assert_eq!(post.channel_id, self.landing(), "the post's conversation");
        assert_eq!(
            post.channel,
            self.form.channel_arg(),
            "the `channel` argument of chat.postMessage (channels by id, DMs to the user)"
        );
        post
    }

    /// No post anywhere, no `conversations.join`: a DM never lands in a shared channel.
    fn assert_nothing_posted(&self) {
        assert!(
            self.env.slack.posts().is_empty(),
            "nothing is posted in Slack\n{}",
            self.env.slack.describe()
        );
    }

    fn assert_no_email(&self) {
        let mails = self.env.smtp.mails();
        assert!(
            mails.is_empty(),
            "no email, got one to {:?}",
            mails.iter().map(|m| &m.to).collect::<Vec<_>>()
        );
    }

    fn assert_one_email(&self) {
        assert_eq!(self.env.smtp.mails().len(), 1, "exactly one email");
    }

    /// After the worker stopped: the event was acked, and nothing waits in
    /// the dead-letter or retry queues.
    async fn assert_settled(&self) {
        let env = &self.env;
        assert_eq!(
            env.ready_count(&env.settings.amqp.queue).await,
            0,
            "the event was acked (work queue drained)"
        );
        assert_eq!(
            env.ready_count(&env.settings.amqp.dead_letter_queue).await,
            0,
            "nothing dead-lettered"
        );
        for retry in topology(&env.settings).retry_queues {
            assert_eq!(
                env.ready_count(&retry.name).await,
                0,
                "nothing in retry queue {}",
                retry.name
            );
        }
    }

    async fn cleanup(self) {
        self.env.cleanup().await;
    }
}

/// Checks a post in the default channel says which target it was meant for.
fn assert_names_target(post: &RecordedPost, target: &str) {
    let text = post.text.as_deref().unwrap_or_default();
    assert!(
        text.contains(&format!("meant for {target}")),
        "the default channel's post names {target}: {text:?}"
    );
    let blocks = post
        .blocks
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    assert!(
        blocks.contains(target),
        "the blocks name {target}: {blocks}"
    );
}

/// A bot's scopes without `chat:write.public`.
const WITHOUT_PUBLIC_POSTING: &[&str] = &[
    "chat:write",
    "channels:join",
    "channels:read",
    "groups:read",
    "channels:history",
    "im:write",
    "users:read",
    "users:read.email",
];

/// Cases of one test running at once.
const CONCURRENT_CASES: usize = 4;

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the cases of one answer concurrently, each in its own task, and
/// fails listing every case that failed.
async fn run_matrix(answer: &str, cases: Vec<(String, CaseFuture)>) {
    // The in-process workers' logs, when asked for (`RUST_LOG=alert_router=debug`).
    if std::env::var_os("RUST_LOG").is_some() {
        alert_router::telemetry::init(&LogSettings::default());
    }
    let total = cases.len();
    // A few at a time: each case is a namespace, a worker, a fake Slack and
    // an SMTP server, and the machine may be a loaded two-core one.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CASES));
    let handles: Vec<(String, tokio::task::JoinHandle<()>)> = cases
        .into_iter()
        .map(|(name, case)| {
            let slots = slots.clone();
            let task = tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.unwrap();
                case.await;
            });
            (name, task)
        })
        .collect();
    let mut failures = Vec::new();
    for (name, handle) in handles {
        if let Err(e) = handle.await {
            let message = match e.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(panicked)".into()),
                Err(e) => e.to_string(),
            };
            failures.push(format!("✗ {answer} × {name}:\n    {message}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One case per form, each running `case`.
fn per_form<F, Fut>(forms: &[Form], case: F) -> Vec<(String, CaseFuture)>
where
    F: Fn(Form) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    forms
        .iter()
        .map(|&form| (form.label().to_string(), case(form).boxed()))
        .collect()
}

fn named<Fut>(name: &str, case: Fut) -> (String, CaseFuture)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    (name.to_string(), case.boxed())
}

/// Makes the worker's cached channel map look older than the shortest
/// relisting interval (15 s), as it is in production when a channel changes
/// long after the last listing: a `channel_not_found` then lists again.
async fn age_channel_map(env: &TestEnv) {
    let key = format!(
        "{}:slack:channels-listed:{}",
        env.settings.redis.key_prefix, env.workspace
    );
    let mut redis = support::redis_connection(&env.settings).await;
    let stamp: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("the channel map was listed");
    let listed_ms: u64 = stamp.parse().expect("a complete listing's stamp");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg((listed_ms - 60_000).to_string())
        .arg("PX")
        .arg(600_000)
        .query_async(&mut redis)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// ok
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_posts_once_to_the_channel_by_id_or_to_the_person() {
    run_matrix(
        "ok",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            let worker = case.env.spawn_worker();
            case.publish("ok").await;
            case.wait_for_posts_to_recipient(1).await;
            worker.stop().await;

            let post = case.assert_posted_once_to_recipient();
            assert!(post.blocks.is_some(), "a Block Kit message");
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------
// not_in_channel
// ---------------------------------------------------------------------------

impl Case {
    /// A case whose target channel the bot is not in, with a token without
    /// `chat:write.public`: Slack answers a post there `not_in_channel`.
    async fn start_outside_the_channel(form: Form) -> Case {
        let case = Case::start_with(form, ChannelSpec::not_member()).await;
        case.env
            .store_token(&case.env.workspace, &case.token_without_public_posting())
            .await;
        case
    }

    /// A token without `chat:write.public`, so a post to a public channel
    /// the bot is not in is refused as Slack refuses it.
    fn token_without_public_posting(&self) -> String {
        let scoped = format!("xoxb-test-no-public-{}", self.env.id);
        self.env.slack.add_token(
            &scoped,
            TokenSpec::bot(&self.env.workspace, "U0BOT").with_scopes(WITHOUT_PUBLIC_POSTING),
        );
        scoped
    }

    /// Publishes `what` with a worker that may refresh tokens, until a post
    /// reaches the recipient.
    async fn publish_with_rotation_until_posted(&self, what: &str) {
        let worker = self.env.spawn_worker_with(rotation_secrets());
        self.publish(what).await;
        self.wait_for_posts_to_recipient(1).await;
        worker.stop().await;
    }

    /// One post, to the recipient, with the token the refresh minted;
    /// nothing emailed; the event settled.
    async fn assert_posted_once_with_the_new_token(self) {
        let issued = self.env.slack.issued_tokens();
        assert_eq!(issued.len(), 1, "one new token");
        let post = self.assert_posted_once_to_recipient();
        assert_eq!(
            post.token, issued[0].access_token,
            "posted with the new token"
        );
        self.assert_no_email();
        self.assert_settled().await;
        self.cleanup().await;
    }

    /// Publishes `what` with a worker running until it reaches the
    /// target's fallback address, the one email, with nothing posted.
    async fn publish_and_expect_email_only(&self, what: &str) {
        let worker = self.env.spawn_worker();
        self.publish(what).await;
        self.wait_for_email_to(self.form.fallback_email()).await;
        worker.stop().await;
        self.assert_nothing_posted();
        self.assert_one_email();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_in_channel_joins_by_id_and_posts_or_emails_the_person() {
    let mut cases = per_form(&CHANNELS, |form| async move {
        let case = Case::start_outside_the_channel(form).await;
        let worker = case.env.spawn_worker();
        case.publish("not-in-channel").await;
        case.wait_for_posts_to_recipient(1).await;
        worker.stop().await;

        let joins = case.env.slack.requests_for("conversations.join");
        assert_eq!(joins.len(), 1, "one conversations.join");
        assert_eq!(
            joins[0].params["channel"], TARGET_ID,
            "conversations.join takes the channel's id"
        );
        assert_eq!(joins[0].error, None, "the join succeeded");
        assert!(case.env.slack.bot_is_member(TARGET_ID));
        case.assert_posted_once_to_recipient();
        case.assert_no_email();
        case.assert_settled().await;
        case.cleanup().await;
    });
    cases.extend(per_form(&PEOPLE, |form| async move {
        let case = Case::start(form).await;
        case.env
            .slack
            .fail_next("chat.postMessage", 1, Fault::api("not_in_channel"));
        case.publish_and_expect_email_only("dm-not-in-channel")
            .await;
        assert!(
            case.env.slack.requests_for("conversations.join").is_empty(),
            "a DM is never joined"
        );
        case.assert_settled().await;
        case.cleanup().await;
    }));
    run_matrix("not_in_channel", cases).await;
}

/// The contract: `not_in_channel` → join the channel and post again, else
/// the default channel. Slack's refusals of the join that concern this
/// channel (full, the bot may not join it, no permission, not a channel
/// one joins) send the post to the default channel, naming the target;
/// a token refused for everything sends it to email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_goes_to_the_default_channel_unless_the_token_is_refused() {
    let mut cases = Vec::new();
    for code in [
        "too_many_members",
        "user_is_restricted",
        "is_bot",
        "no_permission",
        "access_denied",
        "method_not_supported_for_channel_type",
    ] {
        cases.extend(CHANNELS.iter().map(|&form| {
            named(&format!("{code} × {}", form.label()), async move {
                let case = Case::start_outside_the_channel(form).await;
                case.env
                    .slack
                    .fail_next("conversations.join", 1, Fault::api(code));
                let worker = case.env.spawn_worker();
                case.publish("join-refused").await;
                let posts = case.wait_for_posts_to_default(1).await;
                worker.stop().await;

                assert_names_target(&posts[0], &form.target());
                assert_eq!(case.env.slack.posts().len(), 1, "one post in all");
                assert_eq!(
                    case.env.slack.requests_for("conversations.join").len(),
                    1,
                    "one join"
                );
                case.assert_no_email();
                case.assert_settled().await;
                case.cleanup().await;
            })
        }));
    }
    cases.extend(CHANNELS.iter().map(|&form| {
        named(
            &format!("account_inactive × {}", form.label()),
            async move {
                let case = Case::start_outside_the_channel(form).await;
                case.env
                    .slack
                    .fail_next("conversations.join", 1, Fault::api("account_inactive"));
                case.publish_and_expect_email_only("join-token-refused")
                    .await;
                case.assert_settled().await;
                case.cleanup().await;
            },
        )
    }));
    run_matrix("a refused join", cases).await;
}

// ---------------------------------------------------------------------------
// channel_not_found
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_not_found_goes_to_the_default_channel_or_emails_the_person() {
    let mut cases = Vec::new();
    // A channel that does not exist, named each way.
    for (name, given) in [
        ("slack_channel C… id that does not exist", "C0NOSUCH"),
        ("slack_channel #name that does not exist", "#nosuch"),
        ("slack_channel bare name that does not exist", "nosuch"),
    ] {
        cases.push(named(name, async move {
            let case = Case::start(ChannelId).await;
            let worker = case.env.spawn_worker();
            let id = format!("not-found-{}", given.trim_start_matches('#'));
            let targets = json!({"targets": [{"slack_channel": given}]});
            case.env.publish(&case.env.event(&id, targets)).await;
            let posts = case.wait_for_posts_to_default(1).await;
            worker.stop().await;

            assert_names_target(&posts[0], &format!("slack_channel:{given}"));
            assert_eq!(case.env.slack.posts().len(), 1, "one post in all");
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }));
    }
    // `#name` cached, then the channel deleted: re-resolved once, then the default channel.
    cases.push(named(
        "slack_channel #name deleted after it was cached",
        async {
            let case = Case::start(HashName).await;
            let worker = case.env.spawn_worker();
            case.publish("cache-the-name").await;
            case.wait_for_posts_to_recipient(1).await;
            let listings = case.env.slack.requests_for("conversations.list").len();
            case.env.slack.delete_channel(TARGET_ID);
            age_channel_map(&case.env).await;

            case.publish("after-delete").await;
            let posts = case.wait_for_posts_to_default(1).await;
            worker.stop().await;

            assert_names_target(&posts[0], &HashName.target());
            assert_eq!(
                case.env.slack.requests_for("conversations.list").len(),
                listings + 1,
                "the name is resolved again, once"
            );
            let to_deleted: Vec<_> = case
                .env
                .slack
                .requests_for("chat.postMessage")
                .into_iter()
                .filter(|r| r.error.as_deref() == Some("channel_not_found"))
                .collect();
            assert_eq!(to_deleted.len(), 1, "one post to the deleted channel");
            assert_eq!(
                to_deleted[0].params["channel"], TARGET_ID,
                "posted by the cached id"
            );
            assert_eq!(case.env.slack.posts().len(), 2, "one post per event");
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        },
    ));
    // `#name` cached, then deleted and re-created under the same name: the new id.
    cases.push(named(
        "slack_channel #name re-created under a new id after it was cached",
        async {
            let case = Case::start(HashName).await;
            let worker = case.env.spawn_worker();
            case.publish("cache-the-name").await;
            case.wait_for_posts_to_recipient(1).await;
            case.env.slack.delete_channel(TARGET_ID);
            case.env
                .slack
                .add_channel("C0TARGET2", TARGET_NAME, ChannelSpec::member());
            age_channel_map(&case.env).await;

            case.publish("after-recreate").await;
            let posts = case
                .env
                .slack
                .wait_for_posts_to("C0TARGET2", 1, WAIT)
                .await
                .unwrap();
            worker.stop().await;

            assert_eq!(posts[0].channel, "C0TARGET2", "posted to the new id");
            assert_eq!(case.env.slack.posts().len(), 2, "one post per event");
            assert!(case.env.slack.posts_to(ESCALATIONS).is_empty());
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        },
    ));
    // A direct message Slack cannot find: the person's email.
    cases.extend(per_form(&PEOPLE, |form| async move {
        let case = Case::start(form).await;
        case.env
            .slack
            .fail_next("chat.postMessage", 1, Fault::api("channel_not_found"));
        case.publish_and_expect_email_only("dm-not-found").await;
        case.assert_settled().await;
        case.cleanup().await;
    }));
    run_matrix("channel_not_found", cases).await;
}

// ---------------------------------------------------------------------------
// is_archived
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_archived_goes_to_the_default_channel_or_emails_the_person() {
    // Archived before the worker looks: by id Slack says is_archived; by
    // name the listing (which excludes archived channels) lacks it.
    let mut cases = per_form(&CHANNELS, |form| async move {
        let case = Case::start_with(form, ChannelSpec::archived()).await;
        let worker = case.env.spawn_worker();
        case.publish("archived").await;
        let posts = case.wait_for_posts_to_default(1).await;
        worker.stop().await;

        assert_names_target(&posts[0], &form.target());
        assert_eq!(case.env.slack.posts().len(), 1, "one post in all");
        case.assert_no_email();
        case.assert_settled().await;
        case.cleanup().await;
    });
    for form in [HashName, BareName] {
        let name = format!("{} archived after it was cached", form.label());
        cases.push(named(&name, async move {
            let case = Case::start(form).await;
            let worker = case.env.spawn_worker();
            case.publish("cache-the-name").await;
            case.wait_for_posts_to_recipient(1).await;
            case.env.slack.archive_channel(TARGET_ID);

            case.publish("after-archive").await;
            let posts = case.wait_for_posts_to_default(1).await;
            worker.stop().await;

            assert_names_target(&posts[0], &form.target());
            assert_eq!(case.env.slack.posts().len(), 2, "one post per event");
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }));
    }
    cases.extend(per_form(&PEOPLE, |form| async move {
        let case = Case::start(form).await;
        case.env
            .slack
            .fail_next("chat.postMessage", 1, Fault::api("is_archived"));
        case.publish_and_expect_email_only("dm-archived").await;
        case.assert_settled().await;
        case.cleanup().await;
    }));
    run_matrix("is_archived", cases).await;
}

// ---------------------------------------------------------------------------
// 429 with Retry-After
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_waits_retry_after_then_posts_once() {
    run_matrix(
        "429 Retry-After: 1",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            case.env.slack.fail_next(
                "chat.postMessage",
                1,
                Fault::RateLimited {
                    retry_after_secs: 1,
                },
            );
            let worker = case.env.spawn_worker();
            case.publish("rate-limited").await;
            case.wait_for_posts_to_recipient(1).await;
            worker.stop().await;

            let post = case.assert_posted_once_to_recipient();
            let limited: Vec<_> = case
                .env
                .slack
                .requests_for("chat.postMessage")
                .into_iter()
                .filter(|r| r.status == Some(429))
                .collect();
            assert_eq!(limited.len(), 1, "one 429");
            let waited = post.received_at.duration_since(limited[0].received_at);
            assert!(
                waited >= Duration::from_secs(1),
                "posted again {waited:?} after the 429, before its Retry-After"
            );
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------
// token_expired
// ---------------------------------------------------------------------------

fn rotation_secrets() -> Secrets {
    Secrets {
        slack_client_id: Some(CLIENT_ID.into()),
        slack_client_secret: Some(Secret::new(CLIENT_SECRET)),
        ..Secrets::default()
    }
}

/// Stores a rotating token (as tests/tokens.rs does), far from its recorded
/// expiry, that Slack nevertheless reports expired.
async fn expired_rotating_token(env: &TestEnv) {
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack
        .add_refresh_token(&rotation_refresh_token(env), &env.workspace, "U0BOT");
    rotating_token(env, &env.token).await;
    env.slack.expire(&env.token);
}

fn rotation_refresh_token(env: &TestEnv) -> String {
    format!("xoxe-test-{}", env.id)
}

/// Stores `access_token` as a rotating token, far from its recorded expiry,
/// with the refresh token Slack was told of.
async fn rotating_token(env: &TestEnv, access_token: &str) {
    let refresh = rotation_refresh_token(env);
    env.store_token_record(
        &env.workspace,
        &json!({"access_token": access_token, "refresh_token": refresh,
                "expires_at": chrono::Utc::now().timestamp() + 30_000,
                "team_id": env.workspace, "bot_user_id": "U0BOT"}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired_is_refreshed_once_and_posts_once_with_the_new_token() {
    run_matrix(
        "token_expired",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            expired_rotating_token(&case.env).await;
            case.publish_with_rotation_until_posted("expired").await;

            assert_eq!(case.env.slack.refresh_count(), 1, "refreshed exactly once");
            case.assert_posted_once_with_the_new_token().await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_slack_rate_limits_waits_and_posts_once_never_emails() {
    run_matrix(
        "token_expired, then 429 on oauth.v2.access",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            let env = &case.env;
            expired_rotating_token(env).await;
            env.slack.fail_next(
                "oauth.v2.access",
                1,
                Fault::RateLimited {
                    retry_after_secs: 1,
                },
            );
            case.publish_with_rotation_until_posted("refresh-rate-limited")
                .await;

            assert_eq!(
                env.slack.requests_for("oauth.v2.access").len(),
                2,
                "the exchange Slack rate-limited, then the one it took"
            );
            case.assert_posted_once_with_the_new_token().await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired_on_the_join_is_refreshed_then_joins_and_posts_once() {
    run_matrix(
        "not_in_channel, then token_expired on conversations.join",
        per_form(&CHANNELS, |form| async move {
            let case = Case::start_with(form, ChannelSpec::not_member()).await;
            let env = &case.env;
            // Neither the token nor the one a refresh mints may post to a
            // public channel the bot is not in: the post needs the join.
            env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
            env.slack.add_refresh_token_with_scopes(
                &rotation_refresh_token(env),
                &env.workspace,
                "U0BOT",
                WITHOUT_PUBLIC_POSTING
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            );
            rotating_token(env, &case.token_without_public_posting()).await;
            env.slack
                .fail_next("conversations.join", 1, Fault::api("token_expired"));
            case.publish_with_rotation_until_posted("join-expired")
                .await;

            assert_eq!(env.slack.refresh_count(), 1, "refreshed exactly once");
            let joins = env.slack.requests_for("conversations.join");
            assert_eq!(
                joins.len(),
                2,
                "the join refused as expired, then the one that worked"
            );
            assert_eq!(joins[1].error, None, "the second join succeeded");
            case.assert_posted_once_with_the_new_token().await;
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------
// HTTP 5xx
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_twice_is_retried_and_posts_once() {
    run_matrix(
        "HTTP 503 ×2",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            case.env
                .slack
                .fail_next("chat.postMessage", 2, Fault::Http(503));
            let worker = case.env.spawn_worker();
            case.publish("flaky").await;
            case.wait_for_posts_to_recipient(1).await;
            worker.stop().await;

            case.assert_posted_once_to_recipient();
            let calls = case.env.slack.requests_for("chat.postMessage");
            assert_eq!(calls.len(), 3, "two 503s, then the post");
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

/// Answers after which the post may have been made: Slack took it, then
/// the answer said otherwise or never came.
fn unsure_answers() -> [(&'static str, Fault); 3] {
    [
        (
            "posted, then HTTP 500",
            Fault::AcceptThenFail(Box::new(Fault::Http(500))),
        ),
        (
            "posted, then internal_error",
            Fault::AcceptThenFail(Box::new(Fault::api("internal_error"))),
        ),
        ("posted, then no answer (timeout)", Fault::AcceptThenHang),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_slack_took_before_an_error_or_a_timeout_is_found_in_the_history_not_posted_again() {
    let cases = unsure_answers()
        .into_iter()
        .flat_map(|(answer, fault)| {
            ALL.iter().map(move |&form| {
                let fault = fault.clone();
                named(&format!("{answer} × {}", form.label()), async move {
                    let mut case = Case::start(form).await;
                    case.env.settings.slack.request_timeout = Duration::from_secs(1);
                    case.env.slack.fail_next("chat.postMessage", 1, fault);
                    let worker = case.env.spawn_worker();
                    case.publish("unsure").await;
                    case.env
                        .slack
                        .wait_for_requests("conversations.history", 1, WAIT)
                        .await
                        .unwrap_or_else(|e| panic!("the history was not checked: {e}"));
                    worker.stop().await;

                    case.assert_posted_once_to_recipient();
                    assert_eq!(
                        case.env.slack.requests_for("chat.postMessage").len(),
                        1,
                        "not posted again\n{}",
                        case.env.slack.describe()
                    );
                    case.assert_no_email();
                    case.assert_settled().await;
                    case.cleanup().await;
                })
            })
        })
        .collect();
    run_matrix("an unsure answer after the post", cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_error_without_a_post_is_looked_for_then_posted_once() {
    run_matrix(
        "internal_error, nothing posted",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            case.env
                .slack
                .fail_next("chat.postMessage", 1, Fault::api("internal_error"));
            let worker = case.env.spawn_worker();
            case.publish("not-taken").await;
            case.wait_for_posts_to_recipient(1).await;
            worker.stop().await;

            case.assert_posted_once_to_recipient();
            assert_eq!(
                case.env.slack.requests_for("chat.postMessage").len(),
                2,
                "the error, then the post"
            );
            assert!(
                !case
                    .env
                    .slack
                    .requests_for("conversations.history")
                    .is_empty(),
                "looked before posting again"
            );
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_outage_falls_back_to_email() {
    run_matrix(
        "HTTP 503 outage",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            case.env.slack.set_outage(true);
            case.publish_and_expect_email_only("outage").await;
            let body = case.env.smtp.mails()[0].text_body().unwrap_or_default();
            assert!(
                body.contains(&form.target()),
                "the email names the target {}: {body}",
                form.target()
            );
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------
// invalid_blocks
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_blocks_posts_plain_text_once() {
    run_matrix(
        "invalid_blocks",
        per_form(&ALL, |form| async move {
            let case = Case::start(form).await;
            case.env
                .slack
                .fail_next("chat.postMessage", 1, Fault::api("invalid_blocks"));
            let worker = case.env.spawn_worker();
            case.publish("layout").await;
            case.wait_for_posts_to_recipient(1).await;
            worker.stop().await;

            let post = case.assert_posted_once_to_recipient();
            assert!(post.blocks.is_none(), "plain text: no blocks");
            let title = format!("[HIGH] Test event {}", case.event_id("layout"));
            assert_eq!(post.text.as_deref(), Some(title.as_str()));
            case.assert_no_email();
            case.assert_settled().await;
            case.cleanup().await;
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Channel identity and listing scopes
// ---------------------------------------------------------------------------

/// `#payments` and `C0PAYMENTS` in one event: one channel, one post — with
/// a working token, and with one Slack reports expired (the name is then
/// resolved with the refreshed token, not left as a name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_named_by_name_and_by_id_in_one_event_gets_one_post() {
    let cases = [("token valid", false), ("token expired", true)]
        .into_iter()
        .map(|(name, expired)| {
            named(name, async move {
                let env = TestEnv::start(RULES).await;
                let worker = if expired {
                    expired_rotating_token(&env).await;
                    env.spawn_worker_with(rotation_secrets())
                } else {
                    env.spawn_worker()
                };
                env.publish(&env.event(
                    &format!("twice-named-{}", name.replace(' ', "-")),
                    json!({"targets": [{"slack_channel": "#payments"}, {"slack_channel": PAYMENTS}]}),
                ))
                .await;
                env.slack
                    .wait_for_posts_to(PAYMENTS, 1, WAIT)
                    .await
                    .unwrap();
                worker.stop().await;

                assert_eq!(
                    env.slack.posts().len(),
                    1,
                    "#payments and C0PAYMENTS are one channel: one post\n{}",
                    env.slack.describe()
                );
                assert!(env.smtp.mails().is_empty());
                assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
                env.cleanup().await;
            })
        })
        .collect();
    run_matrix("#payments + C0PAYMENTS", cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_read_and_groups_read_a_name_is_posted_by_name() {
    let env = TestEnv::start(RULES).await;
    let token = format!("xoxb-test-no-read-{}", env.id);
    env.slack.add_token(
        &token,
        TokenSpec::bot(&env.workspace, "U0BOT").with_scopes(&[
            "chat:write",
            "chat:write.public",
            "channels:join",
            "im:write",
            "users:read",
            "users:read.email",
        ]),
    );
    env.store_token(&env.workspace, &token).await;
    let worker = env.spawn_worker();
    env.publish(&env.event(
        "by-name",
        json!({"targets": [{"slack_channel": "#payments"}]}),
    ))
    .await;
    let posts = env
        .slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(posts[0].channel, "#payments", "posted by name");
    assert_eq!(env.slack.posts().len(), 1);
    let listings = env.slack.requests_for("conversations.list");
    assert!(
        !listings.is_empty()
            && listings
                .iter()
                .all(|r| r.error.as_deref() == Some("missing_scope")),
        "the listing was tried and refused"
    );
    assert!(env.smtp.mails().is_empty());
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

/// Every refusal of the listing that is not about Slack or the token
/// (`invalid_types`, `no_permission`, an org-wide install's missing
/// `team_id`, …) leaves the name to `chat.postMessage`, which takes it,
/// and is remembered: the next names are posted by name without asking
/// again (the listing's Tier 2 allowance is 20 calls a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_refused_for_its_own_reasons_posts_by_name() {
    for code in [
        "invalid_types",
        "no_permission",
        "missing_argument",
        "accesslimited",
    ] {
        let env = TestEnv::start(RULES).await;
        env.slack
            .fail_next("conversations.list", 1000, Fault::Api(code.into()));
        let worker = env.spawn_worker();
        for (i, name) in ["#payments", "#payments", "payments"].iter().enumerate() {
            env.publish(&env.event(
                &format!("by-name-{i}"),
                json!({"targets": [{"slack_channel": name}]}),
            ))
            .await;
            env.slack
                .wait_for_posts_to(PAYMENTS, i + 1, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{code}: {e}\n{}", env.slack.describe()));
        }
        worker.stop().await;

        let posts = env.slack.posts();
        assert_eq!(posts.len(), 3, "{code}");
        assert_eq!(posts[0].channel, "#payments", "{code}: posted by name");
        assert_eq!(posts[2].channel, "#payments", "{code}: posted by #name");
        let listings = env.slack.requests_for("conversations.list");
        // `missing_argument` is asked once more naming the workspace (an
        // org-wide app's token must), then remembered like the others.
        let tries = if code == "missing_argument" { 2 } else { 1 };
        assert_eq!(
            listings.len(),
            tries,
            "{code}: the listing was tried and its refusal remembered"
        );
        assert!(
            listings.iter().all(|r| r.error.as_deref() == Some(code)),
            "{code}"
        );
        assert!(env.smtp.mails().is_empty(), "{code}: nothing emailed");
        assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
        env.cleanup().await;
    }
}

/// A cursor Slack no longer takes (a long listing outlives it) restarts the
/// listing from its first page, once: the name still resolves to its id,
/// instead of being posted by name as after a refusal of the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_listing_cursor_lists_again_from_the_first_page() {
    let env = TestEnv::start(RULES).await;
    env.slack.set_list_page_cap(1);
    env.slack.expire_next_list_cursors(1);
    let worker = env.spawn_worker();
    env.publish(&env.event(
        "cursor-expired",
        json!({"targets": [{"slack_channel": "#payments"}]}),
    ))
    .await;
    let posts = env
        .slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(
        posts[0].channel, PAYMENTS,
        "resolved to the id, not posted by name"
    );
    let listings = env.slack.requests_for("conversations.list");
    let expired: Vec<_> = listings
        .iter()
        .filter(|r| r.error.as_deref() == Some("invalid_cursor"))
        .collect();
    assert_eq!(expired.len(), 1, "{}", env.slack.describe());
    let first_pages = listings
        .iter()
        .filter(|r| {
            r.params
                .get("cursor")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .count();
    assert_eq!(first_pages, 2, "listed from the first page again");
    assert!(
        listings
            .iter()
            .all(|r| r.error.is_none() || r.error.as_deref() == Some("invalid_cursor"))
    );
    assert!(env.smtp.mails().is_empty());
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

/// An org-wide app's token (Enterprise Grid) must name the workspace to
/// list: Slack answers `missing_argument` without `team_id`, and the
/// listing is asked again with the event's workspace, so names still
/// resolve to ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_wide_token_lists_the_channels_of_the_events_workspace() {
    let env = TestEnv::start(RULES).await;
    let token = format!("xoxb-test-org-{}", env.id);
    env.slack
        .add_token(&token, TokenSpec::bot(&env.workspace, "U0BOT").org_wide());
    env.store_token(&env.workspace, &token).await;
    let worker = env.spawn_worker();
    env.publish(&env.event(
        "org-wide",
        json!({"targets": [{"slack_channel": "#payments"}]}),
    ))
    .await;
    let posts = env
        .slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.slack.describe()));
    worker.stop().await;

    assert_eq!(posts[0].channel, PAYMENTS, "posted by the channel's id");
    let listings = env.slack.requests_for("conversations.list");
    assert_eq!(listings.len(), 2, "{listings:#?}");
    assert_eq!(listings[0].error.as_deref(), Some("missing_argument"));
    assert_eq!(listings[1].params["team_id"], env.workspace.as_str());
    assert_eq!(listings[1].error, None);
    assert!(env.smtp.mails().is_empty(), "nothing emailed");
    env.cleanup().await;
}

/// `no_permission` on a post means, as Slack documents it, that the app is
/// not a member of the conversation: it joins and posts, like
/// `not_in_channel`, instead of treating the token as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_permission_on_a_post_joins_the_channel_and_posts() {
    let env = TestEnv::start(RULES).await;
    env.slack
        .fail_next("chat.postMessage", 1, Fault::Api("no_permission".into()));
    let worker = env.spawn_worker();
    env.publish(&env.event(
        "no-permission",
        json!({"targets": [{"slack_channel": PAYMENTS}]}),
    ))
    .await;
    env.slack
        .wait_for_posts_to(PAYMENTS, 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.slack.describe()));
    worker.stop().await;

    let joins = env.slack.requests_for("conversations.join");
    assert_eq!(joins.len(), 1, "joined once");
    assert_eq!(joins[0].params["channel"], PAYMENTS);
    assert_eq!(env.slack.posts().len(), 1);
    assert!(env.smtp.mails().is_empty(), "nothing emailed");
    assert_eq!(env.ready_count(&env.settings.amqp.queue).await, 0);
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// A direct-message conversation named by its `D…` id
// ---------------------------------------------------------------------------

/// `slack_channel: D…` is somebody's direct messages: it posts there when
/// Slack takes it, and when Slack refuses it (a conversation between two
/// people the bot is not part of, gone, or closed) it is emailed like any
/// DM, never joined and never rerouted to the shared default channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_conversation_by_id_posts_there_or_is_emailed_never_rerouted() {
    let mut cases = vec![named("ok", async {
        let case = Case::start(ChannelId).await;
        let dm = case.env.slack.dm_channel_id(PERSON);
        let worker = case.env.spawn_worker();
        let targets = json!({"targets": [{"slack_channel": dm}]});
        case.env.publish(&case.env.event("dm-by-id", targets)).await;
        case.env
            .slack
            .wait_for_posts_to(&dm, 1, WAIT)
            .await
            .unwrap_or_else(|e| panic!("no post in the DM: {e}"));
        worker.stop().await;

        let posts = case.env.slack.posts();
        assert_eq!(posts.len(), 1, "one post in all");
        assert_eq!(posts[0].channel, dm, "posted by the conversation's id");
        case.assert_no_email();
        case.assert_settled().await;
        case.cleanup().await;
    })];
    for code in [
        "channel_not_found",
        "not_in_channel",
        "no_permission",
        "is_archived",
        "restricted_action",
    ] {
        cases.push(named(code, async move {
            let case = Case::start(ChannelId).await;
            let dm = case.env.slack.dm_channel_id(PERSON);
            case.env.slack.fail_channel(&dm, Fault::api(code));
            let worker = case.env.spawn_worker();
            let targets = json!({"targets": [{"slack_channel": dm}]});
            let id = format!("dm-by-id-{code}").replace('_', "-");
            case.env.publish(&case.env.event(&id, targets)).await;
            case.wait_for_email_to(DEFAULT_EMAIL).await;
            worker.stop().await;

            case.assert_nothing_posted();
            assert!(
                case.env.slack.requests_for("conversations.join").is_empty(),
                "a direct message is not joined"
            );
            case.assert_one_email();
            case.assert_settled().await;
            case.cleanup().await;
        }));
    }
    run_matrix("a D… id", cases).await;
}
