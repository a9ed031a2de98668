//! alert-router: turns escalation and issue events from RabbitMQ into Slack
//! messages (and fallback emails) that people act on.
//!
//! Data flows one way; each stage returns a typed result and only the last one
//! talks back to the broker:
//!
//! ```text
//! consume → decode/validate → route → deliver (slack | email) → settle (ack | retry later | dead-letter)
//! ```
//!
//! | module | role |
//! |---|---|
//! | [`config`] | settings: defaults ← YAML file ← environment, validated once at start |
//! | [`event`] | the event model and its validation (a bad event is poison, never retried) |
//! | [`rules`] | the routing rules file, Alertmanager-style matchers, the pure router |
//! | [`broker`] | RabbitMQ: topology, publisher with confirms; [`broker::acks`] batched acks; [`broker::watch`] `connection.blocked` and errors; [`broker::dlq`] the dead-letter tools; [`broker::dlq_gauges`] the dead-letter queue's depth and age for `/metrics`, dated by [`broker::dlq_ledger`] |
//! | [`deliver`] | one event's delivery, top to bottom: resolve targets (channel names to ids, emails to users), claim and post each to Slack, email what Slack cannot take; [`deliver::policy`] the one decision "Slack answered X → next step"; [`deliver::idempotency`] claims with renewed leases and attempt markers; [`deliver::limit`] shared rate limits; [`deliver::schedule`] per-channel queues, most severe first; [`deliver::incident`] incidents (first message per destination, state) in Redis; [`deliver::slack`] the client, Block Kit, tokens, channel and user caches; [`deliver::email`] SMTP |
//! | [`escalation`] | escalation chains: due steps in a Redis sorted set, claimed under a lease by any replica, published as `escalation.escalated` events |
//! | [`trust`] | which workspaces and email domains an event may name (`forbidden_target`) |
//! | [`redact`] | recipient addresses as logs and dead-letter headers show them (`a***@example.com`) |
//! | [`reload`] | hot reload of the rules file on change or SIGHUP, keeping the last good rules |
//! | [`send_test`] | `alert-router send-test`: one test notification through the worker's delivery path, and where it landed |
//! | [`settle`] | a delivery's outcome → ack, delayed retry or dead-letter |
//! | [`install`] | the Slack OAuth install pages (`/slack/install`, `/slack/oauth/callback`): signed `state`, code exchange, the token record |
//! | [`preview`] | seeing it work without Slack: `alert-router preview` (Block Kit JSON and a Block Kit Builder link); [`preview::stand_in`] the in-process Slack stand-in of `run --dry-run`; [`preview::page`] its `/preview` page |
//! | [`interactions`] | the Slack interactivity endpoint (`/slack/interactions`): signed clicks on Acknowledge → the incident acknowledged once → `escalation.acknowledged` published with confirms |
//! | [`worker`] | the `run` loop: connect, consume, process concurrently, drain on stop |
//! | [`telemetry`] | logging, Prometheus metrics, one function per counted fact |

pub mod broker;
pub mod config;
pub mod deliver;
pub mod escalation;
pub mod event;
pub mod install;
pub mod interactions;
pub mod preview;
pub mod redact;
pub mod reload;
pub mod rules;
pub mod send_test;
pub mod settle;
pub mod telemetry;
pub mod trust;
pub mod worker;
