//! A rule's text split into the parts Werkzeug's state machine walks:
//! static text, and dynamic parts with their converter and weight.

use regex_automata::meta::Regex;

use super::{
    converters::{Check, ConverterError, converter},
    error::RuleError,
    regexes::{RegexCache, RegexRefused},
};

/// Werkzeug's `Weighting`: how dynamic transitions are ordered (smaller
/// first). Field order is comparison order, as Python compares tuples.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Weighting {
    pub(super) negative_static_count: i64,
    pub(super) static_weights: Vec<(i64, i64)>,
    pub(super) negative_argument_count: i64,
    pub(super) argument_weights: Vec<i64>,
}

#[derive(Clone, Debug)]
pub(super) struct DynamicPart {
    /// The regex source: with the flags below, what makes two rules share a
    /// transition.
    pub(super) content: String,
    pub(super) regex: Regex,
    /// Consumes all remaining parts (a `path` converter is in it).
    pub(super) is_final: bool,
    /// Ends in an optional slash that turns into a redirect.
    pub(super) suffixed: bool,
    pub(super) weight: Weighting,
    pub(super) checks: Vec<Check>,
}

impl PartialEq for DynamicPart {
    fn eq(&self, other: &Self) -> bool {
        self.content == other.content
            && self.is_final == other.is_final
            && self.suffixed == other.suffixed
            && self.weight == other.weight
    }
}

#[derive(Clone, Debug)]
pub(super) enum Part {
    Static(String),
    Dynamic(DynamicPart),
}

/// `rule` split at slashes into static and dynamic parts (Werkzeug's
/// `Rule._parse_rule`).
pub(super) fn parse_parts(rule: &str, regexes: &mut RegexCache) -> Result<Vec<Part>, RuleError> {
    let mut parser = PartParser::new(rule, regexes);
    let mut rest = rule;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('/') {
            rest = after;
            parser.slash()?;
        } else if let Some(after) = rest.strip_prefix('<') {
            let end = after.find('>').ok_or_else(|| parser.malformed(rest))?;
            parser.converter(&after[..end])?;
            rest = &after[end + 1..];
        } else {
            let end = rest.find(['/', '<']).unwrap_or(rest.len());
            parser.static_text(&rest[..end]);
            rest = &rest[end..];
        }
    }
    parser.end()
}

/// The part of a rule being read, and the parts before it.
pub(super) struct PartParser<'a> {
    pub(super) rule: &'a str,
    /// The rule set's compiled regexes.
    pub(super) regexes: &'a mut RegexCache,
    pub(super) parts: Vec<Part>,
    /// The part's text, or once it has a converter, its regex source.
    pub(super) content: String,
    pub(super) is_static: bool,
    /// A slash-matching converter (`path`) makes this the last part: it
    /// takes the slashes after it.
    pub(super) is_final: bool,
    pub(super) static_weights: Vec<(i64, i64)>,
    pub(super) argument_weights: Vec<i64>,
    pub(super) checks: Vec<Check>,
}

impl<'a> PartParser<'a> {
    pub(super) fn new(rule: &'a str, regexes: &'a mut RegexCache) -> Self {
        PartParser {
            rule,
            regexes,
            parts: Vec::new(),
            content: String::new(),
            is_static: true,
            is_final: false,
            static_weights: Vec::new(),
            argument_weights: Vec::new(),
            checks: Vec::new(),
        }
    }

    pub(super) fn malformed(&self, at: &str) -> RuleError {
        RuleError::Malformed {
            rule: self.rule.to_owned(),
            at: at.to_owned(),
        }
    }

    /// A `/`: ends the part, unless a `path` converter takes it.
    pub(super) fn slash(&mut self) -> Result<(), RuleError> {
        if self.is_final {
            self.content.push('/');
            return Ok(());
        }
        let part = self.finish(false)?;
        self.parts.push(part);
        Ok(())
    }

    /// Text between slashes and converters.
    pub(super) fn static_text(&mut self, text: &str) {
        let position = self.static_weights.len() as i64;
        self.static_weights
            .push((position, -(text.chars().count() as i64)));
        if self.is_static {
            self.content.push_str(text);
        } else {
            self.content.push_str(&regex::escape(text));
        }
    }

    /// `<converter(arguments):variable>`, given what is inside the brackets.
    pub(super) fn converter(&mut self, inside: &str) -> Result<(), RuleError> {
        let (converter_name, arguments, variable) = match inside.split_once(':') {
            Some((head, variable)) => match head.split_once('(') {
                Some((name, arguments)) => (
                    name,
                    arguments
                        .strip_suffix(')')
                        .ok_or_else(|| self.malformed(inside))?,
                    variable,
                ),
                None => (head, "", variable),
            },
            None => ("default", "", inside),
        };
        let identifier = |text: &str| {
            text.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && text.chars().all(|c| c.is_alphanumeric() || c == '_')
        };
        if !identifier(variable) || !identifier(converter_name) {
            return Err(self.malformed(inside));
        }
        let converter = converter(converter_name, arguments).map_err(|error| match error {
            ConverterError::Unknown => RuleError::UnknownConverter {
                rule: self.rule.to_owned(),
                converter: converter_name.to_owned(),
            },
            ConverterError::BadArguments => RuleError::BadArguments {
                rule: self.rule.to_owned(),
                arguments: arguments.to_owned(),
            },
        })?;
        if self.is_static {
            self.content = regex::escape(&self.content);
        }
        self.is_static = false;
        if !converter.part_isolating {
            self.is_final = true;
        }
        let number = self.checks.len();
        self.content
            .push_str(&format!("(?P<c{number}>{})", converter.regex));
        self.argument_weights.push(converter.weight);
        self.checks.push(converter.check);
        Ok(())
    }

    /// The part read so far; the next one starts empty and static.
    pub(super) fn finish(&mut self, suffixed: bool) -> Result<Part, RuleError> {
        let content = std::mem::take(&mut self.content);
        let static_weights = std::mem::take(&mut self.static_weights);
        let argument_weights = std::mem::take(&mut self.argument_weights);
        let checks = std::mem::take(&mut self.checks);
        let is_static = std::mem::replace(&mut self.is_static, true);
        if is_static {
            return Ok(Part::Static(content));
        }
        let weight = Weighting {
            negative_static_count: -(static_weights.len() as i64),
            static_weights,
            negative_argument_count: -(argument_weights.len() as i64),
            argument_weights,
        };
        let source = format!("^(?:{content})\\z");
        let regex = self
            .regexes
            .compile(&source)
            .map_err(|refused| match refused {
                RegexRefused::Malformed => self.malformed(&content),
                refused => RuleError::Regex {
                    rule: self.rule.to_owned(),
                    refused,
                },
            })?;
        Ok(Part::Dynamic(DynamicPart {
            content,
            regex,
            is_final: suffixed || self.is_final,
            suffixed,
            weight,
            checks,
        }))
    }

    /// The parts of the whole rule.
    pub(super) fn end(mut self) -> Result<Vec<Part>, RuleError> {
        // A slash-matching converter followed by a final slash: the slash is
        // optional and, when missing, a redirect (Werkzeug's `suffixed`).
        let suffixed = self.is_final && self.content.ends_with('/');
        if suffixed {
            self.content.pop();
            self.content.push_str("(?P<slash>/?)");
        }
        let part = self.finish(suffixed)?;
        self.parts.push(part);
        if suffixed {
            self.parts.push(Part::Static(String::new()));
        }
        Ok(self.parts)
    }
}
