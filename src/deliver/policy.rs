//! What to do when Slack answers: one pure decision for every method the worker calls.
//!
//! "Slack answered X, calling this method for this kind of target, having
//! already tried these recoveries → the next step." Each recovery (refresh
//! the token, join, resolve the name again, plain text, no metadata, the
//! default channel) is tried at most once per attempt, so every path ends.
//! The README's table "When Slack cannot take a target" is this function
//! written out; the test below mirrors it row by row.

use std::time::Duration;

use super::slack::{SlackError, SlackFailure};

/// The Web API methods the worker calls while delivering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    PostMessage,
    Join,
    /// `conversations.open`: the DM id, to look for a lost post in it.
    Open,
    /// `conversations.list`: channel names to ids.
    List,
    /// `conversations.history`: looking for a post a crashed worker may have made.
    History,
    LookupByEmail,
    /// `chat.update`: an incident's first message showing its new state.
    Update,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::PostMessage => "chat.postMessage",
            Method::Join => "conversations.join",
            Method::Open => "conversations.open",
            Method::List => "conversations.list",
            Method::History => "conversations.history",
            Method::LookupByEmail => "users.lookupByEmail",
            Method::Update => "chat.update",
        }
    }
}

/// Who the target is: a channel everyone reads, or one person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `slack_channel` (by id or name).
    Channel,
    /// `slack_user`, `slack_email`, `assignee`: a direct message.
    Person,
}

/// What this attempt has already tried, and what it knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried {
    pub refreshed_token: bool,
    pub joined: bool,
    pub resolved_again: bool,
    pub plain_text: bool,
    pub without_metadata: bool,
    /// Posting to the default channel already (or the target is it).
    pub at_default_channel: bool,
    /// The channel was named (`#name`) and resolved from the cache: a
    /// `channel_not_found` may mean it was renamed or re-created.
    pub resolved_from_name: bool,
    /// The channel's id is known (joining needs the id).
    pub have_channel_id: bool,
    /// Posted as a top-level message after the incident's thread was refused.
    pub without_thread: bool,
}

/// The next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Rate limited: wait `Retry-After` (in place if short, else defer the
    /// event through the broker without spending an attempt). Never email.
    Wait(Duration),
    /// `token_expired`: refresh the token (once, one replica) and call again.
    RefreshToken,
    /// `not_in_channel`: join the channel by id and post again.
    JoinAndPost,
    /// `channel_not_found` for a cached name: resolve the name again, post there.
    ResolveAgain,
    /// The channel cannot take it: post to the default channel, naming the target.
    PostToDefaultChannel,
    /// Slack refused the layout: post again as plain text.
    PostPlainText,
    /// Slack refused the metadata: post again without it.
    PostWithoutMetadata,
    /// The incident's thread is gone (its first message deleted) or the
    /// channel takes no replies: post as a new top-level message.
    PostWithoutThread,
    /// The person cannot be messaged on Slack: email them.
    EmailPerson,
    /// The app may not list channels: post by `#name`.
    PostByName,
    /// The lost-post check cannot be made: post (a duplicate is possible).
    PostWithoutCheck,
    /// Slack cannot take this target: email fallback. `transient`: it may
    /// pass by itself (worth a broker retry if email fails too).
    SlackUnavailable { transient: bool },
}

/// The step after `error` from `method` for a target of `kind`.
pub fn next_step(method: Method, kind: TargetKind, error: &SlackError, tried: Tried) -> Step {
    let code = error.code.as_str();
    // Answers that mean the same on every method.
    if error.is_rate_limited() {
        return Step::Wait(error.retry_after().unwrap_or(Duration::from_secs(1)));
    }
    if error.failure == SlackFailure::TokenExpired {
        return if tried.refreshed_token {
            Step::SlackUnavailable { transient: true }
        } else {
            Step::RefreshToken
        };
    }
    let unavailable = Step::SlackUnavailable {
        transient: error.is_transient(),
    };
    match method {
        Method::PostMessage => after_post(kind, error, tried),
        // The contract: `not_in_channel` → join and post again, else the
        // default channel. Only a failing Slack or a token refused for
        // everything (revoked, inactive, …) keep the default channel from
        // taking it; every other refusal of the join is this channel's
        // (gone, archived, private, full, no `channels:join`, a bot or
        // restricted user that may not join).
        Method::Join => match error.failure {
            SlackFailure::Transient { .. } => unavailable,
            SlackFailure::Workspace if !CALL_ONLY_REFUSALS.contains(&code) => unavailable,
            _ => to_default_or_give_up(tried),
        },
        // Only a failing Slack or a refused token stop a post by name:
        // every other refusal of the listing (a scope, `invalid_types`, an
        // org-wide install that must name its team) is the listing's alone,
        // and `chat.postMessage` takes `#name` itself.
        Method::List if refuses_the_listing_alone(error) => Step::PostByName,
        Method::List => unavailable,
        // A failed check must not stop the notification.
        Method::Open | Method::History => match error.failure {
            SlackFailure::Workspace if code != "missing_scope" => unavailable,
            _ => Step::PostWithoutCheck,
        },
        Method::LookupByEmail => match error.failure {
            SlackFailure::Destination => Step::EmailPerson,
            _ => unavailable,
        },
        // The message stays as it was; nothing else can stand in for it.
        Method::Update => unavailable,
    }
}

/// Whether `error` from `conversations.list` refuses the listing alone
/// (a scope, `invalid_types`, an org-wide install that must name its
/// team, …), not Slack failing or the token: `chat.postMessage` still
/// takes the channel's `#name`.
pub fn refuses_the_listing_alone(error: &SlackError) -> bool {
    match error.failure {
        SlackFailure::Transient { .. } | SlackFailure::TokenExpired => false,
        SlackFailure::Workspace => CALL_ONLY_REFUSALS.contains(&error.code.as_str()),
        // A cursor that expired again after listing from the start: a
        // listing that failed, not one Slack refuses.
        _ if error.code == "invalid_cursor" => false,
        _ => !error.is_rate_limited(),
    }
}

/// Token-class answers that refuse one call only (a listing, a join), not
/// the token: the same token may still post.
const CALL_ONLY_REFUSALS: [&str; 3] = ["missing_scope", "no_permission", "access_denied"];

/// Answers to a reply (`thread_ts`) that a top-level post would not get.
const THREAD_REFUSED: [&str; 6] = [
    "thread_not_found",
    "invalid_thread_ts",
    // The parent gone, in the words `chat.update` uses for a missing message.
    "message_not_found",
    "restricted_action_non_threadable_channel",
    // A locked thread, and a parent that takes no replies: the channel
    // itself still takes a message.
    "restricted_action_thread_locked",
    "cannot_reply_to_message",
];

fn after_post(kind: TargetKind, error: &SlackError, tried: Tried) -> Step {
    let code = error.code.as_str();
    if THREAD_REFUSED.contains(&code) && !tried.without_thread {
        return Step::PostWithoutThread;
    }
    // Slack documents `no_permission` on a post as the app not being a
    // member of the conversation, and `access_denied` as "access to a
    // resource specified in the request is denied": the conversation's
    // refusal, not the token's (as `conversations.join` reads them too).
    let failure = match code {
        "no_permission" | "access_denied" => &SlackFailure::Destination,
        _ => &error.failure,
    };
    match (failure, kind) {
        (SlackFailure::Transient { .. }, _) => Step::SlackUnavailable { transient: true },
        // A direct message never lands in a shared channel.
        (SlackFailure::Destination, TargetKind::Person) => Step::EmailPerson,
        (SlackFailure::Destination, TargetKind::Channel) => {
            if matches!(code, "not_in_channel" | "no_permission")
                && tried.have_channel_id
                && !tried.joined
            {
                Step::JoinAndPost
            } else if code == "channel_not_found"
                && tried.resolved_from_name
                && !tried.resolved_again
            {
                Step::ResolveAgain
            } else {
                to_default_or_give_up(tried)
            }
        }
        (SlackFailure::Payload, _)
            if code.starts_with("invalid_metadata") || code.starts_with("metadata_") =>
        {
            if tried.without_metadata {
                Step::SlackUnavailable { transient: false }
            } else {
                Step::PostWithoutMetadata
            }
        }
        (SlackFailure::Payload, _) => {
            if tried.plain_text {
                Step::SlackUnavailable { transient: false }
            } else {
                Step::PostPlainText
            }
        }
        (SlackFailure::Workspace | SlackFailure::TokenExpired | SlackFailure::Other, _) => {
            Step::SlackUnavailable { transient: false }
        }
    }
}

fn to_default_or_give_up(tried: Tried) -> Step {
    if tried.at_default_channel {
        Step::SlackUnavailable { transient: false }
    } else {
        Step::PostToDefaultChannel
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::slack::client::classify;

    fn error(method: Method, code: &str) -> SlackError {
        let failure = match code {
            "ratelimited" => SlackFailure::Transient {
                retry_after: Some(Duration::from_secs(7)),
            },
            "http_503" | "timeout" => SlackFailure::Transient { retry_after: None },
            other => classify(other),
        };
        SlackError::new(method.name(), code, failure)
    }

    const ALL_METHODS: [Method; 7] = [
        Method::PostMessage,
        Method::Join,
        Method::Open,
        Method::List,
        Method::History,
        Method::LookupByEmail,
        Method::Update,
    ];

    /// The README's table, row by row: method, target, Slack's answer, what
    /// was tried, the step.
    #[test]
    fn every_answer_of_every_method_has_the_step_the_readme_promises() {
        use Method::*;
        use TargetKind::*;
        let fresh = Tried::default();
        let by_id = Tried {
            have_channel_id: true,
            ..fresh
        };
        let by_name = Tried {
            have_channel_id: true,
            resolved_from_name: true,
            ..fresh
        };
        let unavailable = |transient| Step::SlackUnavailable { transient };
        let rows: Vec<(Method, TargetKind, &str, Tried, Step)> = vec![
            // chat.postMessage to a channel
            (
                PostMessage,
                Channel,
                "not_in_channel",
                by_id,
                Step::JoinAndPost,
            ),
            (
                PostMessage,
                Channel,
                "not_in_channel",
                Tried {
                    joined: true,
                    ..by_id
                },
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "not_in_channel",
                fresh,
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "channel_not_found",
                by_name,
                Step::ResolveAgain,
            ),
            (
                PostMessage,
                Channel,
                "channel_not_found",
                Tried {
                    resolved_again: true,
                    ..by_name
                },
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "channel_not_found",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "is_archived",
                by_name,
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "restricted_action",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "channel_not_found",
                Tried {
                    at_default_channel: true,
                    ..by_id
                },
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "invalid_blocks",
                by_id,
                Step::PostPlainText,
            ),
            (
                PostMessage,
                Channel,
                "attachment_payload_limit_exceeded",
                by_id,
                Step::PostPlainText,
            ),
            (
                PostMessage,
                Channel,
                "msg_blocks_too_long",
                by_id,
                Step::PostPlainText,
            ),
            (
                PostMessage,
                Channel,
                "invalid_blocks",
                Tried {
                    plain_text: true,
                    ..by_id
                },
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "invalid_metadata_format",
                by_id,
                Step::PostWithoutMetadata,
            ),
            (
                PostMessage,
                Channel,
                "invalid_metadata_schema",
                by_id,
                Step::PostWithoutMetadata,
            ),
            (
                PostMessage,
                Channel,
                "metadata_too_large",
                by_id,
                Step::PostWithoutMetadata,
            ),
            (
                PostMessage,
                Channel,
                "invalid_metadata_format",
                Tried {
                    without_metadata: true,
                    ..by_id
                },
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "invalid_auth",
                by_id,
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "token_revoked",
                by_id,
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "account_inactive",
                by_id,
                unavailable(false),
            ),
            (
                PostMessage,
                Channel,
                "missing_scope",
                by_id,
                unavailable(false),
            ),
            (PostMessage, Channel, "http_503", by_id, unavailable(true)),
            (PostMessage, Channel, "timeout", by_id, unavailable(true)),
            (
                PostMessage,
                Channel,
                "internal_error",
                by_id,
                unavailable(true),
            ),
            (
                PostMessage,
                Channel,
                "fatal_error",
                by_id,
                unavailable(true),
            ),
            (
                PostMessage,
                Channel,
                "something_new",
                by_id,
                unavailable(false),
            ),
            // chat.postMessage to a person
            (
                PostMessage,
                Person,
                "channel_not_found",
                fresh,
                Step::EmailPerson,
            ),
            (
                PostMessage,
                Person,
                "user_not_found",
                fresh,
                Step::EmailPerson,
            ),
            (
                PostMessage,
                Person,
                "messages_tab_disabled",
                fresh,
                Step::EmailPerson,
            ),
            (
                PostMessage,
                Person,
                "cannot_dm_bot",
                fresh,
                Step::EmailPerson,
            ),
            (
                PostMessage,
                Person,
                "invalid_blocks",
                fresh,
                Step::PostPlainText,
            ),
            (PostMessage, Person, "http_503", fresh, unavailable(true)),
            (
                PostMessage,
                Person,
                "token_revoked",
                fresh,
                unavailable(false),
            ),
            // conversations.join
            (
                Join,
                Channel,
                "channel_not_found",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "is_archived",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "method_not_supported_for_channel_type",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "missing_scope",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "too_many_members",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "user_is_restricted",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (Join, Channel, "is_bot", by_id, Step::PostToDefaultChannel),
            (
                Join,
                Channel,
                "no_permission",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                Join,
                Channel,
                "access_denied",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (Join, Channel, "http_503", by_id, unavailable(true)),
            (Join, Channel, "internal_error", by_id, unavailable(true)),
            (Join, Channel, "invalid_auth", by_id, unavailable(false)),
            (Join, Channel, "account_inactive", by_id, unavailable(false)),
            (Join, Channel, "token_revoked", by_id, unavailable(false)),
            (
                Join,
                Channel,
                "two_factor_setup_required",
                by_id,
                unavailable(false),
            ),
            // chat.postMessage: Slack's "not a member of the conversation"
            (
                PostMessage,
                Channel,
                "no_permission",
                by_id,
                Step::JoinAndPost,
            ),
            (
                PostMessage,
                Channel,
                "no_permission",
                Tried {
                    joined: true,
                    ..by_id
                },
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Person,
                "no_permission",
                fresh,
                Step::EmailPerson,
            ),
            // chat.postMessage: "access to a resource specified in the
            // request is denied": not a membership, so no join.
            (
                PostMessage,
                Channel,
                "access_denied",
                by_id,
                Step::PostToDefaultChannel,
            ),
            (
                PostMessage,
                Channel,
                "access_denied",
                Tried {
                    at_default_channel: true,
                    ..by_id
                },
                unavailable(false),
            ),
            (
                PostMessage,
                Person,
                "access_denied",
                fresh,
                Step::EmailPerson,
            ),
            // conversations.list
            (List, Channel, "missing_scope", fresh, Step::PostByName),
            (List, Channel, "no_permission", fresh, Step::PostByName),
            (List, Channel, "invalid_types", fresh, Step::PostByName),
            (List, Channel, "missing_argument", fresh, Step::PostByName),
            (List, Channel, "accesslimited", fresh, Step::PostByName),
            (List, Channel, "http_503", fresh, unavailable(true)),
            // Expired again after listing from the first page: a failed
            // listing, not a refusal to remember.
            (List, Channel, "invalid_cursor", fresh, unavailable(false)),
            (List, Channel, "invalid_auth", fresh, unavailable(false)),
            (List, Channel, "token_revoked", fresh, unavailable(false)),
            // conversations.open / conversations.history (the lost-post check)
            (Open, Person, "missing_scope", fresh, Step::PostWithoutCheck),
            (
                Open,
                Person,
                "user_not_found",
                fresh,
                Step::PostWithoutCheck,
            ),
            (Open, Person, "http_503", fresh, Step::PostWithoutCheck),
            (
                History,
                Channel,
                "missing_scope",
                by_id,
                Step::PostWithoutCheck,
            ),
            (
                History,
                Channel,
                "not_in_channel",
                by_id,
                Step::PostWithoutCheck,
            ),
            (
                History,
                Channel,
                "channel_not_found",
                by_id,
                Step::PostWithoutCheck,
            ),
            (History, Channel, "http_503", by_id, Step::PostWithoutCheck),
            (History, Channel, "token_revoked", by_id, unavailable(false)),
            // users.lookupByEmail
            (
                LookupByEmail,
                Person,
                "users_not_found",
                fresh,
                Step::EmailPerson,
            ),
            (LookupByEmail, Person, "http_503", fresh, unavailable(true)),
            (
                LookupByEmail,
                Person,
                "missing_scope",
                fresh,
                unavailable(false),
            ),
            (
                LookupByEmail,
                Person,
                "invalid_auth",
                fresh,
                unavailable(false),
            ),
        ];
        for (method, kind, code, tried, want) in rows {
            let got = next_step(method, kind, &error(method, code), tried);
            assert_eq!(got, want, "{} {kind:?} {code} {tried:?}", method.name());
        }
    }

    #[test]
    fn a_429_on_any_method_waits_and_never_emails() {
        for method in ALL_METHODS {
            for kind in [TargetKind::Channel, TargetKind::Person] {
                assert_eq!(
                    next_step(
                        method,
                        kind,
                        &error(method, "ratelimited"),
                        Tried::default()
                    ),
                    Step::Wait(Duration::from_secs(7)),
                    "{}",
                    method.name()
                );
            }
        }
    }

    #[test]
    fn an_expired_token_on_any_method_is_refreshed_once() {
        for method in ALL_METHODS {
            let expired = error(method, "token_expired");
            assert_eq!(
                next_step(method, TargetKind::Channel, &expired, Tried::default()),
                Step::RefreshToken,
                "{}",
                method.name()
            );
            let after_refresh = Tried {
                refreshed_token: true,
                ..Tried::default()
            };
            assert_eq!(
                next_step(method, TargetKind::Channel, &expired, after_refresh),
                Step::SlackUnavailable { transient: true },
                "{}",
                method.name()
            );
        }
    }

    #[test]
    fn every_refused_reply_is_posted_once_more_without_its_thread() {
        for code in THREAD_REFUSED {
            for kind in [TargetKind::Channel, TargetKind::Person] {
                let refused = error(Method::PostMessage, code);
                assert_eq!(
                    next_step(Method::PostMessage, kind, &refused, Tried::default()),
                    Step::PostWithoutThread,
                    "{code}"
                );
                // A top-level post refused the same way is not a thread's doing.
                let without_thread = Tried {
                    without_thread: true,
                    ..Tried::default()
                };
                assert_ne!(
                    next_step(Method::PostMessage, kind, &refused, without_thread),
                    Step::PostWithoutThread,
                    "{code}"
                );
            }
        }
    }
}
