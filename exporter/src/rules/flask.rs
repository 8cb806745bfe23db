//! User routes in Flask's rule syntax (`/items/<int:item_id>`), matched the
//! way Werkzeug's router matches them (werkzeug/routing/matcher.py, 3.x): a
//! state machine over `/`-separated parts where static transitions are tried
//! before dynamic ones, dynamic ones in converter-weight order, converters
//! that match slashes (`path`) consume the rest, and a rule ending in `/`
//! answers a request without it with a redirect, not a match. A rule's
//! text is split into parts by `parts.rs`, with Werkzeug's converters from
//! `converters.rs`.

use std::collections::{BTreeSet, HashMap};

pub use super::error::{MAX_RULE_BYTES, MAX_RULE_PARTS, RuleError};
use super::{
    converters::Check,
    parts::{DynamicPart, Part, parse_parts},
    regexes::{MAX_SET_REGEX_BYTES, RegexCache, SharedBudgets},
};

/// The label of requests no rule matched, as prometheus-flask-exporter's
/// `group_by='url_rule'` has it (`str(None)`).
pub const NO_RULE: &str = "None";

/// One user rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The rule as written: the label of the requests it matches.
    pub text: String,
    /// `None`: every method.
    methods: Option<BTreeSet<String>>,
    /// Werkzeug's `strict_slashes`: false lets `/x` match `/x/` (and `/x/`
    /// match `/x`) instead of redirecting.
    strict_slashes: bool,
    /// Flask's endpoint of the rule (`request.endpoint`), when known: rules
    /// read from the source have it, user rules do not.
    pub endpoint: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    static_next: HashMap<String, State>,
    dynamic_next: Vec<(DynamicPart, State)>,
    rules: Vec<usize>,
}

/// How a request fared against the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMatch<'a> {
    Rule(&'a str),
    /// No rule matches the path, or it does only with another method, or
    /// only with a trailing slash (Werkzeug redirects): Flask has no
    /// `url_rule` for it.
    NoRule,
}

/// A set of user rules, matched as one Werkzeug `Map`.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    root: State,
    regexes: RegexCache,
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl RuleSet {
    /// Parses rules, one a line: `[METHOD,METHOD ]RULE`; `#` starts a
    /// comment. Without methods a rule takes every method; with them, HEAD
    /// comes with GET and OPTIONS with any, as Flask adds them.
    pub fn parse(text: &str) -> (RuleSet, Vec<RuleError>) {
        RuleSet::default().with_lines(text)
    }

    /// As [`RuleSet::parse`], its regexes counted against `shared` too.
    pub fn parse_within(text: &str, shared: SharedBudgets) -> (RuleSet, Vec<RuleError>) {
        RuleSet::counted_in(shared).with_lines(text)
    }

    /// An empty set whose regexes count against `shared` (its workload's
    /// and the node's budgets) as well as the set's own budget.
    pub fn counted_in(shared: SharedBudgets) -> RuleSet {
        RuleSet {
            regexes: RegexCache::new(MAX_SET_REGEX_BYTES, shared),
            ..RuleSet::default()
        }
    }

    /// Bytes the set's compiled regexes take.
    pub fn regex_bytes(&self) -> usize {
        self.regexes.bytes()
    }

    fn with_lines(self, text: &str) -> (RuleSet, Vec<RuleError>) {
        let mut set = self;
        let mut errors = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            if let Err(error) = set.add_line(line) {
                errors.push(error);
            }
        }
        set.finish();
        (set, errors)
    }

    /// Orders the matcher as Werkzeug's `Map.update()` does, once the rules
    /// are in.
    pub fn finish(&mut self) {
        self.root.sort();
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn rules(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| rule.text.as_str())
    }

    fn add_line(&mut self, line: &str) -> Result<(), RuleError> {
        if line.len() > MAX_RULE_BYTES {
            return Err(RuleError::TooLong {
                start: line.chars().take(40).collect(),
                bytes: line.len(),
            });
        }
        let (methods, text) = match line.split_once(char::is_whitespace) {
            Some((methods, rule)) if !methods.starts_with('/') => (Some(methods), rule.trim()),
            _ => (None, line),
        };
        if !text.starts_with('/') {
            return Err(RuleError::NoLeadingSlash(text.to_owned()));
        }
        let methods = methods.map(|list| list.split(',').map(str::trim).collect::<Vec<_>>());
        self.add(text, methods.as_deref(), true, None)
    }

    /// Adds one rule; without methods it takes every method, with them HEAD
    /// comes with GET and OPTIONS with any. Call [`RuleSet::finish`] after
    /// the last.
    pub fn add(
        &mut self,
        text: &str,
        methods: Option<&[&str]>,
        strict_slashes: bool,
        endpoint: Option<&str>,
    ) -> Result<(), RuleError> {
        if text.len() > MAX_RULE_BYTES {
            return Err(RuleError::TooLong {
                start: text.chars().take(40).collect(),
                bytes: text.len(),
            });
        }
        if !text.starts_with('/') {
            return Err(RuleError::NoLeadingSlash(text.to_owned()));
        }
        let methods = match methods {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for method in list.iter().map(|m| m.to_ascii_uppercase()) {
                    if !METHODS.contains(&method.as_str()) {
                        return Err(RuleError::BadMethod {
                            rule: text.to_owned(),
                            method,
                        });
                    }
                    set.insert(method);
                }
                if set.contains("GET") {
                    set.insert("HEAD".to_owned());
                }
                set.insert("OPTIONS".to_owned());
                Some(set)
            }
        };
        // Werkzeug merges repeated slashes in rules.
        let mut merged = String::with_capacity(text.len());
        for c in text.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        let parts = parse_parts(&merged, &mut self.regexes)?;
        if parts.len() > MAX_RULE_PARTS {
            return Err(RuleError::TooManyParts {
                rule: text.chars().take(80).collect(),
            });
        }
        let index = self.rules.len();
        self.rules.push(Rule {
            text: text.to_owned(),
            methods,
            strict_slashes,
            endpoint: endpoint.map(str::to_owned),
        });
        let mut state = &mut self.root;
        for part in parts {
            state = match part {
                Part::Static(text) => state.static_next.entry(text).or_default(),
                Part::Dynamic(part) => {
                    let position = state
                        .dynamic_next
                        .iter()
                        .position(|(test, _)| *test == part);
                    let position = position.unwrap_or_else(|| {
                        state.dynamic_next.push((part, State::default()));
                        state.dynamic_next.len() - 1
                    });
                    &mut state.dynamic_next[position].1
                }
            };
        }
        state.rules.push(index);
        Ok(())
    }

    /// Matches a request path (as `request.path` has it: decoded, one
    /// leading slash) and method.
    pub fn match_path(&self, path: &str, method: &str) -> RuleMatch<'_> {
        match self.matched(path, method) {
            Some(rule) => RuleMatch::Rule(&rule.text),
            None => RuleMatch::NoRule,
        }
    }

    /// The rule a request gets, as [`RuleSet::match_path`] finds it.
    pub fn matched(&self, path: &str, method: &str) -> Option<&Rule> {
        let parts: Vec<&str> = path.split('/').collect();
        let method = method.to_ascii_uppercase();
        match self.walk(&self.root, &parts, &mut Vec::new(), &method) {
            Walk::Matched(rule) => self.rules.get(rule),
            Walk::NoMatch | Walk::SlashRequired | Walk::Failed => None,
        }
    }

    fn rule_takes(&self, rule: usize, method: &str) -> bool {
        self.rules[rule]
            .methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
    }

    fn walk<'s>(
        &'s self,
        state: &'s State,
        parts: &[&str],
        values: &mut Vec<(&'s Check, String)>,
        method: &str,
    ) -> Walk {
        let Some((part, rest)) = parts.split_first() else {
            if let Some(&rule) = state
                .rules
                .iter()
                .find(|&&rule| self.rule_takes(rule, method))
            {
                return self.validated(rule, values);
            }
            if let Some(slashed) = state.static_next.get("")
                && let Some(&rule) = slashed
                    .rules
                    .iter()
                    .find(|&&rule| self.rule_takes(rule, method))
            {
                // Werkzeug redirects to the slash, unless the rule is lax.
                return if self.rules[rule].strict_slashes {
                    Walk::SlashRequired
                } else {
                    self.validated(rule, values)
                };
            }
            return Walk::NoMatch;
        };
        if let Some(next) = state.static_next.get(*part) {
            match self.walk(next, rest, values, method) {
                Walk::NoMatch => {}
                done => return done,
            }
        }
        for (test, next) in &state.dynamic_next {
            let joined;
            let (target, mut remaining): (&str, &[&str]) = if test.is_final {
                joined = parts.join("/");
                (joined.as_str(), &[])
            } else {
                (part, rest)
            };
            let mut captures = test.regex.create_captures();
            test.regex.captures(target, &mut captures);
            if !captures.is_match() {
                continue;
            }
            let text_of = |name: &str| {
                captures
                    .get_group_by_name(name)
                    .and_then(|span| target.get(span.range()))
            };
            if test.suffixed {
                let slash = captures.get_group_by_name("slash");
                // Werkzeug's `(?<!/)`: the text before the optional slash
                // must not end in one.
                let before = slash.map_or(target.len(), |span| span.start);
                if target[..before].ends_with('/') {
                    continue;
                }
                if text_of("slash") == Some("/") {
                    remaining = &[""];
                }
            }
            let pushed = test.checks.len();
            for (index, check) in test.checks.iter().enumerate() {
                let value = text_of(&format!("c{index}")).unwrap_or_default().to_owned();
                values.push((check, value));
            }
            let outcome = self.walk(next, remaining, values, method);
            values.truncate(values.len() - pushed);
            match outcome {
                Walk::NoMatch => {}
                done => return done,
            }
        }
        // A trailing slash a lax rule lacks still matches it.
        if parts == [""]
            && let Some(&rule) = state
                .rules
                .iter()
                .find(|&&rule| !self.rules[rule].strict_slashes && self.rule_takes(rule, method))
        {
            return self.validated(rule, values);
        }
        Walk::NoMatch
    }

    /// Werkzeug converts values only after the whole match: a value that
    /// fails (e.g. `int(max=10)`) fails the request, it does not try other
    /// rules.
    fn validated(&self, rule: usize, values: &[(&Check, String)]) -> Walk {
        if values.iter().all(|(check, value)| check.accepts(value)) {
            Walk::Matched(rule)
        } else {
            Walk::Failed
        }
    }
}

enum Walk {
    Matched(usize),
    NoMatch,
    SlashRequired,
    /// Matched, then a converter rejected a value: no rule for the request.
    Failed,
}

impl State {
    /// Werkzeug's `update()`: dynamic transitions by weight; the sort is
    /// stable, as Python's, so equal weights keep the order rules came in.
    fn sort(&mut self) {
        self.dynamic_next
            .sort_by(|(a, _), (b, _)| a.weight.cmp(&b.weight));
        for next in self.static_next.values_mut() {
            next.sort();
        }
        for (_, next) in &mut self.dynamic_next {
            next.sort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::regexes::RegexRefused;

    fn label<'a>(rules: &'a RuleSet, method: &str, path: &str) -> &'a str {
        match rules.match_path(path, method) {
            RuleMatch::Rule(rule) => rule,
            RuleMatch::NoRule => NO_RULE,
        }
    }

    #[test]
    fn rules_file_syntax_and_errors() {
        let (rules, errors) = RuleSet::parse(
            "# comment\nGET /a/<int:id>\n\n/any/<x>   # every method\nGET,POST /b\nBREW /pot\nitems\n/c/<nope:x>\n/d/<int(min=oops):x>\n/e/<int:x\n",
        );
        assert_eq!(
            rules.rules().collect::<Vec<_>>(),
            ["/a/<int:id>", "/any/<x>", "/b"]
        );
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(matches!(errors[0], RuleError::BadMethod { .. }));
        assert!(matches!(errors[1], RuleError::NoLeadingSlash(_)));
        assert!(matches!(errors[2], RuleError::UnknownConverter { .. }));
        assert!(matches!(errors[3], RuleError::BadArguments { .. }));
        assert!(matches!(errors[4], RuleError::Malformed { .. }));
        // HEAD comes with GET, OPTIONS with every rule, as Flask adds them.
        assert_eq!(label(&rules, "HEAD", "/a/1"), "/a/<int:id>");
        assert_eq!(label(&rules, "OPTIONS", "/b"), "/b");
        assert_eq!(label(&rules, "DELETE", "/a/1"), NO_RULE);
        assert_eq!(label(&rules, "PATCH", "/any/thing"), "/any/<x>");
    }

    #[test]
    fn werkzeug_ordering_and_slashes() {
        let (rules, errors) = RuleSet::parse(
            "/x/<path:p>\n/x/<int:n>\n/x/new\n/y/<a>-<b>\n/y/<a>\n/z/\n/w/<path:p>/\n/v/<string(length=2):c>\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        // Static first, then the lighter converter, then `path`.
        assert_eq!(label(&rules, "GET", "/x/new"), "/x/new");
        assert_eq!(label(&rules, "GET", "/x/42"), "/x/<int:n>");
        assert_eq!(label(&rules, "GET", "/x/a/b"), "/x/<path:p>");
        // More static text in a part wins.
        assert_eq!(label(&rules, "GET", "/y/a-b"), "/y/<a>-<b>");
        assert_eq!(label(&rules, "GET", "/y/ab"), "/y/<a>");
        // A rule ending in '/' redirects a request without it.
        assert_eq!(label(&rules, "GET", "/z/"), "/z/");
        assert_eq!(label(&rules, "GET", "/z"), NO_RULE);
        assert_eq!(label(&rules, "GET", "/w/a/b/"), "/w/<path:p>/");
        assert_eq!(label(&rules, "GET", "/w/a/b"), NO_RULE);
        assert_eq!(label(&rules, "GET", "/v/fr"), "/v/<string(length=2):c>");
        assert_eq!(label(&rules, "GET", "/v/fra"), NO_RULE);
    }

    #[test]
    fn hostile_rules_are_refused_and_the_rest_apply() {
        let deep: String = (0..100_000).map(|n| format!("/s{n}")).collect();
        let many_parts: String = (0..40).map(|n| format!("/p{n}")).collect();
        let text = format!(
            "GET /ok/<int:id>\n{deep}\n{many_parts}\n/big/<string(length=100000000):x>\n/huge/<string(minlength=60000,maxlength=60001):x>\n"
        );
        let (rules, errors) = RuleSet::parse(&text);
        assert_eq!(rules.rules().collect::<Vec<_>>(), ["/ok/<int:id>"]);
        assert!(matches!(errors[0], RuleError::TooLong { .. }), "{errors:?}");
        assert!(
            matches!(errors[1], RuleError::TooManyParts { .. }),
            "{errors:?}"
        );
        for error in &errors[2..4] {
            assert!(
                matches!(
                    error,
                    RuleError::Regex {
                        refused: RegexRefused::TooBig,
                        ..
                    }
                ),
                "{errors:?}"
            );
        }
        assert_eq!(label(&rules, "GET", "/ok/7"), "/ok/<int:id>");
    }

    /// Rules of a set share the regex of one source: a thousand rules with
    /// the same converter take the memory of one.
    #[test]
    fn rules_share_the_regex_of_one_source() {
        let one = RuleSet::parse("/a0/<int:id>").0.regex_bytes();
        let text: String = (0..1000).map(|n| format!("/a{n}/<int:id>\n")).collect();
        let (rules, errors) = RuleSet::parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(one > 0);
        assert_eq!(rules.regex_bytes(), one);
        assert_eq!(label(&rules, "GET", "/a999/7"), "/a999/<int:id>");
    }

    /// Rule sets read from pods share the node's budget: past it a rule is
    /// refused (the rest of its set applies), and a set that goes gives
    /// its memory back.
    #[test]
    fn the_node_budget_is_shared_and_given_back() {
        let distinct = |prefix: &str| -> String {
            (1..=40)
                .map(|n| format!("/{prefix}{n}/<string(length={n}):x>\n"))
                .collect()
        };
        let alone = RuleSet::parse(&distinct("a")).0.regex_bytes();
        let memory = super::super::regexes::RegexMemory::with_limit(alone + alone / 2);
        let node = || SharedBudgets {
            workload: None,
            node: Some(memory.clone()),
        };
        let (first, errors) = RuleSet::parse_within(&distinct("a"), node());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(memory.used(), first.regex_bytes());
        let (second, errors) = RuleSet::parse_within(&distinct("b"), node());
        assert!(!errors.is_empty() && second.len() < 40 && !second.is_empty());
        assert!(errors.iter().all(|error| matches!(
            error,
            RuleError::Regex {
                refused: RegexRefused::NodeBudget,
                ..
            }
        )));
        assert!(memory.used() <= alone + alone / 2);
        drop((first, second));
        assert_eq!(memory.used(), 0);
        let (again, errors) = RuleSet::parse_within(&distinct("b"), node());
        assert!(errors.is_empty() && again.len() == 40);
    }
}
