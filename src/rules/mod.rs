//! Routing rules: the YAML rules file, its validation with positioned
//! diagnostics, and the router that turns an event into targets.
//!
//! Load once with [`Rules::load`] (or [`Rules::from_yaml`]), share the result in
//! an `Arc`, and call [`Rules::route`] per event; [`Rules::explain`] backs
//! `alert-router rules test`.

mod file;
mod matcher;
mod router;

use std::fmt;

use serde::Serialize;

pub use file::EscalationStep;
pub use file::json_schema;
pub use matcher::{MatchOp, Matcher, MatcherError};
pub use router::{
    Disposition, EscalationChain, Explanation, RoutedTarget, Routing, RuleStep, Rules, Unmatched,
};

/// A compiled rules file together with the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    pub rules: Rules,
    pub warnings: Vec<Diagnostic>,
}

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The file is rejected.
    Error,
    /// The file loads, but probably does not do what its author meant.
    Warning,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warning => "warning",
        })
    }
}

/// One problem in a rules file, at a 1-based line and column (0 when the
/// problem is with the file as a whole, such as a read error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub level: Level,
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn error(file: &str, line: usize, column: usize, message: String) -> Self {
        Diagnostic {
            file: file.to_string(),
            line,
            column,
            level: Level::Error,
            message,
        }
    }

    pub(crate) fn warning(file: &str, line: usize, column: usize, message: String) -> Self {
        Diagnostic {
            level: Level::Warning,
            ..Diagnostic::error(file, line, column, message)
        }
    }
}

/// `rules.yaml:12:7: error: duplicate rule name ...`, the format editors and
/// CI annotations understand; without a position when there is none.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}: {}", self.file, self.level, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.level, self.message
            )
        }
    }
}

/// Every error found in a rules file (never only the first), in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RulesErrors(pub Vec<Diagnostic>);

impl fmt::Display for RulesErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}
