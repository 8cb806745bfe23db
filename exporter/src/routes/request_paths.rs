//! Request paths as Werkzeug makes them from a request target, and
//! prometheus-flask-exporter's `excluded_paths` matched against them.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use regex::RegexSet;

/// What Werkzeug makes `request.path` from a request target: no query or
/// fragment, percent-decoded as UTF-8 (invalid bytes replaced), one leading
/// slash.
/// Borrows from `target` when it is already that (the usual case), so
/// labelling a request allocates nothing.
pub fn request_path(target: &str) -> Cow<'_, str> {
    // Absolute-form targets ("http://host/path") carry scheme and authority.
    let target = match target.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    match percent_decode_str(&target[..end]).decode_utf8_lossy() {
        Cow::Borrowed(path) if path.starts_with('/') && !path.starts_with("//") => {
            Cow::Borrowed(path)
        }
        decoded => Cow::Owned(format!("/{}", decoded.trim_start_matches('/'))),
    }
}

/// Requests not counted (`--excluded-paths`): prometheus-flask-exporter's
/// `excluded_paths`, each pattern matched from the start of `request.path`
/// as Python's `re.match` matches.
#[derive(Clone, Debug, Default)]
pub struct ExcludedPaths(Option<RegexSet>);

impl ExcludedPaths {
    pub fn new(patterns: &[String]) -> Result<Self, regex::Error> {
        if patterns.is_empty() {
            return Ok(ExcludedPaths(None));
        }
        let anchored = patterns.iter().map(|pattern| format!("^(?:{pattern})"));
        Ok(ExcludedPaths(Some(RegexSet::new(anchored)?)))
    }

    pub fn excludes(&self, path: &str) -> bool {
        self.0.as_ref().is_some_and(|set| set.is_match(path))
    }
}
