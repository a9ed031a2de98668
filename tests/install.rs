//! The Slack install flow end to end, through a worker process, the fake
//! Slack's consent page and `oauth.v2.access`, and the real Redis: the
//! token it stores delivers the workspace's events, and a bad callback
//! stores nothing.

mod support;

use std::collections::HashMap;

use alert_router::config::{DEFAULT_BOT_SCOPES, Secret};
use serde_json::json;
use support::fake_slack::Fault;
use support::{BASIC_RULES, ESCALATIONS, TestEnv, WAIT, WorkerProcess};

const CLIENT_ID: &str = "1111.2222";
const CLIENT_SECRET: &str = "install-test-client-secret";

/// A worker with install on, and a browser that does not follow redirects.
struct Site {
    worker: WorkerProcess,
    base: String,
    browser: reqwest::Client,
}

impl Site {
    /// Starts a worker serving the install pages at `http://127.0.0.1:PORT`,
    /// which is also its public URL, sending installers to the fake's consent page.
    async fn start(env: &TestEnv, secrets: bool, public_url: bool) -> Site {
        Site::start_with(env, secrets, public_url, &[]).await
    }

    /// [`Site::start`] with more settings in the worker's environment.
    async fn start_with(
        env: &TestEnv,
        secrets: bool,
        public_url: bool,
        settings: &[(&str, &str)],
    ) -> Site {
        // A free port (released just before the worker binds it).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let listen = format!("127.0.0.1:{port}");
        let authorize = env.slack.authorize_url();
        let mut vars = vec![
            ("ALERT_ROUTER__HTTP__LISTEN", listen.as_str()),
            (
                "ALERT_ROUTER__SLACK__OAUTH_AUTHORIZE_URL",
                authorize.as_str(),
            ),
        ];
        if secrets {
            vars.push(("SLACK_CLIENT_ID", CLIENT_ID));
            vars.push(("SLACK_CLIENT_SECRET", CLIENT_SECRET));
        }
        if public_url {
            vars.push(("ALERT_ROUTER__HTTP__PUBLIC_URL", base.as_str()));
        }
        vars.extend_from_slice(settings);
        let mut worker = env.start_worker_process_with(&vars);
        // Logged once the HTTP listener is bound.
        worker.wait_for_log("consuming", 1).await;
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(WAIT)
            .build()
            .unwrap();
        Site {
            worker,
            base,
            browser,
        }
    }

    fn callback_url(&self) -> String {
        format!("{}/slack/oauth/callback", self.base)
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.browser.get(url).send().await.unwrap()
    }

    /// `GET /slack/install`: the redirect's target and its query.
    async fn begin(&self) -> (String, HashMap<String, String>) {
        let r = self.get(&format!("{}/slack/install", self.base)).await;
        assert_eq!(r.status(), 302, "{:?}", r.text().await);
        redirect_of(&r)
    }

    /// Install → Slack's consent page → the callback URL Slack sends back.
    async fn through_slack(&self) -> String {
        let (authorize, query) = self.begin().await;
        let mut url = url::Url::parse(&authorize).unwrap();
        url.query_pairs_mut().extend_pairs(query.iter());
        let r = self.get(url.as_str()).await;
        assert_eq!(r.status(), 302, "the consent page: {:?}", r.text().await);
        r.headers()["location"].to_str().unwrap().to_string()
    }

    /// The callback's status and page.
    async fn finish(&self, callback: &str) -> (u16, String) {
        let r = self.get(callback).await;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let page = r.text().await.unwrap();
        assert_eq!(
            headers["content-type"], "text/html; charset=utf-8",
            "{page}"
        );
        assert_eq!(headers["cache-control"], "no-store");
        (status, page)
    }

    async fn metrics(&self) -> String {
        self.get(&format!("{}/metrics", self.base))
            .await
            .text()
            .await
            .unwrap()
    }

    /// Stops the worker and returns everything it logged.
    async fn stop(self) -> String {
        let lines = self.worker.log_lines().join("\n");
        assert!(self.worker.stop().await.success());
        lines
    }
}

/// Where a redirect goes, without its query, and the query.
fn redirect_of(r: &reqwest::Response) -> (String, HashMap<String, String>) {
    let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let query = location.query_pairs().into_owned().collect();
    let mut base = location.clone();
    base.set_query(None);
    (base.to_string(), query)
}

/// The workspaces with a token record in this test's Redis.
async fn stored_workspaces(env: &TestEnv) -> Vec<String> {
    let prefix = format!("{}:slack:token:", env.settings.redis.key_prefix);
    let mut redis = support::redis_connection(&env.settings).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    keys.sort();
    keys.iter()
        .map(|k| k.trim_start_matches(&prefix).to_string())
        .collect()
}

/// A new workspace's id, unique to the test.
fn new_team(env: &TestEnv) -> String {
    format!("TNEW{}", env.id.to_uppercase())
}

/// An event for `team`'s default channel; the post it makes, with its token.
async fn deliver_for(env: &TestEnv, team: &str, id: &str) -> support::fake_slack::RecordedPost {
    // No rule matches: the default channel.
    env.publish(&env.event(id, json!({"workspace": team})))
        .await;
    env.slack.wait_for_posts(1, WAIT).await.unwrap();
    env.slack.posts().pop().unwrap()
}

fn assert_no_secret(text: &str, what: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
    }
}

#[tokio::test]
async fn an_install_stores_a_token_that_delivers_the_workspaces_events() {
    let env = TestEnv::start(BASIC_RULES).await;
    let team = new_team(&env);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack.approve_installs_as(&team, "Ops & <Friends>");
    let site = Site::start(&env, true, true).await;

    let (authorize, query) = site.begin().await;
    assert_eq!(authorize, env.slack.authorize_url());
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(query["scope"], DEFAULT_BOT_SCOPES.join(","));
    assert_eq!(query["redirect_uri"], site.callback_url());
    assert!(query["state"].len() > 40, "a signed state: {query:?}");
    let (_, again) = site.begin().await;
    assert_ne!(again["state"], query["state"], "each install its own state");

    let callback = site.through_slack().await;
    assert!(callback.starts_with(&site.callback_url()), "{callback}");
    let (status, page) = site.finish(&callback).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&format!(
            "Installed alert-router in workspace Ops &amp; &lt;Friends&gt; ({team})."
        )),
        "{page}"
    );

    let installed = env.slack.installs();
    assert_eq!(installed.len(), 1);
    let exchange = &env.slack.requests_for("oauth.v2.access")[0];
    assert_eq!(
        exchange.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        exchange.params["redirect_uri"],
        site.callback_url().as_str()
    );
    let record = env.token_record(&team).await;
    assert_eq!(
        record,
        json!({"access_token": installed[0].access_token, "refresh_token": null,
               "expires_at": null, "team_id": team, "bot_user_id": installed[0].bot_user_id})
    );

    let post = deliver_for(&env, &team, "after-install").await;
    assert_eq!(post.token, installed[0].access_token);
    assert_eq!(post.team_id, team);
    assert_eq!(post.channel_id, ESCALATIONS);

    let metrics = site.metrics().await;
    assert!(
        metrics.contains("alert_router_slack_installs_total{result=\"installed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("alert_router_slack_installs_total{result=\"started\"} 3"));
    let secrets = [installed[0].access_token.as_str(), CLIENT_SECRET];
    assert_no_secret(&page, "the page", &secrets);
    assert_no_secret(&metrics, "/metrics", &secrets);
    let log = site.stop().await;
    assert!(log.contains("Slack install is on"), "{log}");
    assert!(log.contains("Slack install: token stored"), "{log}");
    assert_no_secret(&log, "the log", &secrets);
    env.assert_nothing_pending().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_install_from_a_workspace_not_allowed_is_refused_and_its_token_revoked() {
    // Slack answering the revoke at once, failing it once, and taking it
    // but losing the answer (the retry then finds the token revoked).
    for (case, fault) in [
        ("answered", None),
        (
            "503 first",
            Some(Fault::HttpJson(503, "service_unavailable".into())),
        ),
        (
            "answer lost",
            Some(Fault::AcceptThenFail(Box::new(Fault::Http(502)))),
        ),
    ] {
        refused_install_revokes_its_token(case, fault).await;
    }
}

async fn refused_install_revokes_its_token(case: &str, fault: Option<Fault>) {
    let env = TestEnv::start(BASIC_RULES).await;
    if let Some(fault) = fault {
        env.slack.fail_next("auth.revoke", 1, fault);
    }
    let team = new_team(&env);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack.approve_installs_as(&team, "Somebody Else");
    let only_ours = env.workspace.clone();
    let site = Site::start_with(
        &env,
        true,
        true,
        &[(
            "ALERT_ROUTER__SLACK__ALLOWED_WORKSPACES",
            only_ours.as_str(),
        )],
    )
    .await;

    let callback = site.through_slack().await;
    let (status, page) = site.finish(&callback).await;
    assert_eq!(status, 403, "{page}");
    let installed = env.slack.installs();
    assert_eq!(installed.len(), 1, "Slack did install the app");
    let revokes = env.slack.requests_for("auth.revoke");
    assert!(
        !revokes.is_empty(),
        "{case}: the token Slack issued is revoked"
    );
    assert!(
        revokes
            .iter()
            .all(|r| r.token.as_deref() == Some(installed[0].access_token.as_str())),
        "{case}"
    );
    assert!(
        !stored_workspaces(&env).await.contains(&team),
        "{case}: nothing stored for the refused workspace"
    );
    let check = env
        .slack
        .token(&installed[0].access_token)
        .expect("the fake knows the token");
    assert_eq!(
        check.state,
        support::fake_slack::TokenState::Revoked,
        "{case}"
    );
    let log = site.stop().await;
    assert!(
        !log.contains("cannot revoke the token"),
        "{case}: revoked, and not reported otherwise\n{log}"
    );
    assert_no_secret(
        &log,
        "the log",
        &[installed[0].access_token.as_str(), CLIENT_SECRET],
    );
    env.cleanup().await;
}

#[tokio::test]
async fn with_rotation_on_the_install_stores_the_refresh_token_and_expiry() {
    let env = TestEnv::start(BASIC_RULES).await;
    let team = new_team(&env);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack.set_token_rotation(true);
    env.slack.approve_installs_as(&team, "Rotating Team");
    let site = Site::start(&env, true, true).await;

    let callback = site.through_slack().await;
    let before = chrono::Utc::now().timestamp();
    let (status, page) = site.finish(&callback).await;
    let after = chrono::Utc::now().timestamp();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Token rotation is on"), "{page}");

    let installed = &env.slack.installs()[0];
    let refresh_token = installed.refresh_token.clone().unwrap();
    let record = env.token_record(&team).await;
    assert_eq!(record["access_token"], installed.access_token.as_str());
    assert!(installed.access_token.starts_with("xoxe.xoxb-"));
    assert_eq!(record["refresh_token"], refresh_token.as_str());
    assert_eq!(record["team_id"], team.as_str());
    let expires_at = record["expires_at"].as_i64().unwrap();
    let lifetime = installed.expires_in.unwrap() as i64;
    assert!(
        (before + lifetime..=after + lifetime).contains(&expires_at),
        "expires_at {expires_at} is not {lifetime}s after the install"
    );

    let post = deliver_for(&env, &team, "rotating-install").await;
    assert_eq!(post.token, installed.access_token);
    assert_eq!(
        env.slack.refresh_count(),
        0,
        "a fresh token needs no refresh"
    );
    let log = site.stop().await;
    assert_no_secret(
        &log,
        "the log",
        &[&installed.access_token, &refresh_token, CLIENT_SECRET],
    );
    env.cleanup().await;
}

#[tokio::test]
async fn bad_callbacks_answer_400_and_store_nothing() {
    let env = TestEnv::start(BASIC_RULES).await;
    let team = new_team(&env);
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack.approve_installs_as(&team, "Target Team");
    let site = Site::start(&env, true, true).await;
    let before = stored_workspaces(&env).await;
    assert_eq!(before, std::slice::from_ref(&env.workspace));
    let callback = site.callback_url();

    // Missing state: the code Slack sent is not even exchanged.
    let code = env.slack.authorization_code(&team, &callback);
    let (status, page) = site.finish(&format!("{callback}?code={code}")).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("carries no state"), "{page}");

    // A tampered state: one digit of its MAC changed.
    let (_, query) = site.begin().await;
    let state = &query["state"];
    let last = state.chars().last().unwrap();
    let tampered = format!(
        "{}{}",
        &state[..state.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let (status, page) = site
        .finish(&format!("{callback}?code={code}&state={tampered}"))
        .await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("not one this worker issued"), "{page}");

    // A state this worker signed eleven minutes ago (they live ten).
    let old = alert_router::install::sign_state(
        &Secret::new(CLIENT_SECRET),
        chrono::Utc::now().timestamp() - 11 * 60,
    )
    .unwrap();
    let (status, page) = site
        .finish(&format!("{callback}?code={code}&state={old}"))
        .await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("expired"), "{page}");
    assert!(
        env.slack.requests_for("oauth.v2.access").is_empty(),
        "no code was exchanged on a bad state"
    );

    // The installer cancels on Slack's consent page.
    env.slack.deny_installs();
    let denied = site.through_slack().await;
    assert!(denied.contains("error=access_denied"), "{denied}");
    let (status, page) = site.finish(&denied).await;
    assert_eq!(status, 400, "{page}");
    assert!(
        page.contains("cancelled in Slack (access_denied)"),
        "{page}"
    );
    assert_eq!(stored_workspaces(&env).await, before, "nothing stored");

    // A callback opened twice (a reload): the second exchange of its code fails.
    env.slack.approve_installs_as(&team, "Target Team");
    let good = site.through_slack().await;
    assert_eq!(site.finish(&good).await.0, 200);
    let record = env.token_record(&team).await;
    let (status, page) = site.finish(&good).await;
    assert_eq!(status, 400, "{page}");
    assert!(
        page.contains("(invalid_code): the code was already used or has expired"),
        "{page}"
    );
    assert_eq!(
        env.token_record(&team).await,
        record,
        "the record is untouched"
    );
    assert_eq!(env.slack.installs().len(), 1);

    let metrics = site.metrics().await;
    for line in [
        "alert_router_slack_installs_total{result=\"bad_state\"} 3",
        "alert_router_slack_installs_total{result=\"denied\"} 1",
        "alert_router_slack_installs_total{result=\"slack_error\"} 1",
        "alert_router_slack_installs_total{result=\"installed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    site.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn without_the_client_credentials_or_a_public_url_the_pages_say_what_to_set() {
    let env = TestEnv::start(BASIC_RULES).await;
    env.slack.set_oauth_client(CLIENT_ID, CLIENT_SECRET);
    env.slack.approve_installs_as(&new_team(&env), "Team");

    let site = Site::start(&env, false, true).await;
    for path in ["/slack/install", "/slack/oauth/callback?code=1.x&state=y"] {
        let r = site.get(&format!("{}{path}", site.base)).await;
        assert_eq!(r.status(), 503);
        let page = r.text().await.unwrap();
        assert!(
            page.contains("set SLACK_CLIENT_ID and SLACK_CLIENT_SECRET"),
            "{page}"
        );
    }
    let log = site.stop().await;
    assert_eq!(
        log.matches("Slack install is off").count(),
        1,
        "said once, at start:\n{log}"
    );

    let site = Site::start(&env, true, false).await;
    let r = site.get(&format!("{}/slack/install", site.base)).await;
    assert_eq!(r.status(), 503);
    let page = r.text().await.unwrap();
    assert!(page.contains("set http.public_url"), "{page}");
    site.stop().await;

    assert!(env.slack.authorize_requests().is_empty());
    assert!(env.slack.requests_for("oauth.v2.access").is_empty());
    assert_eq!(
        stored_workspaces(&env).await,
        std::slice::from_ref(&env.workspace)
    );
    env.cleanup().await;
}

#[test]
fn the_readme_manifest_asks_for_the_scopes_the_install_asks_for_and_names_the_worker_urls() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Create the Slack app").unwrap()..];
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let manifest: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
    assert_eq!(
        manifest["oauth_config"]["scopes"]["bot"],
        json!(DEFAULT_BOT_SCOPES)
    );
    assert_eq!(
        manifest["oauth_config"]["redirect_urls"],
        json!(["https://YOUR-HOST/slack/oauth/callback"])
    );
    assert_eq!(
        manifest["settings"]["interactivity"]["request_url"],
        "https://YOUR-HOST/slack/interactions"
    );
    // The settings file lists the same defaults.
    let file = alert_router::config::Settings::load_from(
        Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/alert-router.yaml"
        ))),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(file.slack.oauth_scopes, DEFAULT_BOT_SCOPES);
    assert_eq!(
        file.slack.oauth_state_ttl,
        std::time::Duration::from_secs(600)
    );
}
