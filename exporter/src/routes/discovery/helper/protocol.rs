//! What the agent and its route-discovery helper say to each other: one
//! request on the helper's stdin, then lines on its stdout, each a JSON
//! message, every one bounded. The helper is run from the agent's own
//! binary, so both sides are always the same version; the version field
//! still makes a mismatch (a binary replaced under a running agent) a
//! malformed answer rather than a misread one.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::routes::discovery::{
    Discovery, HarvestedRule, ParseBudget,
    entrypoint::{Entrypoint, ProcessStart},
};

pub const VERSION: u32 = 1;

/// Bytes of the helper's answer the agent reads at most; past it the
/// helper is stopped and its answer is malformed.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Rules one answer may hold: as many as a harvest collects.
pub use crate::routes::discovery::harvest::MAX_RULES;
/// Longest rule text, endpoint, file name or reason kept.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Reasons and files one answer may name.
pub const MAX_LISTED: usize = 1024;

/// What the helper is asked.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    /// The descriptor of the process's root, open in the helper.
    pub root_fd: i32,
    /// How the process was started; paths inside its root.
    pub start: ProcessStart,
    pub budget: WireBudget,
    /// The workload's last harvest: when this process runs the same
    /// entrypoint and files, the helper says so and reads nothing more.
    pub previous: Option<Previous>,
}

/// A previous harvest, as much of it as tells whether it still holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Previous {
    pub found: Entrypoint,
    pub files: Vec<(PathBuf, Option<super::super::FileStamp>)>,
}

/// [`ParseBudget`], with its time in milliseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct WireBudget {
    pub files: usize,
    pub bytes: usize,
    pub file_bytes: usize,
    pub time_ms: u64,
}

impl From<ParseBudget> for WireBudget {
    fn from(budget: ParseBudget) -> Self {
        WireBudget {
            files: budget.files,
            bytes: budget.bytes,
            file_bytes: budget.file_bytes,
            time_ms: u64::try_from(budget.time.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl From<WireBudget> for ParseBudget {
    fn from(budget: WireBudget) -> Self {
        ParseBudget {
            files: budget.files,
            bytes: budget.bytes,
            file_bytes: budget.file_bytes,
            time: Duration::from_millis(budget.time_ms),
        }
    }
}

/// One line of the helper's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// About to read this file: if the helper dies now, the file is one of
    /// those that decide whether to try the workload again.
    Reading(PathBuf),
    /// The same entrypoint and files as the previous harvest.
    Unchanged,
    /// What was found.
    Harvested(Box<Discovery>),
}

/// Why an answer is not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a line that is not a message: {0}")]
    Syntax(String),
    #[error("{0} rules, more than {MAX_RULES}")]
    TooManyRules(usize),
    #[error("{0} entries, more than {MAX_LISTED}")]
    TooManyEntries(usize),
    #[error("a text of {0} bytes, more than {MAX_TEXT_BYTES}")]
    TooLong(usize),
    #[error("no answer")]
    Missing,
}

/// Reads one line of the answer.
pub fn parse(line: &str) -> Result<Message, Malformed> {
    let message: Message =
        serde_json::from_str(line).map_err(|error| Malformed::Syntax(error.to_string()))?;
    if let Message::Harvested(discovery) = &message {
        check(discovery)?;
    }
    Ok(message)
}

/// Holds an answer to the bounds above.
fn check(discovery: &Discovery) -> Result<(), Malformed> {
    if discovery.rules.len() > MAX_RULES {
        return Err(Malformed::TooManyRules(discovery.rules.len()));
    }
    let listed = discovery.unresolved.len().max(discovery.files.len());
    if listed > MAX_LISTED {
        return Err(Malformed::TooManyEntries(listed));
    }
    let rule_texts = discovery.rules.iter().flat_map(|rule: &HarvestedRule| {
        [
            rule.rule.len(),
            rule.endpoint.len(),
            rule.file.as_os_str().len(),
        ]
        .into_iter()
        .chain(rule.methods.iter().map(String::len))
    });
    let other_texts = discovery
        .unresolved
        .iter()
        .map(String::len)
        .chain(
            discovery
                .files
                .iter()
                .map(|(path, _)| path.as_os_str().len()),
        )
        .chain(discovery.entrypoint.iter().map(String::len));
    match rule_texts
        .chain(other_texts)
        .find(|&len| len > MAX_TEXT_BYTES)
    {
        Some(len) => Err(Malformed::TooLong(len)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_past_their_bounds_are_malformed() {
        let rule = HarvestedRule {
            rule: "/items/<int:id>".to_owned(),
            methods: ["GET".to_owned()].into(),
            endpoint: "item".to_owned(),
            strict_slashes: true,
            file: "/srv/app.py".into(),
            line: 3,
        };
        let answer = |discovery: Discovery| {
            serde_json::to_string(&Message::Harvested(Box::new(discovery))).expect("JSON")
        };
        let good = Discovery {
            rules: vec![rule.clone()],
            ..Discovery::default()
        };
        assert!(matches!(parse(&answer(good)), Ok(Message::Harvested(_))));
        let many = Discovery {
            rules: vec![rule.clone(); MAX_RULES + 1],
            ..Discovery::default()
        };
        assert_eq!(
            parse(&answer(many)).err(),
            Some(Malformed::TooManyRules(MAX_RULES + 1))
        );
        let long = Discovery {
            rules: vec![HarvestedRule {
                rule: "/a".repeat(MAX_TEXT_BYTES),
                ..rule
            }],
            ..Discovery::default()
        };
        assert_eq!(
            parse(&answer(long)).err(),
            Some(Malformed::TooLong(2 * MAX_TEXT_BYTES))
        );
        assert!(matches!(
            parse("{\"Harvested\":"),
            Err(Malformed::Syntax(_))
        ));
        assert!(matches!(parse("\"Unchanged\""), Ok(Message::Unchanged)));
    }
}
