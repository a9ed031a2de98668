//! Slack: the Web API client, message rendering and workspace tokens.

pub mod channels;
pub mod client;
pub mod message;
pub mod tokens;
pub mod users;

pub use client::{Body, SlackClient, SlackError, SlackFailure, honoured_retry_after};
