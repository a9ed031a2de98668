//! Settings as the `ALERT_ROUTER__…` environment of an `alert-router` process (tests and benches).

use alert_router::config::{LogFormat, Settings};

/// The variables that give a worker process `settings` (the fields tests and benches change).
pub fn worker_env(s: &Settings) -> Vec<(String, String)> {
    let millis = |d: std::time::Duration| format!("{}ms", d.as_millis());
    let delays: Vec<String> = s.delivery.retry_delays.iter().map(|d| millis(*d)).collect();
    [
        ("AMQP__URL", s.amqp.url.expose().to_string()),
        ("AMQP__EXCHANGE", s.amqp.exchange.clone()),
        ("AMQP__QUEUE", s.amqp.queue.clone()),
        (
            "AMQP__DEAD_LETTER_EXCHANGE",
            s.amqp.dead_letter_exchange.clone(),
        ),
        ("AMQP__DEAD_LETTER_QUEUE", s.amqp.dead_letter_queue.clone()),
        (
            "AMQP__RETRY_QUEUE_PREFIX",
            s.amqp.retry_queue_prefix.clone(),
        ),
        ("AMQP__PREFETCH", s.amqp.prefetch.to_string()),
        ("AMQP__CONNECT_TIMEOUT", millis(s.amqp.connect_timeout)),
        ("AMQP__CONFIRM_TIMEOUT", millis(s.amqp.confirm_timeout)),
        ("REDIS__URL", s.redis.url.expose().to_string()),
        ("REDIS__KEY_PREFIX", s.redis.key_prefix.clone()),
        ("SLACK__API_URL", s.slack.api_url.clone()),
        (
            "SLACK__DEFAULT_WORKSPACE",
            s.slack.default_workspace.clone().unwrap_or_default(),
        ),
        ("SLACK__REQUEST_TIMEOUT", millis(s.slack.request_timeout)),
        ("SLACK__RETRY_BASE_DELAY", millis(s.slack.retry_base_delay)),
        ("SLACK__RETRY_BUDGET", millis(s.slack.retry_budget)),
        ("SLACK__TOKEN_CACHE_TTL", millis(s.slack.token_cache_ttl)),
        (
            "SLACK__CHANNEL_RATE_PER_SECOND",
            s.slack.channel_rate_per_second.to_string(),
        ),
        ("SLACK__CHANNEL_BURST", s.slack.channel_burst.to_string()),
        (
            "SLACK__WORKSPACE_RATE_PER_MINUTE",
            s.slack.workspace_rate_per_minute.to_string(),
        ),
        (
            "SLACK__WORKSPACE_BURST",
            s.slack.workspace_burst.to_string(),
        ),
        ("EMAIL__SMTP_URL", s.email.smtp_url.expose().to_string()),
        ("RULES__PATH", s.rules.path.display().to_string()),
        ("HTTP__LISTEN", s.http.listen.to_string()),
        ("DELIVERY__RETRY_DELAYS", delays.join(",")),
        ("DELIVERY__DRAIN_TIMEOUT", millis(s.delivery.drain_timeout)),
        ("DELIVERY__CLAIM_LEASE", millis(s.delivery.claim_lease)),
        (
            "DELIVERY__MAX_RATE_LIMIT_DEFERRAL",
            millis(s.delivery.max_rate_limit_deferral),
        ),
        (
            "SLACK__CHANNEL_CACHE_TTL",
            millis(s.slack.channel_cache_ttl),
        ),
        (
            "SLACK__MAX_RATE_LIMIT_WAIT",
            millis(s.slack.max_rate_limit_wait),
        ),
        ("LOG__LEVEL", s.log.level.clone()),
        ("LOG__SHOW_ADDRESSES", s.log.show_addresses.to_string()),
        (
            "SLACK__ALLOWED_WORKSPACES",
            s.slack.allowed_workspaces.join(","),
        ),
        ("EMAIL__ALLOWED_DOMAINS", s.email.allowed_domains.join(",")),
        (
            "LOG__FORMAT",
            match s.log.format {
                LogFormat::Json => "json".to_string(),
                LogFormat::Text => "text".to_string(),
            },
        ),
    ]
    .into_iter()
    .map(|(k, v)| (format!("ALERT_ROUTER__{k}"), v))
    .collect()
}
