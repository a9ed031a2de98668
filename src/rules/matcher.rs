//! Prometheus Alertmanager label matchers (`team="payments"`, `type=~"escalation\..*"`):
//! parsing with Alertmanager's classic grammar, and matching against events.
//!
//! **Grammar.** [`Matcher::parse`] is Alertmanager's `labels.ParseMatcher` and
//! [`Matcher::parse_list`] its `labels.ParseMatchers`, which reads each item of
//! a config's `matchers:` (and so each item of a rule's `matchers` here): the
//! classic parser of Alertmanager 0.25 and 0.26, and of 0.27 in `classic-mode`.
//! Every row of Alertmanager's own test tables is checked in
//! `tests/alertmanager_matchers.rs`. In short: a label name
//! `[a-zA-Z_:][a-zA-Z0-9_:]*`, an operator, and a value that may be empty,
//! bare or double-quoted, with `\"`, `\\` and `\n` escapes and any other
//! backslash literal; whitespace around each part is ignored.
//!
//! **The UTF-8 grammar** (`matcher/parse`, the default of Alertmanager 0.27,
//! which falls back to the classic parser when that one accepts the input) also
//! takes quoted and non-ASCII label names (`"foo"="bar"`, `foo🙂=bar`). We do not:
//! label names here are event fields and label keys, and such input is refused
//! with a reason, as Alertmanager's classic mode refuses it. Everything else
//! the fallback accepts in a config line reads the same here, since it keeps
//! the classic result. (For one matcher outside a config, 0.27 also refuses
//! input that starts with `{` or ends with `}`, such as `foo=bar}`, which the
//! classic parser and we read as the value `bar}`.)
//!
//! **Meaning.** `=~` and `!~` match the whole value (`^(?:regex)$`); a missing
//! label is the empty string. Alertmanager compiles regexes with Go's RE2
//! syntax; this crate's `regex` differs in places, so patterns are rewritten to
//! keep Go's meaning (`\d \w \s \b` are ASCII; `[`, `&`, `~` inside a class and
//! `\<`, `\>` are literals; `\Q...\E` quotes) and the crate's extensions that Go
//! refuses (flags `x`, `u`, `R`; `\u`, `\U`; counts over 1000; `--` in a class)
//! are refused.
//!
//! **Known differences that remain, each refusing what Alertmanager accepts, never
//! reading it otherwise:**
//! - A regex that escapes the anchors, such as `a)|(b`, which Alertmanager reads
//!   as `^(?:a)|(b)$` (starts with `a` or ends with `b`): refused, because no
//!   one writing it means that.
//! - Go regex syntax the `regex` crate lacks: octal escapes (`\012`), a `{`
//!   that starts no repetition (`a{`, `a{,3}`), which Go reads literally, and
//!   `--` inside a class: refused with the crate's (or our) reason.

use std::fmt;
use std::str::FromStr;

use regex::Regex;

use crate::event::Event;

/// The comparison a matcher makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MatchOp {
    /// `=`: the value equals.
    Equal,
    /// `!=`: the value differs.
    NotEqual,
    /// `=~`: the value matches the fully anchored regex.
    Regex,
    /// `!~`: the value does not match the fully anchored regex.
    NotRegex,
}

impl MatchOp {
    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::Regex => "=~",
            MatchOp::NotRegex => "!~",
        }
    }
}

impl fmt::Display for MatchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a matcher does not parse. Each message is a plain sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatcherError {
    #[error("the matcher is empty")]
    Empty,
    #[error("a label name is missing before the operator")]
    MissingLabelName,
    #[error(
        "`{0}` is not a valid label name (letters, digits, `_` and `:`, not starting with a digit)"
    )]
    BadLabelName(String),
    #[error("an operator is missing after `{0}`: expected `=`, `!=`, `=~` or `!~`")]
    MissingOperator(String),
    #[error("expected `=`, `!=`, `=~` or `!~` after `{name}`, found `{found}`")]
    BadOperator { name: String, found: String },
    #[error(
        "the value `{0}` contains an unescaped double quote (write `\\\"` for a literal quote)"
    )]
    UnescapedQuote(String),
    #[error("invalid regex `{regex}`: {reason}")]
    BadRegex { regex: String, reason: String },
}

/// One compiled matcher. Regexes are compiled once, here, never on the hot path.
#[derive(Debug, Clone)]
pub struct Matcher {
    name: String,
    op: MatchOp,
    value: String,
    test: Test,
}

/// The positive test behind a matcher (`!=` and `!~` negate it).
#[derive(Debug, Clone)]
enum Test {
    /// `=` and `!=`.
    Literal,
    /// `=~` with a plain alternation such as `critical|high`: string compares
    /// beat a regex call by an order of magnitude and give the same answer.
    OneOf(Box<[String]>),
    /// `^(?:value)$`.
    Regex(Regex),
}

impl Matcher {
    /// Builds a matcher from its parts, compiling the regex for `=~` and `!~`.
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Matcher, MatcherError> {
        if !is_label_name(name) {
            return Err(MatcherError::BadLabelName(name.to_string()));
        }
        let test = match op {
            MatchOp::Equal | MatchOp::NotEqual => Test::Literal,
            MatchOp::Regex | MatchOp::NotRegex => match literal_alternatives(value) {
                Some(alternatives) => Test::OneOf(alternatives),
                None => Test::Regex(compile_anchored(value)?),
            },
        };
        Ok(Matcher {
            name: name.to_string(),
            op,
            value: value.to_string(),
            test,
        })
    }

    /// Parses one matcher in Alertmanager's classic syntax: a label name, an
    /// operator and a value, each optionally surrounded by whitespace. The value
    /// may be double-quoted; `\"`, `\\` and `\n` are escapes, and any other
    /// backslash is literal, as in Alertmanager.
    pub fn parse(input: &str) -> Result<Matcher, MatcherError> {
        let s = input.trim_ascii_start();
        if s.trim_ascii_end().is_empty() {
            return Err(MatcherError::Empty);
        }
        // The name runs up to whitespace or an operator character, so that a
        // bad name is reported as such rather than as a missing operator.
        let name_end = s
            .find(|c: char| c.is_ascii_whitespace() || matches!(c, '=' | '!' | '~'))
            .unwrap_or(s.len());
        let name = &s[..name_end];
        if name.is_empty() {
            return Err(MatcherError::MissingLabelName);
        }
        if !is_label_name(name) {
            return Err(MatcherError::BadLabelName(name.to_string()));
        }
        let rest = s[name_end..].trim_ascii_start();
        // `=~` must be tried before `=`, or `a=~b` would be `a` = `~b`.
        let (op, rest) = if let Some(r) = rest.strip_prefix("=~") {
            (MatchOp::Regex, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (MatchOp::NotEqual, r)
        } else if let Some(r) = rest.strip_prefix("!~") {
            (MatchOp::NotRegex, r)
        } else if let Some(r) = rest.strip_prefix('=') {
            (MatchOp::Equal, r)
        } else if rest.trim_ascii_end().is_empty() {
            return Err(MatcherError::MissingOperator(name.to_string()));
        } else {
            return Err(MatcherError::BadOperator {
                name: name.to_string(),
                found: rest.trim_ascii_end().to_string(),
            });
        };
        // An empty value is allowed: `team=` is `team=""`, as in Alertmanager.
        let value = unescape(rest.trim_ascii())?;
        Matcher::new(name, op, &value)
    }

    /// Parses one line of matchers as Alertmanager reads each item of a
    /// config's `matchers:` list (`labels.ParseMatchers`): an optional `{` and
    /// `}`, then matchers separated by commas outside double quotes, a trailing
    /// comma allowed. `{}` and the empty string give no matcher at all.
    pub fn parse_list(input: &str) -> Result<Vec<Matcher>, MatcherError> {
        let s = input.strip_prefix('{').unwrap_or(input);
        let s = s.strip_suffix('}').unwrap_or(s);
        // Commas split outside quotes; a quote preceded by an odd number of
        // backslashes does not open or close one. Alertmanager's quirks are
        // kept: a comma does not end an escape, and only the last piece is
        // trimmed (and dropped when empty), so `a=1,,b=2` has an empty matcher.
        let mut pieces = Vec::new();
        let mut start = 0;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                ',' if !quoted => {
                    pieces.push(&s[start..i]);
                    start = i + 1;
                }
                ',' => {}
                '"' if escaped => escaped = false,
                '"' => quoted = !quoted,
                '\\' => escaped = !escaped,
                _ => escaped = false,
            }
        }
        let last = s[start..].trim();
        if !last.is_empty() {
            pieces.push(last);
        }
        pieces.into_iter().map(Matcher::parse).collect()
    }

    /// The label name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operator.
    pub fn op(&self) -> MatchOp {
        self.op
    }

    /// The unescaped value (the regex source for `=~` and `!~`).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether a label value satisfies this matcher.
    pub fn matches_value(&self, value: &str) -> bool {
        self.hit(value) != self.is_negated()
    }

    /// The positive test (equal, or matching the regex) before any negation.
    pub(crate) fn hit(&self, value: &str) -> bool {
        match &self.test {
            Test::Literal => value == self.value,
            Test::OneOf(alternatives) => alternatives.iter().any(|a| a == value),
            Test::Regex(re) => re.is_match(value),
        }
    }

    /// True for `!=` and `!~`.
    pub(crate) fn is_negated(&self) -> bool {
        matches!(self.op, MatchOp::NotEqual | MatchOp::NotRegex)
    }

    /// Relative cost of a test, to run the cheap (and usually most selective)
    /// ones first: an exact compare, a few compares, a regex.
    pub(crate) fn cost(&self) -> u8 {
        match self.test {
            Test::Literal => 0,
            Test::OneOf(_) => 1,
            Test::Regex(_) => 2,
        }
    }

    /// True when matching runs a real regex (the costly case), which the
    /// router memoizes and evaluates last.
    pub(crate) fn uses_regex(&self) -> bool {
        matches!(self.test, Test::Regex(_))
    }

    /// Whether the event's label (missing = empty string) satisfies this matcher.
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_value(&event.label(&self.name))
    }

    /// True when the matcher holds for every event: `x=~".*"` and friends.
    /// Used to warn about rules hidden behind a catch-all rule.
    pub fn matches_anything(&self) -> bool {
        self.op == MatchOp::Regex && matches!(self.value.as_str(), ".*" | "(?s).*" | "(?s:.*)")
    }
}

impl FromStr for Matcher {
    type Err = MatcherError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Matcher::parse(s)
    }
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.op == other.op && self.value == other.value
    }
}

impl Eq for Matcher {}

/// The canonical form, `name="value"` with OpenMetrics escaping, which parses back
/// to the same matcher.
impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}\"", self.name, self.op)?;
        for c in self.value.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, Prometheus' classic label name.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Alertmanager's value unescaping: an optional pair of surrounding quotes, and
/// `\"`, `\\`, `\n` escapes; a backslash before anything else stays literal.
fn unescape(raw: &str) -> Result<String, MatcherError> {
    let (body, mut expect_closing_quote) = match raw.strip_prefix('"') {
        Some(body) => (body, true),
        None => (raw, false),
    };
    let mut value = String::with_capacity(body.len());
    let mut escaped = false;
    let mut chars = body.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        let is_last = chars.peek().is_none();
        if escaped {
            escaped = false;
            match c {
                'n' => value.push('\n'),
                '"' | '\\' => value.push(c),
                other => {
                    value.push('\\');
                    value.push(other);
                }
            }
            continue;
        }
        match c {
            '\\' if !is_last => escaped = true,
            '\\' => value.push('\\'),
            '"' if expect_closing_quote && is_last => expect_closing_quote = false,
            '"' => return Err(MatcherError::UnescapedQuote(raw.to_string())),
            other => value.push(other),
        }
    }
    if expect_closing_quote {
        return Err(MatcherError::UnescapedQuote(raw.to_string()));
    }
    Ok(value)
}

/// `a|b|c` where no alternative uses regex syntax; `None` otherwise.
fn literal_alternatives(pattern: &str) -> Option<Box<[String]>> {
    const META: &[char] = &[
        '\\', '.', '+', '*', '?', '(', ')', '[', ']', '{', '}', '^', '$',
    ];
    if pattern.contains(META) {
        return None;
    }
    Some(pattern.split('|').map(str::to_string).collect())
}

/// Compiles `^(?:pattern)$` with the meaning Go's RE2 syntax gives the pattern
/// (see [`go_to_rust_syntax`]). The bare pattern is checked first so that input
/// like `a)|(b` cannot escape the anchors, and so errors quote what the user wrote.
fn compile_anchored(pattern: &str) -> Result<Regex, MatcherError> {
    let bad = |reason: String| MatcherError::BadRegex {
        regex: pattern.to_string(),
        reason,
    };
    let translated = go_to_rust_syntax(pattern).map_err(bad)?;
    Regex::new(&translated).map_err(|e| bad(regex_reason(&e)))?;
    Regex::new(&format!("^(?:{translated})$")).map_err(|e| bad(regex_reason(&e)))
}

/// Rewrites the places where Go's regexp syntax (what Alertmanager compiles)
/// and the `regex` crate read the same pattern differently, and rejects the
/// crate's extensions that Go refuses, so a pattern means what it means in
/// Alertmanager or does not load at all:
/// - `\d \w \s \b` and their negations are ASCII in Go, Unicode in the crate;
/// - `\<` and `\>` are literal in Go, word boundaries in the crate;
/// - inside `[...]`, `[` (other than `[:alpha:]`), `&` and `~` are literal in
///   Go, nested classes and set operations in the crate;
/// - `\Q...\E` quotes a literal in Go only;
/// - the flags `u`, `x`, `R` and the escapes `\u`, `\U` exist only in the crate.
fn go_to_rust_syntax(pattern: &str) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    let mut in_class = false;
    // Right after `[` or `[^`, where `]` is a literal in both dialects.
    let mut class_start = false;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        let at_class_start = std::mem::take(&mut class_start);
        match c {
            '\\' => {
                let Some(e) = rest.chars().next() else {
                    out.push('\\');
                    break;
                };
                rest = &rest[e.len_utf8()..];
                match e {
                    'd' => out.push_str("[0-9]"),
                    'D' => out.push_str("[^0-9]"),
                    'w' => out.push_str("[0-9A-Za-z_]"),
                    'W' => out.push_str("[^0-9A-Za-z_]"),
                    's' => out.push_str(r"[\t\n\x0C\r ]"),
                    'S' => out.push_str(r"[^\t\n\x0C\r ]"),
                    'b' | 'B' if !in_class => {
                        out.push_str("(?-u:\\");
                        out.push(e);
                        out.push(')');
                    }
                    '<' | '>' => out.push(e),
                    'Q' if !in_class => {
                        // Without `\E` the quote would swallow the `)$` that
                        // anchors the pattern, which Go then refuses.
                        let Some((literal, after)) = rest.split_once("\\E") else {
                            return Err("`\\Q` needs a closing `\\E`".to_string());
                        };
                        out.push_str(&regex::escape(literal));
                        rest = after;
                    }
                    'u' | 'U' => return Err(format!("`\\{e}` is not an escape in Go regexes")),
                    _ => {
                        out.push('\\');
                        out.push(e);
                    }
                }
            }
            '[' if in_class => match posix_class(rest) {
                Some(len) => {
                    out.push('[');
                    out.push_str(&rest[..len]);
                    rest = &rest[len..];
                }
                None => out.push_str(r"\["),
            },
            '[' => {
                in_class = true;
                class_start = true;
                out.push('[');
                if let Some(after) = rest.strip_prefix('^') {
                    out.push('^');
                    rest = after;
                }
            }
            ']' if in_class && !at_class_start => {
                in_class = false;
                out.push(']');
            }
            '-' if in_class && rest.starts_with('-') => {
                return Err(
                    "`--` in a character class reads differently in Go regexes; write `\\-` for a literal `-`"
                        .to_string(),
                );
            }
            '{' if !in_class => {
                if let Some(count) = repetition_counts(rest).find(|n| *n > 1000) {
                    return Err(format!(
                        "the repetition count {count} is over Go's limit of 1000"
                    ));
                }
                out.push('{');
            }
            '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            '(' if !in_class && rest.starts_with('?') => {
                let flags: String = rest[1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic() || *c == '-')
                    .collect();
                if let Some(flag) = flags.chars().find(|f| matches!(f, 'u' | 'x' | 'R')) {
                    return Err(format!(
                        "the flag `{flag}` is not supported by Go regexes (only i, m, s and U)"
                    ));
                }
                out.push('(');
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// The numbers of a counted repetition (`{2}`, `{2,}`, `{2,5}`) that `rest`
/// (just after a `{`) starts; none when it is not one.
fn repetition_counts(rest: &str) -> impl Iterator<Item = u64> + '_ {
    let inner = rest.split_once('}').map_or("", |(inner, _)| inner);
    let is_count = !inner.is_empty()
        && inner.split(',').count() <= 2
        && inner.split(',').next().is_some_and(|n| !n.is_empty())
        && inner.chars().all(|c| c.is_ascii_digit() || c == ',');
    inner.split(',').filter(move |_| is_count).filter_map(|n| {
        n.parse::<u64>()
            .ok()
            .or((!n.is_empty()).then_some(u64::MAX))
    })
}

/// The length of `:name:]` when `rest` (just after a `[` inside a class)
/// starts a POSIX class such as `[:alpha:]`, which both dialects read alike.
fn posix_class(rest: &str) -> Option<usize> {
    let name = rest.strip_prefix(':')?;
    let end = name.find(":]")?;
    let name = &name[..end];
    let name = name.strip_prefix('^').unwrap_or(name);
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase())).then_some(end + 3)
}

/// The regex crate's error is a multi-line drawing; keep its final sentence.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Severity};

    #[test]
    fn valid_matchers_parse_like_alertmanager() {
        use MatchOp::*;
        let cases: &[(&str, &str, MatchOp, &str)] = &[
            (r#"team="payments""#, "team", Equal, "payments"),
            ("team=payments", "team", Equal, "payments"),
            (r#"team!="payments""#, "team", NotEqual, "payments"),
            (
                r#"type=~"escalation\..*""#,
                "type",
                Regex,
                r"escalation\..*",
            ),
            (r#"env!~"dev|test""#, "env", NotRegex, "dev|test"),
            ("statuscode=~5..", "statuscode", Regex, "5.."),
            (r#"team="""#, "team", Equal, ""),
            ("team=", "team", Equal, ""),
            ("team=~  ", "team", Regex, ""),
            (r#"  team  =  "payments"  "#, "team", Equal, "payments"),
            ("team = two words ", "team", Equal, "two words"),
            (r#"foo="bar,quux""#, "foo", Equal, "bar,quux"),
            ("tricky=~~~", "tricky", Regex, "~~"),
            (r#"trickier==\\=\=\""#, "trickier", Equal, r#"=\=\=""#),
            (r#"q="She said: \"hi\"""#, "q", Equal, r#"She said: "hi""#),
            (r#"path="C:\\temp""#, "path", Equal, r"C:\temp"),
            (r#"text="a\nb""#, "text", Equal, "a\nb"),
            (r"dot=a\.b", "dot", Equal, r"a\.b"),
            (r"end=a\", "end", Equal, r"a\"),
            ("_private:x=1", "_private:x", Equal, "1"),
            (r#"team="côdé""#, "team", Equal, "côdé"),
        ];
        for &(input, name, op, value) in cases {
            let m = Matcher::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((m.name(), m.op(), m.value()), (name, op, value), "{input}");
        }
    }

    #[test]
    fn invalid_matchers_are_rejected_with_a_plain_reason() {
        let cases = [
            ("", "the matcher is empty"),
            ("   ", "the matcher is empty"),
            (r#"="x""#, "a label name is missing before the operator"),
            (
                r#"invalid-name="x""#,
                "`invalid-name` is not a valid label name (letters, digits, `_` and `:`, not starting with a digit)",
            ),
            (
                r#"1team="x""#,
                "`1team` is not a valid label name (letters, digits, `_` and `:`, not starting with a digit)",
            ),
            (
                r#""team"="x""#,
                "`\"team\"` is not a valid label name (letters, digits, `_` and `:`, not starting with a digit)",
            ),
            (
                "team",
                "an operator is missing after `team`: expected `=`, `!=`, `=~` or `!~`",
            ),
            (
                "team payments",
                "expected `=`, `!=`, `=~` or `!~` after `team`, found `payments`",
            ),
            (
                r#"team~="x""#,
                "expected `=`, `!=`, `=~` or `!~` after `team`, found `~=\"x\"`",
            ),
            (
                r#"job="value"#,
                "the value `\"value` contains an unescaped double quote (write `\\\"` for a literal quote)",
            ),
            (
                r#"job=value""#,
                "the value `value\"` contains an unescaped double quote (write `\\\"` for a literal quote)",
            ),
            (
                r#"job="a"b""#,
                "the value `\"a\"b\"` contains an unescaped double quote (write `\\\"` for a literal quote)",
            ),
            (
                r#"job=""#,
                "the value `\"` contains an unescaped double quote (write `\\\"` for a literal quote)",
            ),
            (
                r#"foo=~"invalid[regexp""#,
                "invalid regex `invalid[regexp`: unclosed character class",
            ),
            (r#"foo=~"a)|(b""#, "invalid regex `a)|(b`: unopened group"),
            (r#"foo!~"(x""#, "invalid regex `(x`: unclosed group"),
        ];
        for (input, expected) in cases {
            match Matcher::parse(input) {
                Ok(m) => panic!("{input:?} parsed as {m}"),
                Err(e) => assert_eq!(e.to_string(), expected, "{input:?}"),
            }
        }
    }

    #[test]
    fn display_gives_a_canonical_form_that_parses_back() {
        for input in [r#"q="She said: \"hi\"""#, r#"p=~"a\\b\nc""#, "x!=plain"] {
            let m = Matcher::parse(input).unwrap();
            let again = Matcher::parse(&m.to_string()).unwrap();
            assert_eq!(m, again, "{input} -> {m}");
        }
        assert_eq!(
            Matcher::parse("team = pay").unwrap().to_string(),
            r#"team="pay""#
        );
    }

    #[test]
    fn regexes_are_fully_anchored() {
        let m = Matcher::parse(r#"code=~"5..""#).unwrap();
        assert!(m.matches_value("503"));
        assert!(!m.matches_value("5033"));
        assert!(!m.matches_value("1503"));
        let m = Matcher::parse(r#"sev=~"critical|high""#).unwrap();
        assert!(m.matches_value("high"));
        assert!(!m.matches_value("highest"));
        assert!(!m.matches_value("critical|high"));
    }

    #[test]
    fn plain_alternations_match_exactly_like_the_regex() {
        let m = Matcher::parse(r#"sev=~"critical|high|""#).unwrap();
        assert!(!m.uses_regex());
        let re = Regex::new("^(?:critical|high|)$").unwrap();
        for v in ["critical", "high", "", "crit", "critical|high", "High"] {
            assert_eq!(m.matches_value(v), re.is_match(v), "{v:?}");
        }
        assert!(Matcher::parse(r#"x=~"a.b""#).unwrap().uses_regex());
        assert!(
            Matcher::parse(r#"x=~"dead-letter""#)
                .unwrap()
                .matches_value("dead-letter")
        );
    }

    #[test]
    fn negative_regex_is_the_exact_complement() {
        let m = Matcher::parse(r#"env!~"dev|test""#).unwrap();
        assert!(!m.matches_value("dev"));
        assert!(m.matches_value("devel"));
        assert!(m.matches_value(""));
    }

    fn event(labels: &[(&str, &str)]) -> Event {
        Event {
            id: "e1".into(),
            kind: "escalation.triggered".into(),
            severity: Severity::High,
            title: "t".into(),
            workspace: None,
            occurred_at: None,
            source: None,
            summary: None,
            ticket: None,
            assignee: None,
            level: Some(2),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            comment: None,
            targets: None,
            dedup_key: None,
            acknowledged_by: None,
            received: Default::default(),
        }
    }

    #[test]
    fn a_missing_label_is_the_empty_string() {
        let no_team = event(&[]);
        let with_team = event(&[("team", "payments")]);
        let empty = Matcher::parse(r#"team="""#).unwrap();
        let present = Matcher::parse(r#"team!="""#).unwrap();
        assert!(empty.matches(&no_team));
        assert!(!empty.matches(&with_team));
        assert!(!present.matches(&no_team));
        assert!(present.matches(&with_team));
        // `!=` on a missing label holds, as in Alertmanager.
        assert!(Matcher::parse("team!=ops").unwrap().matches(&no_team));
        assert!(Matcher::parse(r#"team=~"x*""#).unwrap().matches(&no_team));
    }

    #[test]
    fn built_in_fields_are_matchable_and_win_over_labels() {
        let e = event(&[("severity", "critical"), ("team", "payments")]);
        assert!(Matcher::parse("severity=high").unwrap().matches(&e));
        assert!(!Matcher::parse("severity=critical").unwrap().matches(&e));
        assert!(Matcher::parse("level=2").unwrap().matches(&e));
        assert!(
            Matcher::parse(r#"type=~"escalation\..*""#)
                .unwrap()
                .matches(&e)
        );
        assert!(Matcher::parse(r#"source="""#).unwrap().matches(&e));
    }

    #[test]
    fn escapes_in_values_are_matched_literally() {
        let m = Matcher::parse(r#"msg="say \"hi\"\n""#).unwrap();
        assert!(m.matches_value("say \"hi\"\n"));
        let m = Matcher::parse(r#"type=~"escalation\.triggered""#).unwrap();
        assert!(m.matches_value("escalation.triggered"));
        assert!(!m.matches_value("escalationXtriggered"));
    }

    #[test]
    fn only_catch_all_regexes_match_anything() {
        for s in [r#"x=~".*""#, "x=~(?s).*"] {
            assert!(Matcher::parse(s).unwrap().matches_anything(), "{s}");
        }
        for s in [r#"x=~".+""#, r#"x!~".*""#, r#"x="""#, "x!=y"] {
            assert!(!Matcher::parse(s).unwrap().matches_anything(), "{s}");
        }
    }
}
