//! Alertmanager's own matcher test tables, ported row by row, so that a matcher
//! string is accepted or rejected here exactly as Alertmanager does it, with the
//! same name, operator and value.
//!
//! Source: github.com/prometheus/alertmanager, the files named above each table.
//! Go string literals are rewritten as Rust raw strings with the same bytes.
//! Our error messages are our own plain sentences, so a rejected row checks that
//! the input is rejected and keeps Go's message only as a note.
//!
//! We implement the classic grammar (`pkg/labels`, what Alertmanager ≤ 0.26 and
//! 0.27's `classic-mode` use). The UTF-8 parser's tables (`matcher/parse`) are
//! ported too, each row with what the classic grammar gives and whether the
//! UTF-8 parser agrees; see the `//!` doc of `src/rules/matcher.rs`.

use alert_router::event::Event;
use alert_router::rules::MatchOp::{self, Equal, NotEqual, NotRegex, Regex};
use alert_router::rules::Matcher;

/// What parsing gives: the matchers as (name, op, value), or a rejection
/// (with Go's error message, for the reader).
#[derive(Debug)]
enum Want {
    Parsed(&'static [(&'static str, MatchOp, &'static str)]),
    Rejected(&'static str),
}
use Want::{Parsed, Rejected};

/// Whether Alertmanager's UTF-8 parser (`matcher/parse`) reads the row the same.
#[derive(Debug)]
enum Utf8 {
    Agrees,
    /// What the UTF-8 parser gives instead.
    Differs(&'static str),
}
use Utf8::{Agrees, Differs};

impl Utf8 {
    fn describe(&self) -> &'static str {
        match self {
            Agrees => "the UTF-8 parser agrees",
            Differs(what) => what,
        }
    }
}

fn parts(ms: &[Matcher]) -> Vec<(&str, MatchOp, &str)> {
    ms.iter().map(|m| (m.name(), m.op(), m.value())).collect()
}

fn check_list(input: &str, want: &Want) {
    match (Matcher::parse_list(input), want) {
        (Ok(got), Parsed(expected)) => assert_eq!(parts(&got), *expected, "{input:?}"),
        (Err(_), Rejected(_)) => {}
        (Ok(got), Rejected(go)) => panic!("{input:?} parsed as {got:?}; Go rejects it: {go}"),
        (Err(e), Parsed(expected)) => panic!("{input:?} rejected ({e}); Go gives {expected:?}"),
    }
}

fn check_one(input: &str, want: &Want) {
    match (Matcher::parse(input), want) {
        (Ok(got), Parsed([expected])) => {
            assert_eq!((got.name(), got.op(), got.value()), *expected, "{input:?}")
        }
        (Ok(got), Parsed(_)) => panic!("{input:?} parsed as one matcher {got}"),
        (Err(_), Rejected(_)) => {}
        (Ok(got), Rejected(go)) => panic!("{input:?} parsed as {got}; Go rejects it: {go}"),
        (Err(e), Parsed(expected)) => panic!("{input:?} rejected ({e}); Go gives {expected:?}"),
    }
}

/// pkg/labels/parse_test.go, `TestMatchers`: `labels.ParseMatchers`, the
/// classic parser of one line of matchers (what each item of a config's
/// `matchers:` list goes through). Every row applies: `Matcher::parse_list`.
#[test]
fn classic_parse_matchers_table() {
    let table: &[(&str, Want)] = &[
        (r#"{}"#, Parsed(&[])),
        (r#","#, Rejected("bad matcher format: ")),
        (r#"{,}"#, Rejected("bad matcher format: ")),
        (r#"{foo='}"#, Parsed(&[("foo", Equal, "'")])),
        (r#"{foo=`}"#, Parsed(&[("foo", Equal, "`")])),
        (r#"{foo=\"}"#, Parsed(&[("foo", Equal, "\"")])),
        (r#"{foo=bar}"#, Parsed(&[("foo", Equal, "bar")])),
        (r#"{foo="bar"}"#, Parsed(&[("foo", Equal, "bar")])),
        (r#"{foo=~bar.*}"#, Parsed(&[("foo", Regex, "bar.*")])),
        (r#"{foo=~"bar.*"}"#, Parsed(&[("foo", Regex, "bar.*")])),
        (r#"{foo!=bar}"#, Parsed(&[("foo", NotEqual, "bar")])),
        (r#"{foo!="bar"}"#, Parsed(&[("foo", NotEqual, "bar")])),
        (r#"{foo!~bar.*}"#, Parsed(&[("foo", NotRegex, "bar.*")])),
        (r#"{foo!~"bar.*"}"#, Parsed(&[("foo", NotRegex, "bar.*")])),
        (
            r#"{foo="bar", baz!="quux"}"#,
            Parsed(&[("foo", Equal, "bar"), ("baz", NotEqual, "quux")]),
        ),
        (
            r#"{foo="bar", baz!~"quux.*"}"#,
            Parsed(&[("foo", Equal, "bar"), ("baz", NotRegex, "quux.*")]),
        ),
        (
            r#"{foo="bar",baz!~".*quux", derp="wat"}"#,
            Parsed(&[
                ("foo", Equal, "bar"),
                ("baz", NotRegex, ".*quux"),
                ("derp", Equal, "wat"),
            ]),
        ),
        (
            r#"{foo="bar", baz!="quux", derp="wat"}"#,
            Parsed(&[
                ("foo", Equal, "bar"),
                ("baz", NotEqual, "quux"),
                ("derp", Equal, "wat"),
            ]),
        ),
        (
            r#"{foo="bar", baz!~".*quux.*", derp="wat"}"#,
            Parsed(&[
                ("foo", Equal, "bar"),
                ("baz", NotRegex, ".*quux.*"),
                ("derp", Equal, "wat"),
            ]),
        ),
        (
            r#"{foo="bar", instance=~"some-api.*"}"#,
            Parsed(&[("foo", Equal, "bar"), ("instance", Regex, "some-api.*")]),
        ),
        (r#"{foo=""}"#, Parsed(&[("foo", Equal, "")])),
        (
            r#"{foo="bar,quux", job="job1"}"#,
            Parsed(&[("foo", Equal, "bar,quux"), ("job", Equal, "job1")]),
        ),
        (
            r#"{foo = "bar", dings != "bums", }"#,
            Parsed(&[("foo", Equal, "bar"), ("dings", NotEqual, "bums")]),
        ),
        (
            r#"foo=bar,dings!=bums"#,
            Parsed(&[("foo", Equal, "bar"), ("dings", NotEqual, "bums")]),
        ),
        (
            r#"{quote="She said: \"Hi, ladies! That's gender-neutral…\""}"#,
            Parsed(&[(
                "quote",
                Equal,
                r#"She said: "Hi, ladies! That's gender-neutral…""#,
            )]),
        ),
        (
            r#"statuscode=~"5..""#,
            Parsed(&[("statuscode", Regex, "5..")]),
        ),
        (r#"tricky=~~~"#, Parsed(&[("tricky", Regex, "~~")])),
        (
            r#"trickier==\\=\=\""#,
            Parsed(&[("trickier", Equal, r#"=\=\=""#)]),
        ),
        (
            r#"contains_quote != "\"" , contains_comma !~ "foo,bar" , "#,
            Parsed(&[
                ("contains_quote", NotEqual, "\""),
                ("contains_comma", NotRegex, "foo,bar"),
            ]),
        ),
        (r#"{foo=bar}}"#, Parsed(&[("foo", Equal, "bar}")])),
        (r#"{foo=bar}},}"#, Parsed(&[("foo", Equal, "bar}}")])),
        (
            r#"{foo=,bar=}}"#,
            Parsed(&[("foo", Equal, ""), ("bar", Equal, "}")]),
        ),
        (r#"{foo=bar\t}"#, Parsed(&[("foo", Equal, r"bar\t")])),
        (r#"{foo=bar\n}"#, Parsed(&[("foo", Equal, "bar\n")])),
        (r#"{foo=bar\}"#, Parsed(&[("foo", Equal, r"bar\")])),
        (r#"{foo=bar\\}"#, Parsed(&[("foo", Equal, r"bar\")])),
        (r#"{foo=bar\"}"#, Parsed(&[("foo", Equal, "bar\"")])),
        (r#"job="#, Parsed(&[("job", Equal, "")])),
        (
            r#"job="value"#,
            Rejected(r#"matcher value contains unescaped double quote: "value"#),
        ),
        (
            r#"job=value""#,
            Rejected(r#"matcher value contains unescaped double quote: value""#),
        ),
        (
            r#"trickier==\\=\=\"""#,
            Rejected(r#"matcher value contains unescaped double quote: =\\=\=\"""#),
        ),
        (
            r#"contains_unescaped_quote = foo"bar"#,
            Rejected(r#"matcher value contains unescaped double quote: foo"bar"#),
        ),
        (
            r#"{invalid-name = "valid label"}"#,
            Rejected(r#"bad matcher format: invalid-name = "valid label""#),
        ),
        (
            r#"{foo=~"invalid[regexp"}"#,
            Rejected("error parsing regexp: missing closing ]: `[regexp)$`"),
        ),
        // Double escaped strings.
        (
            r#""{foo=\"bar"}"#,
            Rejected(r#"bad matcher format: "{foo=\"bar""#),
        ),
        (
            r#""foo=\"bar""#,
            Rejected(r#"bad matcher format: "foo=\"bar""#),
        ),
        (
            r#""foo=\"bar\"""#,
            Rejected(r#"bad matcher format: "foo=\"bar\"""#),
        ),
        (
            r#""foo=\"bar\""#,
            Rejected(r#"bad matcher format: "foo=\"bar\""#),
        ),
        (
            r#""{foo=\"bar\"}""#,
            Rejected(r#"bad matcher format: "{foo=\"bar\"}""#),
        ),
        (
            r#""foo="bar"""#,
            Rejected(r#"bad matcher format: "foo="bar"""#),
        ),
        (r#"{{foo="#, Rejected("bad matcher format: {foo=")),
        (r#"{foo="#, Parsed(&[("foo", Equal, "")])),
        (r#"{foo=}b"#, Parsed(&[("foo", Equal, "}b")])),
    ];
    assert_eq!(table.len(), 53, "every row of the Go table");
    for (input, want) in table {
        check_list(input, want);
    }
}

/// matcher/parse/parse_test.go, `TestMatchers`: the UTF-8 parser's list table.
/// Each row is checked against what we do (the classic grammar, `parse_list`),
/// and says where the UTF-8 parser reads it otherwise. Alertmanager 0.27's
/// default fallback mode takes the classic result whenever the classic parser
/// accepts, so only the rows the classic parser rejects and the UTF-8 parser
/// accepts (quoted label names) read differently there.
#[test]
fn utf8_parse_matchers_table_read_with_the_classic_grammar() {
    let table: &[(&str, &str, Want, Utf8)] = &[
        ("no braces", "", Parsed(&[]), Agrees),
        ("open and closing braces", "{}", Parsed(&[]), Agrees),
        (
            "equals",
            "{foo=bar}",
            Parsed(&[("foo", Equal, "bar")]),
            Agrees,
        ),
        (
            "equals with trailing comma",
            "{foo=bar,}",
            Parsed(&[("foo", Equal, "bar")]),
            Agrees,
        ),
        (
            "not equals",
            "{foo!=bar}",
            Parsed(&[("foo", NotEqual, "bar")]),
            Agrees,
        ),
        (
            "match regex",
            "{foo=~[a-z]+}",
            Parsed(&[("foo", Regex, "[a-z]+")]),
            Agrees,
        ),
        (
            "doesn't match regex",
            "{foo!~[a-z]+}",
            Parsed(&[("foo", NotRegex, "[a-z]+")]),
            Agrees,
        ),
        (
            "equals unicode emoji",
            "{foo=🙂}",
            Parsed(&[("foo", Equal, "🙂")]),
            Agrees,
        ),
        (
            "equals unicode sentence",
            "{foo=🙂bar}",
            Parsed(&[("foo", Equal, "🙂bar")]),
            Agrees,
        ),
        (
            "equals without braces",
            "foo=bar",
            Parsed(&[("foo", Equal, "bar")]),
            Agrees,
        ),
        (
            "equals without braces but with trailing comma",
            "foo=bar,",
            Parsed(&[("foo", Equal, "bar")]),
            Agrees,
        ),
        (
            "not equals without braces",
            "foo!=bar",
            Parsed(&[("foo", NotEqual, "bar")]),
            Agrees,
        ),
        (
            "match regex without braces",
            "foo=~[a-z]+",
            Parsed(&[("foo", Regex, "[a-z]+")]),
            Agrees,
        ),
        (
            "doesn't match regex without braces",
            "foo!~[a-z]+",
            Parsed(&[("foo", NotRegex, "[a-z]+")]),
            Agrees,
        ),
        // Quoted label names are the UTF-8 grammar's; the classic one refuses them.
        (
            "equals in quotes",
            r#"{"foo"="bar"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        (
            "equals in quotes and with trailing comma",
            r#"{"foo"="bar",}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        (
            "not equals in quotes",
            r#"{"foo"!="bar"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo!="bar""#),
        ),
        (
            "match regex in quotes",
            r#"{"foo"=~"[a-z]+"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo=~"[a-z]+""#),
        ),
        (
            "match regex digit in quotes",
            r#"{"foo"=~"\\d+"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo=~"\\d+""#),
        ),
        (
            "doesn't match regex in quotes",
            r#"{"foo"!~"[a-z]+"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo!~"[a-z]+""#),
        ),
        (
            "equals unicode emoji in quotes",
            r#"{"foo"="🙂"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="🙂""#),
        ),
        (
            "equals unicode emoji as bytes in quotes",
            r#"{"foo"="\xf0\x9f\x99\x82"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="🙂""#),
        ),
        (
            "equals unicode emoji as code points in quotes",
            r#"{"foo"="\U0001f642"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="🙂""#),
        ),
        (
            "equals unicode sentence in quotes",
            r#"{"foo"="🙂bar"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="🙂bar""#),
        ),
        (
            "equals with newline in quotes",
            r#"{"foo"="bar\n"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar\n""#),
        ),
        (
            "equals with tab in quotes",
            r#"{"foo"="bar\t"}"#,
            Rejected("bad matcher format"),
            Differs("foo=\"bar<TAB>\""),
        ),
        (
            "equals with escaped quotes in quotes",
            r#"{"foo"="\"bar\""}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="\"bar\"""#),
        ),
        (
            "equals with escaped backslash in quotes",
            r#"{"foo"="bar\\"}"#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar\\""#),
        ),
        (
            "equals without braces in quotes",
            r#""foo"="bar""#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        (
            "equals without braces in quotes with trailing comma",
            r#""foo"="bar","#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        (
            "complex",
            "{foo=bar,bar!=baz}",
            Parsed(&[("foo", Equal, "bar"), ("bar", NotEqual, "baz")]),
            Agrees,
        ),
        (
            "complex in quotes",
            r#"{foo="bar",bar!="baz"}"#,
            Parsed(&[("foo", Equal, "bar"), ("bar", NotEqual, "baz")]),
            Agrees,
        ),
        (
            "complex without braces",
            "foo=bar,bar!=baz",
            Parsed(&[("foo", Equal, "bar"), ("bar", NotEqual, "baz")]),
            Agrees,
        ),
        (
            "complex without braces in quotes",
            r#"foo="bar",bar!="baz""#,
            Parsed(&[("foo", Equal, "bar"), ("bar", NotEqual, "baz")]),
            Agrees,
        ),
        ("comma", ",", Rejected("bad matcher format: "), Agrees),
        (
            "comma in braces",
            "{,}",
            Rejected("bad matcher format: "),
            Agrees,
        ),
        // The classic parser trims one optional `{` and one optional `}`,
        // paired or not; the UTF-8 one wants them paired.
        (
            "open brace",
            "{",
            Parsed(&[]),
            Differs("0:1: end of input: expected close brace"),
        ),
        (
            "close brace",
            "}",
            Parsed(&[]),
            Differs("0:1: }: expected opening brace"),
        ),
        (
            "no open brace",
            "foo=bar}",
            Parsed(&[("foo", Equal, "bar")]),
            Differs("0:8: }: expected opening brace"),
        ),
        (
            "no close brace",
            "{foo=bar",
            Parsed(&[("foo", Equal, "bar")]),
            Differs("0:8: end of input: expected close brace"),
        ),
        (
            "invalid input after operator and before quotes",
            r#"{foo=:"bar"}"#,
            Rejected(r#"matcher value contains unescaped double quote: :"bar""#),
            Agrees,
        ),
        // The classic grammar keeps a backslash before anything but `"`, `\`
        // and `n` as a literal backslash.
        (
            "invalid escape sequence",
            r#"{foo="bar\w"}"#,
            Parsed(&[("foo", Equal, r"bar\w")]),
            Differs(r#"5:12: "bar\w": invalid input"#),
        ),
        (
            "invalid escape sequence regex digits",
            r#"{"foo"=~"\d+"}"#,
            Rejected("bad matcher format"),
            Agrees,
        ),
        (
            "no unquoted escape sequences",
            r#"{foo=bar\n}"#,
            Parsed(&[("foo", Equal, "bar\n")]),
            Differs(r#"8:9: \: invalid input: expected a comma or close brace"#),
        ),
        (
            "invalid unicode",
            r#"{"foo"="\xf0\x9f"}"#,
            Rejected("bad matcher format"),
            Agrees,
        ),
    ];
    assert_eq!(table.len(), 45, "every row of the Go table");
    for (name, input, want, utf8) in table {
        eprintln!("{name} (UTF-8 parser: {})", utf8.describe());
        check_list(input, want);
    }
}

/// matcher/parse/parse_test.go, `TestMatcher`: the UTF-8 parser's table for
/// exactly one matcher, checked against `Matcher::parse` (the classic
/// `labels.ParseMatcher`). Braces are no part of one matcher in the classic
/// grammar, and 0.27's `compat.Matcher` refuses them too ("unexpected open or
/// close brace"), in every mode.
#[test]
fn utf8_parse_matcher_table_read_with_the_classic_grammar() {
    const BRACES: Utf8 = Differs("accepted by matcher/parse alone; compat.Matcher refuses braces");
    let table: &[(&str, &str, Want, Utf8)] = &[
        (
            "equals",
            "{foo=bar}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals with trailing comma",
            "{foo=bar,}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "not equals",
            "{foo!=bar}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "match regex",
            "{foo=~[a-z]+}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "doesn't match regex",
            "{foo!~[a-z]+}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode emoji",
            "{foo=🙂}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode emoji as bytes in quotes",
            r#"{"foo"="\xf0\x9f\x99\x82"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode emoji as code points in quotes",
            r#"{"foo"="\U0001f642"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode sentence",
            "{foo=🙂bar}",
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals without braces",
            "foo=bar",
            Parsed(&[("foo", Equal, "bar")]),
            Agrees,
        ),
        // One matcher has no separator: the comma is part of the value. The
        // UTF-8 parser says `bar`; 0.27's fallback keeps the classic `bar,`.
        (
            "equals without braces but with trailing comma",
            "foo=bar,",
            Parsed(&[("foo", Equal, "bar,")]),
            Differs(r#"foo="bar""#),
        ),
        (
            "not equals without braces",
            "foo!=bar",
            Parsed(&[("foo", NotEqual, "bar")]),
            Agrees,
        ),
        (
            "match regex without braces",
            "foo=~[a-z]+",
            Parsed(&[("foo", Regex, "[a-z]+")]),
            Agrees,
        ),
        (
            "doesn't match regex without braces",
            "foo!~[a-z]+",
            Parsed(&[("foo", NotRegex, "[a-z]+")]),
            Agrees,
        ),
        (
            "equals in quotes",
            r#"{"foo"="bar"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals in quotes and with trailing comma",
            r#"{"foo"="bar",}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "not equals in quotes",
            r#"{"foo"!="bar"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "match regex in quotes",
            r#"{"foo"=~"[a-z]+"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "doesn't match regex in quotes",
            r#"{"foo"!~"[a-z]+"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode emoji in quotes",
            r#"{"foo"="🙂"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals unicode sentence in quotes",
            r#"{"foo"="🙂bar"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals with newline in quotes",
            r#"{"foo"="bar\n"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals with tab in quotes",
            r#"{"foo"="bar\t"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals with escaped quotes in quotes",
            r#"{"foo"="\"bar\""}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        (
            "equals with escaped backslash in quotes",
            r#"{"foo"="bar\\"}"#,
            Rejected("bad matcher format"),
            BRACES,
        ),
        // Accepted by 0.27's default fallback mode; refused by its classic
        // mode and by 0.25 and 0.26, as here.
        (
            "equals without braces in quotes",
            r#""foo"="bar""#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        (
            "equals without braces in quotes with trailing comma",
            r#""foo"="bar","#,
            Rejected("bad matcher format"),
            Differs(r#"foo="bar""#),
        ),
        ("no input", "", Rejected("no matchers"), Agrees),
        (
            "open and closing braces",
            "{}",
            Rejected("no matchers"),
            Agrees,
        ),
        // One matcher: everything after the operator is the value, as with
        // the classic parser and 0.27's fallback.
        (
            "two or more returns error",
            "foo=bar,bar=baz",
            Parsed(&[("foo", Equal, "bar,bar=baz")]),
            Differs("expected 1 matcher, found 2"),
        ),
        (
            "invalid unicode",
            r#"foo="\xf0\x9f""#,
            Parsed(&[("foo", Equal, r"\xf0\x9f")]),
            Differs(r#"4:14: "\xf0\x9f": invalid input"#),
        ),
    ];
    assert_eq!(table.len(), 31, "every row of the Go table");
    for (name, input, want, utf8) in table {
        eprintln!("{name} (UTF-8 parser: {})", utf8.describe());
        check_one(input, want);
    }
}

/// matcher/compat/parse_test.go, `TestFallbackMatcherParser` and
/// `TestFallbackMatchersParser`: Alertmanager 0.27's default mode. We agree
/// with every row but the one whose label name only the UTF-8 grammar allows.
#[test]
fn fallback_parser_tables() {
    // TestFallbackMatcherParser: one matcher.
    let one: &[(&str, &str, Want)] = &[
        (
            "input is accepted",
            "foo=bar",
            Parsed(&[("foo", Equal, "bar")]),
        ),
        (
            "input is accepted in neither",
            "foo!bar",
            Rejected("bad matcher format: foo!bar"),
        ),
        // Fallback mode gives foo🙂="bar"; label names here are classic.
        (
            "input is accepted in matchers/parse but not pkg/labels",
            "foo🙂=bar",
            Rejected("bad matcher format: foo🙂=bar (classic mode)"),
        ),
        (
            "input is accepted in pkg/labels but not matchers/parse",
            r#"foo=!bar\n"#,
            Parsed(&[("foo", Equal, "!bar\n")]),
        ),
        (
            "input causes disagreement",
            r#"foo="\xf0\x9f\x99\x82""#,
            Parsed(&[("foo", Equal, r"\xf0\x9f\x99\x82")]),
        ),
    ];
    for (name, input, want) in one {
        eprintln!("{name}");
        check_one(input, want);
    }

    // TestFallbackMatchersParser: a line of matchers.
    let list: &[(&str, &str, Want)] = &[
        (
            "input is accepted",
            "{foo=bar,bar=baz}",
            Parsed(&[("foo", Equal, "bar"), ("bar", Equal, "baz")]),
        ),
        (
            "input is accepted in neither",
            "{foo!bar}",
            Rejected("bad matcher format: foo!bar"),
        ),
        (
            "input is accepted in matchers/parse but not pkg/labels",
            "{foo🙂=bar,bar=baz🙂}",
            Rejected("bad matcher format: foo🙂=bar (classic mode)"),
        ),
        (
            "is accepted in pkg/labels but not matchers/parse",
            r#"{foo=!bar,bar=$baz\n}"#,
            Parsed(&[("foo", Equal, "!bar"), ("bar", Equal, "$baz\n")]),
        ),
        (
            "input causes disagreement",
            r#"{foo="\xf0\x9f\x99\x82"}"#,
            Parsed(&[("foo", Equal, r"\xf0\x9f\x99\x82")]),
        ),
    ];
    for (name, input, want) in list {
        eprintln!("{name}");
        check_list(input, want);
    }
}

/// matcher/compat/parse_test.go, `TestIsValidClassicLabelName`.
/// (`TestIsValidUTF8LabelName` does not apply: label names here are classic,
/// so `0foo` and `foo🙂` are refused.)
#[test]
fn classic_label_names() {
    let table = [
        ("foo is accepted", "foo", true),
        (
            "starts with underscore and ends with number is accepted",
            "_foo1",
            true,
        ),
        ("empty is not accepted", "", false),
        ("starts with number is not accepted", "0foo", false),
        ("contains emoji is not accepted", "foo🙂", false),
    ];
    for (name, label, valid) in table {
        assert_eq!(Matcher::new(label, Equal, "x").is_ok(), valid, "{name}");
    }
}

/// pkg/labels/matcher_test.go, `TestMatcher`: what a value matches. Go builds
/// these with an empty label name, which `Matcher::new` refuses, so they use
/// `foo`; the name plays no part in `Matches`.
#[test]
fn matching_semantics_table() {
    let table: &[(MatchOp, &str, &str, bool)] = &[
        (Equal, "bar", "bar", true),
        (Equal, "bar", "foo-bar", false),
        (NotEqual, "bar", "bar", false),
        (NotEqual, "bar", "foo-bar", true),
        (Regex, "bar", "bar", true),
        (Regex, "bar", "foo-bar", false),
        (Regex, ".*bar", "foo-bar", true),
        (NotRegex, "bar", "bar", false),
        (NotRegex, "bar", "foo-bar", true),
        (NotRegex, ".*bar", "foo-bar", false),
        (Regex, r"foo.bar", "foo-bar", true),
        (Regex, r"foo\.bar", "foo-bar", false),
        (Regex, r"foo\.bar", "foo.bar", true),
        (Equal, "foo\nbar", "foo\nbar", true),
        (Regex, "foo.bar", "foo\nbar", false),
        (Regex, "(?s)foo.bar", "foo\nbar", true),
        (Equal, "~!=\"", "~!=\"", true),
    ];
    assert_eq!(table.len(), 17, "every row of the Go table");
    for &(op, pattern, value, hit) in table {
        let m = Matcher::new("foo", op, pattern).unwrap();
        assert_eq!(m.matches_value(value), hit, "{m} on {value:?}");
    }
}

/// pkg/labels/matcher_test.go, `TestMatcherString`: the canonical form.
/// (`TestMatcherJSONMarshal` and `TestMatcherJSONUnmarshal` do not apply: they
/// test Alertmanager's v1 API JSON shape, which we do not have.)
#[test]
fn canonical_form_table() {
    let table: &[(&str, MatchOp, &str, &str)] = &[
        ("foo", Equal, "bar", r#"foo="bar""#),
        ("foo", NotEqual, "bar", r#"foo!="bar""#),
        ("foo", Regex, "bar", r#"foo=~"bar""#),
        ("foo", NotRegex, "bar", r#"foo!~"bar""#),
        ("foo", Equal, r"back\slash", r#"foo="back\\slash""#),
        ("foo", Equal, r#"double"quote"#, r#"foo="double\"quote""#),
        ("foo", Equal, "new\nline", r#"foo="new\nline""#),
        ("foo", Equal, "tab\tstop", "foo=\"tab\tstop\""),
    ];
    assert_eq!(table.len(), 8, "every row of the Go table");
    for &(name, op, value, want) in table {
        let m = Matcher::new(name, op, value).unwrap();
        assert_eq!(m.to_string(), want);
        assert_eq!(Matcher::parse(want).unwrap(), m, "{want} parses back");
    }
}

fn event(labels: serde_json::Value) -> Event {
    serde_json::from_value(serde_json::json!({
        "id": "e1",
        "type": "escalation.triggered",
        "severity": "high",
        "title": "t",
        "labels": labels,
    }))
    .unwrap()
}

/// `labels.Matchers.Matches` looks a label up in the label set and matches the
/// value, so a missing label is the empty string for every operator.
#[test]
fn a_missing_label_is_the_empty_string() {
    let without = event(serde_json::json!({}));
    let with = event(serde_json::json!({"team": "payments"}));
    let cases = [
        (r#"team="""#, true, false),
        ("team=", true, false),
        (r#"team!="""#, false, true),
        ("team!=ops", true, true),
        ("team=ops", false, false),
        (r#"team=~".*""#, true, true),
        (r#"team=~".+""#, false, true),
        (r#"team!~".+""#, true, false),
        (r#"team=~"x*""#, true, false),
    ];
    for (input, on_missing, on_payments) in cases {
        let m = Matcher::parse(input).unwrap();
        assert_eq!(m.matches(&without), on_missing, "{input} without team");
        assert_eq!(m.matches(&with), on_payments, "{input} with team=payments");
    }
}

/// `labels.NewMatcher` compiles `^(?:value)$`: a regex must match the whole value.
#[test]
fn regexes_are_fully_anchored() {
    let cases = [
        ("code=~5..", "503", true),
        ("code=~5..", "5033", false),
        ("code=~5..", "1503", false),
        (r#"sev=~"critical|high""#, "high", true),
        (r#"sev=~"critical|high""#, "highest", false),
        (r#"sev=~"critical|high""#, "critical|high", false),
        ("x=~a|b.", "ab", false),
        ("x=~a|b.", "a", true),
        ("x!~a|b.", "ab", true),
    ];
    for (input, value, hit) in cases {
        let m = Matcher::parse(input).unwrap();
        assert_eq!(m.matches_value(value), hit, "{input} on {value:?}");
    }
}

/// Alertmanager compiles regexes with Go's `regexp` (RE2 syntax), whose
/// documented meaning differs from the Rust `regex` crate's defaults in a few
/// places (see Go's regexp/syntax documentation). A pattern means here what
/// it means there.
#[test]
fn regexes_mean_what_go_makes_of_them() {
    let cases = [
        // `\d`, `\w`, `\s` and `\b` are ASCII in Go.
        (r"x=~\d", "7", true),
        (r"x=~\d", "٣", false),
        (r"x=~\D", "٣", true),
        (r"x=~\w+", "abc_9", true),
        (r"x=~\w+", "é", false),
        (r"x=~\W", "é", true),
        (r"x=~a\sb", "a\tb", true),
        (r"x=~a\sb", "a\u{a0}b", false),
        (r"x=~a\Sb", "a\u{a0}b", true),
        (r"x=~a\sb", "a\u{0b}b", false),
        (r"x=~[\d]+", "12", true),
        (r"x=~[^\d]", "5", false),
        (r"x=~.*\bé", "aé", true),
        (r"x=~a\Bb", "ab", true),
        // `\<` and `\>` are plain characters in Go.
        (r"x=~\<a\>", "<a>", true),
        // Inside a class `[`, `&` and `~` are literals in Go, not nesting
        // or set operations.
        (r"x=~[[a]+", "[a[", true),
        (r"x=~[a&&b]", "&", true),
        (r"x=~[a~~b]", "~", true),
        (r"x=~[[:digit:]x]", "x", true),
        // `\Q...\E` quotes a literal.
        (r"x=~\Qa.b\E", "a.b", true),
        (r"x=~\Qa.b\E", "axb", false),
        (r"x=~\Q(\E", "(", true),
        // Case folding and `(?s)` behave alike.
        (r"x=~(?i)ABC", "abc", true),
    ];
    for (input, value, hit) in cases {
        let m = Matcher::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(m.matches_value(value), hit, "{input} on {value:?}");
    }
}

/// What Go's regexp refuses is refused here, rather than read with the Rust
/// crate's extensions; and what neither reads is refused with the reason.
#[test]
fn regex_syntax_go_refuses_is_refused() {
    for input in [
        r"x=~(?x)a b",
        r"x=~(?u)a",
        r"x=~(?R)a",
        r"x=~\u0041",
        r"x=~\U00000041",
        "x=~a{1001}",
        "x=~a{2,1001}",
        r"x=~[a--b]",
        // `\Q` without `\E` swallows the `)$` of `^(?:...)$`.
        r"x=~\Q(",
        r#"x=~"invalid[regexp""#,
        // Escapes the anchors in Alertmanager (`^(?:a)|(b)$`); refused here.
        r#"x=~"a)|(b""#,
    ] {
        let err = Matcher::parse(input).expect_err(input);
        assert!(
            err.to_string().starts_with("invalid regex"),
            "{input}: {err}"
        );
    }
    assert!(Matcher::parse("x=~a{1000}").is_ok());
    assert!(Matcher::parse("x=~a{2,}").is_ok());
}
