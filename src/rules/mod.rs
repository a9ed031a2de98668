//! TEMPORARY stand-in for the rules engine being built on branch wt-rules (same public API).
use serde::Serialize;

use crate::event::{Event, Target};

#[derive(Debug, Clone, Serialize)]
pub struct Routing {
    pub targets: Vec<RoutedTarget>,
    pub matched_rules: Vec<String>,
    pub disposition: Disposition,
}
#[derive(Debug, Clone, Serialize)]
pub enum Disposition {
    Deliver,
    Silenced { rule: String },
    Dropped,
    DeadLetter,
}
#[derive(Debug, Clone, Serialize)]
pub struct RoutedTarget {
    pub target: Target,
    pub rule: Option<String>,
    pub fallback_emails: Vec<String>,
}
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}
impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct RulesErrors(pub Vec<Diagnostic>);
#[derive(Debug)]
pub struct Rules {
    channel: String,
}
pub struct Loaded {
    pub rules: Rules,
    pub warnings: Vec<Diagnostic>,
}
impl Rules {
    pub fn load(path: &std::path::Path) -> Result<Loaded, RulesErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RulesErrors(vec![Diagnostic {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                message: e.to_string(),
            }])
        })?;
        let channel = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("slack_channel:"))
            .map(|c| c.trim().trim_matches('"').to_string())
            .unwrap_or_default();
        Ok(Loaded {
            rules: Rules { channel },
            warnings: vec![],
        })
    }
    pub fn route(&self, event: &Event) -> Routing {
        let mut targets = vec![RoutedTarget {
            target: Target::SlackChannel(self.channel.clone()),
            rule: None,
            fallback_emails: vec![],
        }];
        targets.extend(event.own_targets().iter().map(|t| RoutedTarget {
            target: t.clone(),
            rule: None,
            fallback_emails: vec![],
        }));
        Routing {
            targets,
            matched_rules: vec![],
            disposition: Disposition::Deliver,
        }
    }
    pub fn rule_count(&self) -> usize {
        0
    }
    pub fn target_count(&self) -> usize {
        0
    }
    pub fn default_channel(&self) -> Option<&str> {
        Some(&self.channel)
    }
    pub fn default_emails(&self) -> &[String] {
        &[]
    }
}
