//! Step 1 of a delivery: each routed target to a destination and an identity.
//!
//! A Slack channel is known by its **id** from here on: `#payments` is
//! resolved (through the shared channel map) before anything is keyed by
//! channel, so idempotency records, rate-limit buckets, 429 pauses and
//! "is this the default channel" all agree whichever way a rule names it.
//! An email is turned into the Slack user it belongs to.

use serde_json::Value;
use tracing::warn;

use super::policy::{self, Method, Step, TargetKind, Tried};
use super::slack::channels::{Destination, Resolution, ResolveError};
use super::slack::tokens::WorkspaceToken;
use super::slack::users::Known;
use super::slack::{Body, SlackError, SlackFailure};
use super::{Deliverer, SlackUnavailable};
use crate::event::{Event, Target};
use crate::rules::RoutedTarget;

/// A target after lookups: what to do with it.
pub(super) struct Resolved<'a> {
    pub routed: &'a RoutedTarget,
    /// Identity for idempotency, e.g. `slack:T1:C0PAY`.
    pub key: String,
    /// Who it reaches, for de-duplication within the event (`#payments` and
    /// `C0PAY`, or a `slack_email` and a `slack_user`, can be the same).
    pub dedupe: String,
    pub action: Action,
}

pub(super) enum Action {
    /// Post with `chat.postMessage`.
    Slack(SlackDestination),
    /// Email these addresses; `reason` says why it is not Slack (None: routed to email).
    Email {
        addresses: Vec<String>,
        reason: Option<String>,
    },
    /// Cannot be sent now.
    Fail { detail: String, retryable: bool },
    /// Wait this long (a rate-limited lookup), then try the event again.
    Wait(std::time::Duration),
}

/// Where a Slack target's post goes.
#[derive(Debug, Clone)]
pub(super) struct SlackDestination {
    /// `channel` for `chat.postMessage`: a conversation id, a user id, or
    /// `#name` when the app may not list channels.
    pub channel: String,
    pub kind: TargetKind,
    /// The name the id was resolved from (`payments`), if any.
    pub name: Option<String>,
    /// No channel of that name exists for the bot: straight to the default channel.
    pub missing: bool,
    /// A direct message's user id, which stays its rate-limit key after
    /// the post lands in the `D…` conversation ([`SlackDestination::budget`]).
    pub person: Option<String>,
}

impl SlackDestination {
    /// The policy's view of what is known before the first post.
    pub fn tried(&self) -> Tried {
        let by_id = matches!(Destination::parse(&self.channel), Destination::ChannelId(_));
        Tried {
            have_channel_id: by_id,
            resolved_from_name: by_id && self.name.is_some(),
            ..Tried::default()
        }
    }

    /// The rate-limit key a post to `channel` spends. Slack counts a DM
    /// posted by user id and its replies posted to the `D…` id against one
    /// channel, so both spend the user's budget here too (and a 429 on
    /// either pauses both).
    pub fn budget<'a>(&'a self, channel: &'a str) -> &'a str {
        match &self.person {
            Some(user) if channel.starts_with('D') => user,
            _ => channel,
        }
    }
}

impl Deliverer {
    pub(super) async fn resolve<'a>(
        &self,
        event: &Event,
        routed: &'a RoutedTarget,
        token: &Result<WorkspaceToken, SlackUnavailable>,
    ) -> Resolved<'a> {
        let fallback = |reason: String| Action::Email {
            addresses: super::fallback::fallback_addresses(event, routed),
            reason: Some(reason),
        };
        // The same identity with or without a usable token, so a target that
        // was emailed during an outage is not posted again once Slack is back.
        let ws = self
            .tokens
            .workspace_for(event.workspace.as_deref())
            .unwrap_or("default");
        // Who the target turns out to be, when that differs from its key.
        let mut dedupe = None;
        let (key, action) = match &routed.target {
            Target::Email(address) => (
                format!("email:{}", address.to_lowercase()),
                Action::Email {
                    addresses: vec![address.clone()],
                    reason: None,
                },
            ),
            Target::Assignee => (
                "assignee:unresolved".to_string(),
                fallback("the event's assignee has no Slack user id or email".into()),
            ),
            Target::SlackUser(user) => {
                let key = format!("slack:{ws}:{user}");
                let action = match token {
                    Ok(_) => Action::Slack(SlackDestination {
                        channel: user.clone(),
                        kind: TargetKind::Person,
                        name: None,
                        missing: false,
                        person: Some(user.clone()),
                    }),
                    Err(unavailable) => fallback(unavailable.reason.clone()),
                };
                (key, action)
            }
            Target::SlackChannel(channel) => match Destination::parse(channel) {
                Destination::ChannelId(id) | Destination::User(id) => {
                    let person = matches!(Destination::parse(channel), Destination::User(_));
                    // A `D…` id is somebody's direct-message conversation:
                    // refused, it goes to email like any DM, never to the
                    // shared default channel, and it cannot be joined.
                    let direct_message = id.starts_with('D');
                    let action = match token {
                        Ok(_) => Action::Slack(SlackDestination {
                            channel: id.clone(),
                            kind: if person || direct_message {
                                TargetKind::Person
                            } else {
                                TargetKind::Channel
                            },
                            name: None,
                            missing: false,
                            person: person.then(|| id.clone()),
                        }),
                        Err(unavailable) => fallback(unavailable.reason.clone()),
                    };
                    (format!("slack:{ws}:{id}"), action)
                }
                Destination::Name(name) => self.resolve_name(ws, &name, token, &fallback).await,
            },
            // Keyed by the address on every path (lookup or not), so a person
            // emailed during an outage is not also messaged once Slack is back.
            Target::SlackEmail(address) => {
                let key = format!("slack:{ws}:email:{}", address.to_lowercase());
                let action = match token {
                    Err(unavailable) => fallback(unavailable.reason.clone()),
                    Ok(token) => match self.lookup_user_refreshing(token, address).await {
                        Ok(user) => {
                            dedupe = Some(format!("slack:{ws}:{user}"));
                            Action::Slack(SlackDestination {
                                person: Some(user.clone()),
                                channel: user,
                                kind: TargetKind::Person,
                                name: None,
                                missing: false,
                            })
                        }
                        Err(e) => {
                            let tried = Tried::default();
                            match policy::next_step(
                                Method::LookupByEmail,
                                TargetKind::Person,
                                &e,
                                tried,
                            ) {
                                Step::EmailPerson => Action::Email {
                                    addresses: vec![address.clone()],
                                    reason: Some(format!("no Slack user has the email {address}")),
                                },
                                Step::Wait(wait) => Action::Wait(wait),
                                _ => {
                                    if matches!(e.failure, SlackFailure::Workspace) {
                                        self.tokens.invalidate(&token.workspace);
                                    }
                                    fallback(format!("Slack is unavailable: {e}"))
                                }
                            }
                        }
                    },
                };
                (key, action)
            }
        };
        let action = match action {
            // Said with its reason (no token, say): that is what an operator fixes.
            Action::Email { addresses, reason } if addresses.is_empty() => Action::Fail {
                detail: format!(
                    "{}; there is no email address to fall back to; set `email` on the rule or `defaults.email`",
                    reason.as_deref().unwrap_or("Slack cannot take it")
                ),
                retryable: true,
            },
            other => other,
        };
        Resolved {
            routed,
            dedupe: dedupe.unwrap_or_else(|| key.clone()),
            key,
            action,
        }
    }

    /// A channel named `#name` (or a bare name): its id, so it shares its
    /// identity and budget with the same channel named by id.
    async fn resolve_name(
        &self,
        ws: &str,
        name: &str,
        token: &Result<WorkspaceToken, SlackUnavailable>,
        fallback: &(dyn Fn(String) -> Action + Sync),
    ) -> (String, Action) {
        let by_name = format!("slack:{ws}:#{name}");
        let token = match token {
            Ok(token) => token,
            Err(unavailable) => {
                // Keyed by the id Slack last gave, if any, so the record
                // matches the one a post would have made.
                let key = match self.channels.cached_id(ws, name).await {
                    Some(id) => format!("slack:{ws}:{id}"),
                    None => by_name,
                };
                return (key, fallback(unavailable.reason.clone()));
            }
        };
        let mut resolved = self.channels.resolve(token, name).await;
        if let Err(e) = &resolved
            && let ResolveError::Slack(slack) = e
            && slack.failure == SlackFailure::TokenExpired
        {
            // Refreshed once (one replica, one exchange), then asked again:
            // the answer must be the id, or keys would differ by form.
            resolved = match self.tokens.refresh(token).await {
                Ok(fresh) => self.channels.resolve(&fresh, name).await,
                Err(refresh) if let Some(wait) = refresh.rate_limited() => {
                    return (by_name, Action::Wait(wait));
                }
                // Slack unavailable, as for a post whose refresh fails: email.
                Err(refresh) => {
                    warn!(channel = name, error = %refresh, "cannot refresh the token to resolve a channel name");
                    return (
                        by_name,
                        fallback(format!("cannot resolve #{name}: {e}, and {refresh}")),
                    );
                }
            };
        }
        match resolved {
            Ok(Resolution::Id(id)) => (
                format!("slack:{ws}:{id}"),
                Action::Slack(SlackDestination {
                    channel: id,
                    kind: TargetKind::Channel,
                    name: Some(name.to_string()),
                    missing: false,
                    person: None,
                }),
            ),
            Ok(Resolution::ByName(name)) => (
                by_name,
                Action::Slack(SlackDestination {
                    channel: format!("#{name}"),
                    kind: TargetKind::Channel,
                    name: Some(name),
                    missing: false,
                    person: None,
                }),
            ),
            // No such channel (for the bot): the default channel, naming it.
            Ok(Resolution::NotFound) => (
                by_name,
                Action::Slack(SlackDestination {
                    channel: format!("#{name}"),
                    kind: TargetKind::Channel,
                    name: Some(name.to_string()),
                    missing: true,
                    person: None,
                }),
            ),
            // Without Redis there is no idempotency either: wait for it.
            Err(ResolveError::Redis(e)) => (
                by_name,
                Action::Fail {
                    detail: format!("cannot read the channel map from Redis: {e}"),
                    retryable: true,
                },
            ),
            Err(e) => {
                let e = e.into_slack_error();
                match policy::next_step(Method::List, TargetKind::Channel, &e, Tried::default()) {
                    Step::Wait(wait) => (by_name, Action::Wait(wait)),
                    Step::PostByName => {
                        // `missing_scope` is logged, with the scope to add, where it is cached.
                        if e.code != "missing_scope" {
                            warn!(channel = name, error = %e, "cannot list channels; posting by #name");
                        }
                        (
                            by_name,
                            Action::Slack(SlackDestination {
                                channel: format!("#{name}"),
                                kind: TargetKind::Channel,
                                name: Some(name.to_string()),
                                missing: false,
                                person: None,
                            }),
                        )
                    }
                    _ => {
                        warn!(channel = name, error = %e, "cannot resolve the channel name");
                        (by_name, fallback(format!("Slack is unavailable: {e}")))
                    }
                }
            }
        }
    }

    /// [`Deliverer::lookup_user`], refreshing an expired token once.
    async fn lookup_user_refreshing(
        &self,
        token: &WorkspaceToken,
        email: &str,
    ) -> Result<String, SlackError> {
        match self.lookup_user(token, email).await {
            Err(e) if e.failure == SlackFailure::TokenExpired => {
                match self.tokens.refresh(token).await {
                    Ok(fresh) => self.lookup_user(&fresh, email).await,
                    // Slack rate-limited the exchange: the lookup waits as
                    // for its own 429.
                    Err(refresh) if let Some(wait) = refresh.rate_limited() => {
                        Err(SlackError::new(
                            "oauth.v2.access",
                            "ratelimited",
                            SlackFailure::Transient {
                                retry_after: Some(wait),
                            },
                        ))
                    }
                    Err(refresh) => Err(SlackError::new(
                        "users.lookupByEmail",
                        e.code.clone(),
                        SlackFailure::Transient { retry_after: None },
                    )
                    .with_detail(format!("and {refresh}"))),
                }
            }
            other => other,
        }
    }

    /// The Slack user with this email: from the shared cache, else
    /// `users.lookupByEmail`. "No such user" is cached too, briefly.
    async fn lookup_user(&self, token: &WorkspaceToken, email: &str) -> Result<String, SlackError> {
        match self.users.get(&token.workspace, email).await {
            Some(Known::User(user)) => return Ok(user),
            Some(Known::NoUser) => {
                return Err(SlackError::new(
                    "users.lookupByEmail",
                    "users_not_found",
                    SlackFailure::Destination,
                )
                .with_detail("answered a few minutes ago; not asked again yet".into()));
            }
            None => {}
        }
        let reply = match self
            .call_within_tier(
                token,
                "users.lookupByEmail",
                &Body::Form(&[("email", email)]),
            )
            .await
        {
            Ok(reply) => reply,
            Err(e) if e.code == "users_not_found" => {
                self.users.put(&token.workspace, email, Known::NoUser).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let user = reply
            .pointer("/user/id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string);
        if let Some(user) = &user {
            self.users
                .put(&token.workspace, email, Known::User(user.clone()))
                .await;
        }
        user.ok_or_else(|| {
            SlackError::new(
                "users.lookupByEmail",
                "invalid_response",
                SlackFailure::Transient { retry_after: None },
            )
            .with_detail("no user.id in the reply".into())
        })
    }
}
