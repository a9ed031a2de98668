//! alert-router: turns escalation and issue events from RabbitMQ into Slack
//! messages (and fallback emails) that people act on.

pub mod event;
