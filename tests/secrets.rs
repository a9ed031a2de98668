//! Every settings and token type prints its secrets as `***`, in `{:?}`, `{}`
//! and the serialised settings, while the places that connect still get them.

use alert_router::config::{Secret, SecretUrl, Secrets, Settings};
use alert_router::deliver::email::{EmailError, EmailSender};
use alert_router::deliver::slack::tokens::{TokenRecord, WorkspaceToken, parse_record};

const AMQP_PASSWORD: &str = "amqp-pass-7f3a";
const REDIS_PASSWORD: &str = "redis-pass-91c2";
const SMTP_PASSWORD: &str = "smtp-pass-c4d8";
const ACCESS_TOKEN: &str = "xoxb-test-access-secret-5e21";
const REFRESH_TOKEN: &str = "xoxe-test-refresh-secret-0b77";
const BOT_TOKEN: &str = "xoxb-test-env-secret-3a90";
const CLIENT_SECRET: &str = "client-secret-6d14";
const SIGNING_SECRET: &str = "signing-secret-8e05";

const SECRETS: [&str; 8] = [
    AMQP_PASSWORD,
    REDIS_PASSWORD,
    SMTP_PASSWORD,
    ACCESS_TOKEN,
    REFRESH_TOKEN,
    BOT_TOKEN,
    CLIENT_SECRET,
    SIGNING_SECRET,
];

fn assert_no_secret(what: &str, shown: &str) {
    for secret in SECRETS {
        assert!(!shown.contains(secret), "{what} shows {secret}: {shown}");
    }
}

/// Settings loaded the way an operator writes them: URLs with credentials,
/// from the environment.
fn settings() -> Settings {
    let env = [
        (
            "ALERT_ROUTER__AMQP__URL",
            format!("amqp://app:{AMQP_PASSWORD}@rabbit:5672/%2f"),
        ),
        (
            "ALERT_ROUTER__REDIS__URL",
            format!("redis://:{REDIS_PASSWORD}@redis:6379/0"),
        ),
        (
            "ALERT_ROUTER__EMAIL__SMTP_URL",
            format!("smtps://mailer:{SMTP_PASSWORD}@mail.example"),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alert-router.yaml");
    std::fs::write(&path, "{}").unwrap();
    Settings::load_from(
        Some(&path),
        env.into_iter().map(|(k, v)| (k.to_string(), v)),
    )
    .unwrap()
}

fn record() -> TokenRecord {
    TokenRecord {
        access_token: Secret::new(ACCESS_TOKEN),
        refresh_token: Some(Secret::new(REFRESH_TOKEN)),
        expires_at: Some(1_900_000_000),
        team_id: "T0AEXY01".into(),
        bot_user_id: Some("U0BOT".into()),
    }
}

#[test]
fn settings_show_their_urls_with_the_passwords_redacted() {
    let s = settings();
    for (what, shown) in [
        ("Settings {:?}", format!("{s:?}")),
        ("Settings {:#?}", format!("{s:#?}")),
        ("AmqpSettings {:?}", format!("{:?}", s.amqp)),
        ("RedisSettings {:?}", format!("{:?}", s.redis)),
        ("EmailSettings {:?}", format!("{:?}", s.email)),
        ("amqp.url {}", s.amqp.url.to_string()),
        ("redis.url {}", s.redis.url.to_string()),
        ("email.smtp_url {}", s.email.smtp_url.to_string()),
        ("redacted_yaml", s.redacted_yaml()),
        ("Settings as JSON", serde_json::to_string(&s).unwrap()),
    ] {
        assert_no_secret(what, &shown);
    }
    let shown = format!("{s:?}");
    assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
    assert!(shown.contains("redis://:***@redis:6379/0"), "{shown}");
    assert!(shown.contains("smtps://mailer:***@mail.example"), "{shown}");
}

#[test]
fn the_places_that_connect_get_the_urls_as_written() {
    let s = settings();
    assert_eq!(
        s.amqp.url.expose(),
        format!("amqp://app:{AMQP_PASSWORD}@rabbit:5672/%2f")
    );
    assert_eq!(
        s.redis.url.expose(),
        format!("redis://:{REDIS_PASSWORD}@redis:6379/0")
    );
    assert_eq!(
        s.email.smtp_url.expose(),
        format!("smtps://mailer:{SMTP_PASSWORD}@mail.example")
    );
}

#[test]
fn a_url_with_a_token_as_its_user_or_that_does_not_parse_is_hidden_whole() {
    let token_as_user = SecretUrl::new(format!("rediss://{REDIS_PASSWORD}@redis:6380"));
    assert_eq!(token_as_user.to_string(), "rediss://***@redis:6380");
    let unparsable = SecretUrl::new(format!("amqp//app:{AMQP_PASSWORD}@rabbit"));
    assert_eq!(format!("{unparsable:?}"), r#""***""#);
}

#[test]
fn environment_secrets_print_as_stars() {
    let secrets = Secrets {
        slack_bot_token: Some(Secret::new(BOT_TOKEN)),
        slack_client_id: Some("1234.5678".into()),
        slack_client_secret: Some(Secret::new(CLIENT_SECRET)),
        slack_signing_secret: Some(Secret::new(SIGNING_SECRET)),
    };
    assert_no_secret("Secrets {:?}", &format!("{secrets:?}"));
    let secret = Secret::new(CLIENT_SECRET);
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(secret.to_string(), "***");
}

#[test]
fn token_records_and_workspace_tokens_print_no_token() {
    let record = record();
    assert_no_secret("TokenRecord {:?}", &format!("{record:?}"));
    assert_no_secret("TokenRecord {:#?}", &format!("{record:#?}"));
    let token = WorkspaceToken {
        workspace: "T0AEXY01".into(),
        access_token: Secret::new(ACCESS_TOKEN),
        expires_at: None,
        source: "redis",
        rotating: true,
    };
    assert_no_secret("WorkspaceToken {:?}", &format!("{token:?}"));
}

#[test]
fn a_token_record_is_stored_with_its_tokens_and_read_back() {
    let stored = serde_json::to_string(&record()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(json["access_token"], ACCESS_TOKEN);
    assert_eq!(json["refresh_token"], REFRESH_TOKEN);

    let read = parse_record(&stored).unwrap();
    assert_eq!(read.access_token.expose(), ACCESS_TOKEN);
    assert_eq!(
        read.refresh_token.as_ref().map(Secret::expose),
        Some(REFRESH_TOKEN)
    );
    let without_refresh = parse_record(r#"{"access_token":"xoxb-1","team_id":"T1"}"#).unwrap();
    assert!(without_refresh.refresh_token.is_none());
}

#[tokio::test]
async fn the_email_sender_and_its_errors_print_no_smtp_password() {
    let mut email = settings().email;
    let sender = EmailSender::new(&email).unwrap();
    assert_no_secret("EmailSender {:?}", &format!("{sender:?}"));

    // Credentials over what may be plain text to a remote host are refused.
    email.smtp_url = format!("smtp://mailer:{SMTP_PASSWORD}@mail.example:25").into();
    let err = EmailSender::new(&email).unwrap_err();
    assert!(matches!(err, EmailError::InvalidUrl { .. }), "{err:?}");
    assert_no_secret("EmailError {}", &err.to_string());
    assert_no_secret("EmailError {:?}", &format!("{err:?}"));
}
