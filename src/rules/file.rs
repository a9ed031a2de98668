//! The rules file format: YAML read into a tree that remembers where every
//! node came from, then checked key by key so that every problem (not only
//! the first) is reported with its line and column.
//!
//! serde's derive stops at the first error and loses positions, hence the
//! hand-written checks over a generic tree.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::Diagnostic;
use super::matcher::Matcher;
use super::router::Unmatched;
use crate::event::Target;

/// The only file format version this build reads.
const VERSION: &str = "1";
const TOP_KEYS: &[&str] = &["version", "defaults", "unmatched", "rules"];
const DEFAULTS_KEYS: &[&str] = &["slack_channel", "email"];
const RULE_KEYS: &[&str] = &[
    "name", "matchers", "notify", "email", "continue", "escalate",
];
const STEP_KEYS: &[&str] = &["after", "notify"];
const TARGET_KINDS: &[&str] = &[
    "slack_channel",
    "slack_user",
    "slack_email",
    "assignee",
    "email",
];
const SEVERITIES: &[&str] = &["critical", "high", "medium", "low", "info"];
const UNMATCHED_VALUES: &[&str] = &["default", "drop", "dead-letter"];

/// A validated rules file, ready to compile into a router.
#[derive(Debug)]
pub(crate) struct FileSpec {
    pub default_channel: Option<String>,
    pub default_emails: Vec<String>,
    pub unmatched: Unmatched,
    pub rules: Vec<RuleSpec>,
}

/// A validated rule.
#[derive(Debug)]
pub(crate) struct RuleSpec {
    pub name: String,
    /// Each matcher with its text as written, for explanations.
    pub matchers: Vec<(String, Matcher)>,
    pub notify: Vec<Target>,
    pub email: Vec<String>,
    pub continue_: bool,
    /// Steps notified while the incident stays unacknowledged, in order.
    pub escalate: Vec<EscalationStep>,
}

/// One step of a rule's escalation chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EscalationStep {
    /// After the first notification, if still neither acknowledged nor resolved.
    #[serde(skip)]
    pub after: std::time::Duration,
    /// The duration as written (`15m`), for messages.
    #[serde(rename = "after")]
    pub after_text: String,
    pub notify: Vec<Target>,
}

/// Parses and validates a rules file. On success, also returns the warnings.
pub(crate) fn parse(
    source: &str,
    origin: &str,
) -> Result<(FileSpec, Vec<Diagnostic>), Vec<Diagnostic>> {
    let root = read_tree(source, origin).map_err(|d| vec![d])?;
    let mut checker = Checker {
        origin,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let spec = checker.file(&root);
    // Checks run key by key; report in file order, as editors and people read.
    checker.errors.sort_by_key(|d| (d.line, d.column));
    checker.warnings.sort_by_key(|d| (d.line, d.column));
    if checker.errors.is_empty() {
        Ok((spec, checker.warnings))
    } else {
        Err(checker.errors)
    }
}

// ---------------------------------------------------------------------------
// The positioned tree.

/// A YAML node with the 1-based position where it starts.
#[derive(Debug)]
struct Node {
    value: Value,
    line: usize,
    column: usize,
}

#[derive(Debug)]
enum Value {
    Null,
    Bool(bool),
    /// A number, kept as written (`1.50` stays `1.50` if used as a string).
    Number(String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// How the value is named in messages.
    fn describe(&self) -> &'static str {
        match self {
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// What serde-saphyr gives us: any YAML value, each child wrapped in `Spanned`.
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_none<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
                    items.push(item);
                }
                Ok(Raw::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<Spanned<Raw>, Spanned<Raw>>()? {
                    entries.push(entry);
                }
                Ok(Raw::Map(entries))
            }
        }
        deserializer.deserialize_any(RawVisitor)
    }
}

fn read_tree(source: &str, origin: &str) -> Result<Node, Diagnostic> {
    let options = serde_saphyr::options! {
        // YAML 1.2 booleans only: `continue: yes` and `name: no` are not booleans.
        strict_booleans: true,
        with_snippet: false,
    };
    match serde_saphyr::from_str_with_options::<Spanned<Raw>>(source, options) {
        Ok(raw) => Ok(to_node(raw, source)),
        Err(err) => {
            let (line, column) = err
                .location()
                .map(|l| (l.line() as usize, l.column() as usize))
                .unwrap_or((0, 0));
            Err(Diagnostic::error(
                origin,
                line,
                column,
                yaml_message(&err.to_string()),
            ))
        }
    }
}

/// serde-saphyr's message without its own position prefix and tuning hints.
fn yaml_message(text: &str) -> String {
    let mut msg = text.trim();
    msg = msg.strip_prefix("error: ").unwrap_or(msg);
    if let Some(rest) = msg.strip_prefix("line ")
        && let Some(pos) = rest.find(": ")
        && rest[..pos].contains(" column ")
    {
        msg = &rest[pos + 2..];
    }
    // Our diagnostic carries the position already.
    if let Some(pos) = msg.rfind(" at line ")
        && msg[pos..].contains(", column ")
    {
        msg = &msg[..pos];
    }
    let msg = msg
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
        .replace('\n', " ");
    format!("invalid YAML: {msg}")
}

fn to_node(raw: Spanned<Raw>, source: &str) -> Node {
    let loc = raw.referenced;
    let value = match raw.value {
        Raw::Null => Value::Null,
        Raw::Bool(b) => Value::Bool(b),
        Raw::Int(i) => Value::Number(source_text(&loc, source).unwrap_or_else(|| i.to_string())),
        Raw::Float(f) => Value::Number(source_text(&loc, source).unwrap_or_else(|| f.to_string())),
        Raw::Str(s) => Value::Str(s),
        Raw::Seq(items) => Value::Seq(items.into_iter().map(|i| to_node(i, source)).collect()),
        Raw::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (to_node(k, source), to_node(v, source)))
                .collect(),
        ),
    };
    Node {
        value,
        line: loc.line() as usize,
        column: loc.column() as usize,
    }
}

/// The scalar as written in the source, when the span is known.
fn source_text(loc: &serde_saphyr::Location, source: &str) -> Option<String> {
    let span = loc.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    source
        .get(start..start.checked_add(len)?)
        .map(|s| s.trim().to_string())
}

// ---------------------------------------------------------------------------
// Validation.

struct Checker<'a> {
    origin: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// The known keys of a mapping, after unknown ones were reported.
struct Fields<'n> {
    at: &'n Node,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, node)| *node)
    }
}

impl Checker<'_> {
    fn error(&mut self, node: &Node, message: String) {
        self.errors.push(Diagnostic::error(
            self.origin,
            node.line,
            node.column,
            message,
        ));
    }

    fn warn(&mut self, node: &Node, message: String) {
        self.warnings.push(Diagnostic::warning(
            self.origin,
            node.line,
            node.column,
            message,
        ));
    }

    /// Checks that `node` is a mapping whose keys are all in `allowed`.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node,
                format!("{what} must be a mapping, found {}", node.value.describe()),
            );
            return None;
        };
        let mut known = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let name = match &key.value {
                Value::Str(s) => s.as_str(),
                Value::Number(s) => s.as_str(),
                other => {
                    self.error(
                        key,
                        format!(
                            "keys in {what} must be names, found {}; allowed keys: {}",
                            other.describe(),
                            allowed.join(", ")
                        ),
                    );
                    continue;
                }
            };
            if allowed.contains(&name) {
                known.push((name, value));
            } else {
                self.error(
                    key,
                    format!(
                        "unknown key `{name}` in {what}; allowed keys: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(Fields {
            at: node,
            entries: known,
        })
    }

    fn required<'n>(&mut self, fields: &Fields<'n>, key: &str, what: &str) -> Option<&'n Node> {
        let node = fields.get(key);
        if node.is_none() {
            self.error(fields.at, format!("{what} is missing required key `{key}`"));
        }
        node
    }

    /// A non-empty string. Plain numbers are taken as written (`name: 500`).
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = match &node.value {
            Value::Str(s) | Value::Number(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Null => String::new(),
            other => {
                self.error(
                    node,
                    format!("{what} must be a string, found {}", other.describe()),
                );
                return None;
            }
        };
        if text.trim().is_empty() {
            self.error(node, format!("{what} is empty"));
            return None;
        }
        Some(text)
    }

    fn email_address(&mut self, node: &Node, what: &str) -> Option<String> {
        let address = self.string(node, what)?;
        if !looks_like_email(&address) {
            self.error(node, format!("{what} `{address}` is not an email address"));
            return None;
        }
        Some(address)
    }

    fn list<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            other => {
                self.error(
                    node,
                    format!("{what} must be a list, found {}", other.describe()),
                );
                &[]
            }
        }
    }

    fn email_list(&mut self, node: &Node, what: &str) -> Vec<String> {
        let mut addresses = Vec::new();
        for item in self.list(node, what) {
            let Some(address) = self.string(item, &format!("an entry of {what}")) else {
                continue;
            };
            if looks_like_email(&address) {
                addresses.push(address);
            } else {
                self.error(
                    item,
                    format!("`{address}` in {what} is not an email address"),
                );
            }
        }
        addresses
    }

    fn file(&mut self, root: &Node) -> FileSpec {
        let mut spec = FileSpec {
            default_channel: None,
            default_emails: Vec::new(),
            unmatched: Unmatched::Default,
            rules: Vec::new(),
        };
        if matches!(root.value, Value::Null) {
            self.error(
                root,
                "the rules file is empty; it needs at least `version: 1` and `rules:`".into(),
            );
            return spec;
        }
        let Some(top) = self.fields(root, "the rules file", TOP_KEYS) else {
            return spec;
        };

        if let Some(version) = self.required(&top, "version", "the rules file") {
            match &version.value {
                Value::Number(v) if v == VERSION => {}
                Value::Number(v) => self.error(
                    version,
                    format!("unsupported `version: {v}`; this alert-router reads version 1"),
                ),
                Value::Str(v) => self.error(
                    version,
                    format!("`version` must be the number 1, found the string `{v}`"),
                ),
                other => self.error(
                    version,
                    format!("`version` must be the number 1, found {}", other.describe()),
                ),
            }
        }

        if let Some(defaults) = top.get("defaults")
            && let Some(fields) = self.fields(defaults, "`defaults`", DEFAULTS_KEYS)
        {
            if let Some(channel) = fields.get("slack_channel") {
                spec.default_channel = self.string(channel, "`defaults.slack_channel`");
            }
            if let Some(email) = fields.get("email") {
                spec.default_emails = self.email_list(email, "`defaults.email`");
            }
        }

        if let Some(unmatched) = top.get("unmatched") {
            spec.unmatched = self.unmatched(unmatched);
        }

        if let Some(rules) = self.required(&top, "rules", "the rules file") {
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut catch_all: Option<(String, usize)> = None;
            for rule_node in self.list(rules, "`rules`") {
                let Some(rule) = self.rule(rule_node, &mut seen) else {
                    continue;
                };
                if let Some((earlier, line)) = &catch_all {
                    self.warn(
                        rule_node,
                        format!(
                            "rule `{}` can never match: the earlier rule `{earlier}` (line {line}) matches every event and has no `continue: true`",
                            rule.name
                        ),
                    );
                } else if !rule.continue_ && rule.matchers.iter().all(|(_, m)| m.matches_anything())
                {
                    catch_all = Some((rule.name.clone(), rule_node.line));
                }
                spec.rules.push(rule);
            }
        }
        spec
    }

    fn unmatched(&mut self, node: &Node) -> Unmatched {
        let value = match &node.value {
            Value::Str(s) => s.as_str(),
            _ => "",
        };
        match value {
            "default" => Unmatched::Default,
            "drop" => Unmatched::Drop,
            "dead-letter" => Unmatched::DeadLetter,
            _ => {
                let shown = match &node.value {
                    Value::Str(s) | Value::Number(s) => format!("`{s}`"),
                    other => other.describe().to_string(),
                };
                self.error(
                    node,
                    format!(
                        "`unmatched` must be one of {}, found {shown}",
                        UNMATCHED_VALUES.join(", ")
                    ),
                );
                Unmatched::Default
            }
        }
    }

    /// One rule; `None` when it is too broken to take part in later checks.
    fn rule(&mut self, node: &Node, seen: &mut HashMap<String, usize>) -> Option<RuleSpec> {
        let fields = self.fields(node, "a rule", RULE_KEYS)?;
        let errors_before = self.errors.len();

        let name_node = self.required(&fields, "name", "a rule");
        let name = name_node.and_then(|n| self.string(n, "the rule `name`"));
        if let (Some(name), Some(name_node)) = (&name, name_node) {
            if let Some(first) = seen.get(name) {
                self.error(
                    name_node,
                    format!("duplicate rule name `{name}` (first defined at line {first})"),
                );
            } else {
                seen.insert(name.clone(), name_node.line);
            }
        }
        let label = match &name {
            Some(name) => format!("rule `{name}`"),
            None => "a rule".to_string(),
        };

        let mut matchers = Vec::new();
        if let Some(list) = fields.get("matchers") {
            for item in self.list(list, &format!("`matchers` of {label}")) {
                let text = match &item.value {
                    Value::Str(s) => s.clone(),
                    Value::Null => String::new(),
                    // `- team: payments` is a YAML mapping, not a matcher.
                    Value::Map(entries) if entries.len() == 1 => {
                        let (key, value) = &entries[0];
                        let (Value::Str(k), Value::Str(v) | Value::Number(v)) =
                            (&key.value, &value.value)
                        else {
                            self.error(item, "a matcher must be a string, found a mapping".into());
                            continue;
                        };
                        self.error(
                            item,
                            format!(
                                "a matcher must be a string, found a mapping (`: ` makes YAML read `{k}: {v}` as key and value); write `{k}=\"{v}\"`, or quote the whole matcher"
                            ),
                        );
                        continue;
                    }
                    other => {
                        self.error(
                            item,
                            format!("a matcher must be a string, found {}", other.describe()),
                        );
                        continue;
                    }
                };
                // One item is one line of Alertmanager's `matchers:`, which may
                // hold several comma-separated matchers (or none, for `{}`).
                match Matcher::parse_list(&text) {
                    Ok(list) => {
                        let several = list.len() > 1;
                        for m in list {
                            let shown = if several { m.to_string() } else { text.clone() };
                            self.check_severity(item, &shown, &m);
                            matchers.push((shown, m));
                        }
                    }
                    Err(e) => self.error(item, format!("invalid matcher `{text}`: {e}")),
                }
            }
        }

        let mut notify = Vec::new();
        if fields.get("notify").is_none() {
            self.error(
                fields.at,
                format!(
                    "{label} is missing required key `notify` (write `notify: []` to silence what it matches)"
                ),
            );
        }
        if let Some(list) = fields.get("notify") {
            for item in self.list(list, &format!("`notify` of {label}")) {
                if let Some(target) = self.target(item) {
                    notify.push(target);
                }
            }
        }

        let email = match fields.get("email") {
            Some(list) => self.email_list(list, &format!("`email` of {label}")),
            None => Vec::new(),
        };

        let continue_ = match fields.get("continue") {
            None => false,
            Some(node) => match node.value {
                Value::Bool(b) => b,
                ref other => {
                    let shown = match other {
                        Value::Str(s) | Value::Number(s) => format!("`{s}`"),
                        other => other.describe().to_string(),
                    };
                    self.error(
                        node,
                        format!("`continue` must be true or false, found {shown}"),
                    );
                    false
                }
            },
        };

        let escalate = match fields.get("escalate") {
            Some(list) => self.escalate(list, &label),
            None => Vec::new(),
        };

        if self.errors.len() > errors_before {
            return None;
        }
        Some(RuleSpec {
            name: name?,
            matchers,
            notify,
            email,
            continue_,
            escalate,
        })
    }

    /// `escalate: [{after: 15m, notify: [...]}, ...]`: positive, increasing
    /// durations, each step with somebody to notify.
    fn escalate(&mut self, list: &Node, label: &str) -> Vec<EscalationStep> {
        let mut steps: Vec<EscalationStep> = Vec::new();
        for (i, item) in self
            .list(list, &format!("`escalate` of {label}"))
            .iter()
            .enumerate()
        {
            let what = format!("step {} of `escalate` of {label}", i + 1);
            let Some(fields) = self.fields(item, &what, STEP_KEYS) else {
                continue;
            };
            let after = self.required(&fields, "after", &what).and_then(|node| {
                let text = match &node.value {
                    Value::Str(s) | Value::Number(s) => s.clone(),
                    other => {
                        self.error(
                            node,
                            format!(
                                "`after` of {what} must be a duration such as `15m`, found {}",
                                other.describe()
                            ),
                        );
                        return None;
                    }
                };
                match humantime::parse_duration(text.trim()) {
                    Ok(after) if after.is_zero() => {
                        self.error(node, format!("`after` of {what} must be longer than 0"));
                        None
                    }
                    Ok(after) => {
                        if let Some(previous) = steps.last()
                            && after <= previous.after
                        {
                            self.error(
                                node,
                                format!(
                                    "`after` of {what} ({text}) must be later than the step before it ({})",
                                    previous.after_text
                                ),
                            );
                            return None;
                        }
                        Some((after, text))
                    }
                    Err(e) => {
                        self.error(
                            node,
                            format!(
                                "`after` of {what} is not a duration (`{text}`: {e}); write e.g. `15m`, `1h 30m`"
                            ),
                        );
                        None
                    }
                }
            });
            let mut notify = Vec::new();
            if let Some(targets) = self.required(&fields, "notify", &what) {
                let items = self.list(targets, &format!("`notify` of {what}"));
                if items.is_empty() {
                    self.error(
                        targets,
                        format!("`notify` of {what} is empty: a step must notify someone"),
                    );
                }
                for target in items {
                    if let Some(target) = self.target(target) {
                        notify.push(target);
                    }
                }
            }
            if let Some((after, after_text)) = after
                && !notify.is_empty()
            {
                steps.push(EscalationStep {
                    after,
                    after_text,
                    notify,
                });
            }
        }
        steps
    }

    /// Every event has one of five severities: a severity matcher that accepts
    /// none of them (`severity="urgent"`) silently disables its rule.
    fn check_severity(&mut self, node: &Node, text: &str, matcher: &Matcher) {
        if matcher.name() == "severity" && !SEVERITIES.iter().any(|s| matcher.matches_value(s)) {
            self.warn(
                node,
                format!(
                    "matcher `{text}` can never match: severity is one of {}",
                    SEVERITIES.join(", ")
                ),
            );
        }
    }

    /// `- assignee` or a one-key mapping such as `- slack_channel: C0PAY`.
    fn target(&mut self, node: &Node) -> Option<Target> {
        let allowed = TARGET_KINDS.join(", ");
        match &node.value {
            Value::Str(s) if s == "assignee" => Some(Target::Assignee),
            Value::Str(s) => {
                self.error(
                    node,
                    format!(
                        "target `{s}` has no kind: write it as `kind: value`, e.g. `slack_channel: {s}`; allowed kinds: {allowed}"
                    ),
                );
                None
            }
            Value::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                let kind = match &key.value {
                    Value::Str(s) => s.as_str(),
                    _ => "",
                };
                match kind {
                    // `- assignee:` (a key with no value) is the bare word, too.
                    "assignee" if matches!(value.value, Value::Null) => Some(Target::Assignee),
                    "assignee" => {
                        self.error(
                            value,
                            "the `assignee` target takes no value: write `- assignee`".into(),
                        );
                        None
                    }
                    "slack_channel" => self
                        .string(value, "the `slack_channel` target")
                        .map(Target::SlackChannel),
                    "slack_user" => {
                        let user = self.string(value, "the `slack_user` target")?;
                        if !crate::event::is_slack_user_id(&user) {
                            self.error(
                                value,
                                format!(
                                    "the `slack_user` target {}",
                                    crate::event::not_a_user_id(&user)
                                ),
                            );
                            return None;
                        }
                        Some(Target::SlackUser(user))
                    }
                    "slack_email" => self
                        .email_address(value, "the `slack_email` target")
                        .map(Target::SlackEmail),
                    "email" => self
                        .email_address(value, "the `email` target")
                        .map(Target::Email),
                    _ => {
                        let shown = match &key.value {
                            Value::Str(s) | Value::Number(s) => s.clone(),
                            other => other.describe().to_string(),
                        };
                        self.error(
                            key,
                            format!("unknown target kind `{shown}`; allowed kinds: {allowed}"),
                        );
                        None
                    }
                }
            }
            Value::Map(entries) => {
                self.error(
                    node,
                    format!(
                        "a target has exactly one key, found {}; put each target in its own list item",
                        entries.len()
                    ),
                );
                None
            }
            other => {
                self.error(
                    node,
                    format!(
                        "a target must be `assignee` or `kind: value`, found {}; allowed kinds: {allowed}",
                        other.describe()
                    ),
                );
                None
            }
        }
    }
}

/// Deliberately loose: catches typos like a Slack id in an email field, not RFC 5322.
fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// JSON Schema (draft 2020-12) of the rules file, for editor completion and
/// validation (e.g. the YAML language server's `# yaml-language-server: $schema=`).
pub fn json_schema() -> serde_json::Value {
    let email = serde_json::json!({"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"});
    let non_empty = serde_json::json!({"type": "string", "minLength": 1, "pattern": "\\S"});
    let user_id = serde_json::json!({"type": "string", "pattern": "^[UW][A-Z0-9]+$"});
    let one = |key: &str, value: &serde_json::Value| {
        serde_json::json!({
            "type": "object",
            "properties": {key: value},
            "required": [key],
            "additionalProperties": false
        })
    };
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://alert-router.invalid/schemas/rules.schema.json",
        "title": "alert-router routing rules",
        "type": "object",
        "required": ["version", "rules"],
        "additionalProperties": false,
        "properties": {
            "version": {"const": 1, "description": "File format version; only 1 exists."},
            "defaults": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "slack_channel": {
                        "description": "Default escalation channel (id or #name).",
                        "type": "string", "minLength": 1, "pattern": "\\S"
                    },
                    "email": {
                        "description": "Fallback recipients when a target has no address of its own.",
                        "type": "array", "items": email
                    }
                }
            },
            "unmatched": {
                "description": "What happens to events no rule matches and that name no targets.",
                "enum": UNMATCHED_VALUES,
                "default": "default"
            },
            "rules": {
                "type": "array",
                "items": {"$ref": "#/$defs/rule"}
            }
        },
        "$defs": {
            "rule": {
                "type": "object",
                "required": ["name", "notify"],
                "additionalProperties": false,
                "properties": {
                    "name": {"description": "Unique rule name.", "type": "string", "minLength": 1, "pattern": "\\S"},
                    "matchers": {
                        "description": "Alertmanager matchers (`label=value`, `!=`, `=~`, `!~`); all must hold.",
                        "type": "array",
                        "items": {"type": "string", "pattern": "^\\s*[a-zA-Z_:][a-zA-Z0-9_:]*\\s*(=~|=|!=|!~)"}
                    },
                    "notify": {
                        "description": "Targets; an empty list silences what the rule matches.",
                        "type": "array",
                        "items": {"$ref": "#/$defs/target"}
                    },
                    "email": {"description": "This rule's fallback recipients.", "type": "array", "items": email},
                    "continue": {"description": "Let later rules match too.", "type": "boolean", "default": false},
                    "escalate": {
                        "description": "Escalation chain: each step notifies its targets when the incident is still neither acknowledged nor resolved `after` its first notification.",
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["after", "notify"],
                            "additionalProperties": false,
                            "properties": {
                                "after": {"description": "A duration such as `15m`; later than the step before.", "type": "string"},
                                "notify": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/target"}}
                            }
                        }
                    }
                }
            },
            "target": {
                "oneOf": [
                    {"const": "assignee", "description": "DM the event's assignee."},
                    one("slack_channel", &non_empty),
                    one("slack_user", &user_id),
                    one("slack_email", &email),
                    one("email", &email)
                ]
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Level, Rules};
    use super::*;

    /// Every diagnostic of a file that fails, as `line:col: message`.
    fn errors(yaml: &str) -> Vec<String> {
        match Rules::from_yaml(yaml, "rules.yaml") {
            Ok(_) => panic!("expected errors, the file loaded"),
            Err(e) => {
                e.0.iter()
                    .map(|d| {
                        assert_eq!(d.level, Level::Error);
                        format!("{}:{}: {}", d.line, d.column, d.message)
                    })
                    .collect()
            }
        }
    }

    fn warnings(yaml: &str) -> Vec<String> {
        match Rules::from_yaml(yaml, "rules.yaml") {
            Ok(loaded) => loaded
                .warnings
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_yaml_syntax_error_is_reported_at_its_position() {
        let yaml = "version: 1\nrules:\n  - name: a\n    matchers: [\"team=x\"\n  - name: b\n";
        let found = errors(yaml);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found,
            ["5:3: invalid YAML: \"-\" is only valid inside a block"]
        );
    }

    #[test]
    fn a_duplicate_yaml_key_is_a_syntax_error_without_library_advice() {
        assert_eq!(
            errors("version: 1\nversion: 1\nrules: []\n"),
            ["2:1: invalid YAML: duplicate mapping key: version"]
        );
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let yaml = "\
version: 1
defualts: {}
defaults:
  slack_chanel: '#x'
rules:
  - name: a
    notify: []
    contineu: true
";
        assert_eq!(
            errors(yaml),
            [
                "2:1: unknown key `defualts` in the rules file; allowed keys: version, defaults, unmatched, rules",
                "4:3: unknown key `slack_chanel` in `defaults`; allowed keys: slack_channel, email",
                "8:5: unknown key `contineu` in a rule; allowed keys: name, matchers, notify, email, continue, escalate",
            ]
        );
    }

    #[test]
    fn a_slack_user_must_be_a_user_id_so_a_direct_message_never_lands_in_a_channel() {
        let yaml = "\
version: 1
rules:
  - name: a
    notify:
      - slack_user: C0PAYMENTS
      - slack_user: '#oncall'
      - slack_user: u0lead
      - slack_user: U0LEAD
      - slack_user: W0GRID
";
        let user_id = "must be a Slack user id (U… or W…)";
        let tail = "a channel goes in `slack_channel`, an address in `slack_email`";
        assert_eq!(
            errors(yaml),
            [
                format!("5:21: the `slack_user` target {user_id}, not `C0PAYMENTS`; {tail}"),
                format!("6:21: the `slack_user` target {user_id}, not `#oncall`; {tail}"),
                format!("7:21: the `slack_user` target {user_id}, not `u0lead`; {tail}"),
            ]
        );
    }

    #[test]
    fn escalation_steps_need_positive_increasing_durations_and_someone_to_notify() {
        let yaml = "\
version: 1
rules:
  - name: a
    notify: []
    escalate:
      - after: 15m
        notify: [{slack_user: U0HEAD}]
      - after: 10m
        notify: [{slack_channel: '#ic'}]
      - after: 0s
        notify: [{slack_user: U0VP}]
      - after: soon
        notify: [{slack_user: U0VP}]
      - after: 1h
        notify: []
      - after: 2h
        notfy: [{slack_user: U0VP}]
";
        assert_eq!(
            errors(yaml),
            [
                "8:16: `after` of step 2 of `escalate` of rule `a` (10m) must be later than the step before it (15m)",
                "10:16: `after` of step 3 of `escalate` of rule `a` must be longer than 0",
                "12:16: `after` of step 4 of `escalate` of rule `a` is not a duration (`soon`: expected number at 0); write e.g. `15m`, `1h 30m`",
                "15:17: `notify` of step 5 of `escalate` of rule `a` is empty: a step must notify someone",
                "16:9: step 6 of `escalate` of rule `a` is missing required key `notify`",
                "17:9: unknown key `notfy` in step 6 of `escalate` of rule `a`; allowed keys: after, notify",
            ]
        );
    }

    #[test]
    fn a_rule_s_escalation_chain_is_kept_in_order() {
        let loaded = Rules::from_yaml(
            "version: 1\nrules:\n  - name: a\n    notify: []\n    escalate:\n      - after: 15m\n        notify: [{slack_user: U0HEAD}]\n      - after: 1h 30m\n        notify: [assignee]\n",
            "rules.yaml",
        )
        .unwrap();
        let first = loaded.rules.escalation_step("a", 0).unwrap();
        assert_eq!(first.after, std::time::Duration::from_secs(15 * 60));
        assert_eq!(first.notify, [Target::SlackUser("U0HEAD".into())]);
        let second = loaded.rules.escalation_step("a", 1).unwrap();
        assert_eq!(second.after, std::time::Duration::from_secs(90 * 60));
        assert_eq!(second.after_text, "1h 30m");
        assert!(loaded.rules.escalation_step("a", 2).is_none());
    }

    #[test]
    fn a_duplicate_rule_name_points_at_the_second_and_names_the_first() {
        let yaml = "\
version: 1
rules:
  - name: payments
    notify: []
  - name: web
    notify: []
  - name: payments
    notify: []
";
        assert_eq!(
            errors(yaml),
            ["7:11: duplicate rule name `payments` (first defined at line 3)"]
        );
        let d = &Rules::from_yaml(yaml, "rules.yaml").unwrap_err().0[0];
        assert_eq!(
            d.to_string(),
            "rules.yaml:7:11: error: duplicate rule name `payments` (first defined at line 3)"
        );
    }

    #[test]
    fn empty_targets_and_unknown_kinds_are_errors() {
        let yaml = "\
version: 1
rules:
  - name: a
    notify:
      - slack_channel: ''
      - slack_user:
      - pager: P123
      - C0PAY
      - {slack_channel: C1, email: a@example.com}
      - email: not-an-address
";
        assert_eq!(
            errors(yaml),
            [
                "5:24: the `slack_channel` target is empty",
                "6:19: the `slack_user` target is empty",
                "7:9: unknown target kind `pager`; allowed kinds: slack_channel, slack_user, slack_email, assignee, email",
                "8:9: target `C0PAY` has no kind: write it as `kind: value`, e.g. `slack_channel: C0PAY`; allowed kinds: slack_channel, slack_user, slack_email, assignee, email",
                "9:9: a target has exactly one key, found 2; put each target in its own list item",
                "10:16: the `email` target `not-an-address` is not an email address",
            ]
        );
    }

    #[test]
    fn bad_matchers_and_bad_regexes_are_reported_at_the_matcher() {
        let yaml = r#"version: 1
rules:
  - name: a
    matchers:
      - team="payments"
      - team payments
      - 'type=~"escalation\.(.*"'
      - job="value
    notify: []
"#;
        assert_eq!(
            errors(yaml),
            [
                "6:9: invalid matcher `team payments`: expected `=`, `!=`, `=~` or `!~` after `team`, found `payments`",
                "7:9: invalid matcher `type=~\"escalation\\.(.*\"`: invalid regex `escalation\\.(.*`: unclosed group",
                "8:9: invalid matcher `job=\"value`: the value `\"value` contains an unescaped double quote (write `\\\"` for a literal quote)",
            ]
        );
    }

    #[test]
    fn a_matcher_that_yaml_read_as_a_mapping_gets_a_hint() {
        let yaml = "version: 1\nrules:\n  - name: a\n    matchers:\n      - team: payments\n    notify: []\n";
        assert_eq!(
            errors(yaml),
            [
                "5:9: a matcher must be a string, found a mapping (`: ` makes YAML read `team: payments` as key and value); write `team=\"payments\"`, or quote the whole matcher"
            ]
        );
    }

    #[test]
    fn missing_required_keys_and_wrong_types_are_errors() {
        let yaml = "\
rules:
  - matchers: [team=a]
  - name: b
    notify: {slack_channel: C1}
    continue: yes
unmatched: ignore
";
        assert_eq!(
            errors(yaml),
            [
                "1:1: the rules file is missing required key `version`",
                "2:5: a rule is missing required key `name`",
                "2:5: a rule is missing required key `notify` (write `notify: []` to silence what it matches)",
                "4:13: `notify` of rule `b` must be a list, found a mapping",
                "5:15: `continue` must be true or false, found `yes`",
                "6:12: `unmatched` must be one of default, drop, dead-letter, found `ignore`",
            ]
        );
    }

    #[test]
    fn only_version_1_is_read() {
        assert_eq!(
            errors("version: 2\nrules: []\n"),
            ["1:10: unsupported `version: 2`; this alert-router reads version 1"]
        );
        assert_eq!(
            errors("version: '1'\nrules: []\n"),
            ["1:10: `version` must be the number 1, found the string `1`"]
        );
        assert_eq!(
            errors(""),
            ["1:1: the rules file is empty; it needs at least `version: 1` and `rules:`"]
        );
    }

    #[test]
    fn every_error_in_a_file_is_reported_not_only_the_first() {
        let yaml = "\
version: 1
defaults:
  email: [oncall]
rules:
  - name: a
    matchers: ['severity=~\"(\"']
    notify: [{slack_channel: ''}]
  - name: a
    notify: []
    extra: 1
";
        assert_eq!(
            errors(yaml),
            [
                "3:11: `oncall` in `defaults.email` is not an email address",
                "6:16: invalid matcher `severity=~\"(\"`: invalid regex `(`: unclosed group",
                "7:30: the `slack_channel` target is empty",
                "8:11: duplicate rule name `a` (first defined at line 5)",
                "10:5: unknown key `extra` in a rule; allowed keys: name, matchers, notify, email, continue, escalate",
            ]
        );
        let shown = Rules::from_yaml(yaml, "rules.yaml")
            .unwrap_err()
            .to_string();
        let lines: Vec<_> = shown.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(
            lines[0],
            "rules.yaml:3:11: error: `oncall` in `defaults.email` is not an email address"
        );
    }

    #[test]
    fn a_rule_behind_a_catch_all_rule_is_a_warning() {
        let yaml = r#"version: 1
rules:
  - name: audit-everything
    notify: [{slack_channel: C0AUDIT}]
    continue: true
  - name: catch-all
    matchers: ['severity=~".*"']
    notify: [{slack_channel: C0ALL}]
  - name: payments
    matchers: [team=payments]
    notify: [{slack_channel: C0PAY}]
"#;
        assert_eq!(
            warnings(yaml),
            [
                "9:5: rule `payments` can never match: the earlier rule `catch-all` (line 6) matches every event and has no `continue: true`"
            ]
        );
    }

    #[test]
    fn a_severity_matcher_that_accepts_no_severity_is_a_warning() {
        let yaml = "\
version: 1
rules:
  - name: urgent
    matchers: [severity=urgent, 'severity=~\"crit.*|high\"']
    notify: []
";
        assert_eq!(
            warnings(yaml),
            [
                "4:16: matcher `severity=urgent` can never match: severity is one of critical, high, medium, low, info"
            ]
        );
    }

    #[test]
    fn a_matchers_item_is_a_line_of_alertmanager_matchers() {
        // `a, b` is two matchers, as in Alertmanager's `matchers:`, not a value `a, b`.
        let yaml = "\
version: 1
rules:
  - name: payments
    matchers: ['{team=payments, severity=urgent}']
    notify: []
";
        assert_eq!(
            warnings(yaml),
            [
                "4:16: matcher `severity=\"urgent\"` can never match: severity is one of critical, high, medium, low, info"
            ]
        );
        let loaded = Rules::from_yaml(
            "version: 1\nrules:\n  - name: p\n    matchers: ['team=payments,severity=high']\n    notify: [{slack_channel: C1}]\n",
            "r",
        )
        .unwrap();
        let event = |team: &str| {
            serde_json::from_value(serde_json::json!({
                "id": "a", "type": "t", "severity": "high", "title": "x", "labels": {"team": team}
            }))
            .unwrap()
        };
        assert_eq!(loaded.rules.route(&event("payments")).targets.len(), 1);
        assert!(loaded.rules.route(&event("ops")).targets.is_empty());
    }

    #[test]
    fn plain_numbers_are_accepted_where_strings_are_expected() {
        let loaded = Rules::from_yaml(
            "version: 1\nrules:\n  - name: 500\n    notify: [{slack_channel: 0012}]\n",
            "r",
        )
        .unwrap();
        assert_eq!(loaded.rules.rule_names().collect::<Vec<_>>(), ["500"]);
        let routing = loaded.rules.route(
            &serde_json::from_str(r#"{"id":"a","type":"t","severity":"info","title":"x"}"#)
                .unwrap(),
        );
        assert_eq!(
            routing.targets[0].target,
            Target::SlackChannel("0012".into())
        );
    }

    #[test]
    fn the_sample_rules_file_loads_cleanly() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.yaml");
        let loaded = Rules::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.rules.rule_count(), 6);
        assert_eq!(loaded.rules.default_channel(), Some("#escalations"));
        let event = crate::event::Event::decode(
            br#"{"id":"esc-2041-2","type":"escalation.escalated","severity":"critical",
                "title":"Checkout API error rate above SLO","workspace":"T0AEXY01",
                "assignee":{"name":"Ana Ruiz","email":"ana@example.com"},
                "level":2,"labels":{"team":"payments","env":"prod"}}"#,
            1 << 20,
        )
        .unwrap();
        let routing = loaded.rules.route(&event);
        assert_eq!(routing.matched_rules, ["payments-critical"]);
        assert_eq!(
            routing
                .targets
                .iter()
                .map(|t| t.target.to_string())
                .collect::<Vec<_>>(),
            [
                "slack_channel:C0PAYMENTS",
                "slack_user:U0LEAD",
                "slack_email:lead@example.com",
                "slack_email:ana@example.com",
                "email:payments-oncall@example.com"
            ]
        );
    }

    #[test]
    fn a_missing_file_is_one_diagnostic_without_a_position() {
        let err = Rules::load(std::path::Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].line, 0);
        assert!(
            err.to_string()
                .starts_with("/nonexistent/rules.yaml: error: cannot read the rules file: "),
            "{err}"
        );
    }

    #[test]
    fn the_json_schema_describes_the_top_level_keys() {
        let schema = Rules::json_schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        let keys: Vec<_> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for key in TOP_KEYS {
            assert!(keys.contains(&key.to_string()), "{key}");
        }
        assert_eq!(
            schema["$defs"]["rule"]["required"],
            serde_json::json!(["name", "notify"])
        );
    }
}
