//! Why a rule was refused, and the bounds on a rule's size (rules come
//! from pod annotations, which anyone who may create a pod writes).

use super::regexes::RegexRefused;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("malformed rule {0:?}: it must start with '/'")]
    NoLeadingSlash(String),
    #[error("malformed rule {rule:?} at {at:?}")]
    Malformed { rule: String, at: String },
    #[error("rule {rule:?}: unknown converter {converter:?}")]
    UnknownConverter { rule: String, converter: String },
    #[error("rule {rule:?}: bad converter arguments {arguments:?}")]
    BadArguments { rule: String, arguments: String },
    #[error("rule {rule:?}: unknown HTTP method {method:?}")]
    BadMethod { rule: String, method: String },
    #[error("rule of {bytes} bytes starting {start:?}: longer than {MAX_RULE_BYTES}")]
    TooLong { start: String, bytes: usize },
    #[error("rule {rule:?}: more than {MAX_RULE_PARTS} parts")]
    TooManyParts { rule: String },
    #[error("rule {rule:?}: {refused}")]
    Regex { rule: String, refused: RegexRefused },
}

/// Longest rule line accepted (rules can come from pod annotations, which
/// anyone who may create a pod writes).
pub const MAX_RULE_BYTES: usize = 1024;

/// Most `/`-separated parts in one rule: it bounds the matcher's depth.
pub const MAX_RULE_PARTS: usize = 32;
