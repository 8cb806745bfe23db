//! The `path` label: the request path as Flask's `request.path` has it
//! (`raw`), or a low-cardinality template of it (`route`), with a hard cap on
//! distinct values per server.

pub mod flask_rules;

use std::collections::{HashMap, HashSet};

use percent_encoding::percent_decode_str;

use crate::identity::IdentityLabels;

/// How the `path` label is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathLabelMode {
    /// The decoded request path without its query string, exactly as
    /// prometheus-flask-exporter's default.
    Raw,
    /// A template: ids, UUIDs, hashes, numbers and dates become parameters.
    Route,
}

/// The value used once a server has more distinct paths than allowed.
pub const OVERFLOW_PATH: &str = "<other>";

/// What Werkzeug makes `request.path` from a request target: no query or
/// fragment, percent-decoded as UTF-8 (invalid bytes replaced), one leading
/// slash.
pub fn request_path(target: &str) -> String {
    // Absolute-form targets ("http://host/path") carry scheme and authority.
    let target = match target.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let decoded = percent_decode_str(&target[..end]).decode_utf8_lossy();
    format!("/{}", decoded.trim_start_matches('/'))
}

/// Replaces the segments that look like values with Flask-style parameters.
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            out.push('/');
        }
        out.push_str(classify_segment(segment).unwrap_or(segment));
    }
    out
}

fn classify_segment(segment: &str) -> Option<&'static str> {
    if segment.is_empty() {
        return None;
    }
    let bytes = segment.as_bytes();
    if bytes.iter().all(u8::is_ascii_digit) {
        return Some("<int>");
    }
    if is_uuid(segment) {
        return Some("<uuid>");
    }
    if is_date(bytes) {
        return Some("<date>");
    }
    if segment.parse::<f64>().is_ok()
        && bytes.contains(&b'.')
        && bytes
            .iter()
            .all(|b| b.is_ascii_digit() || *b == b'.' || *b == b'-')
    {
        return Some("<float>");
    }
    let has_digit = bytes.iter().any(u8::is_ascii_digit);
    if bytes.len() >= 16 && has_digit && bytes.iter().all(u8::is_ascii_hexdigit) {
        return Some("<hex>");
    }
    let token_chars = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if bytes.len() >= 20 && has_digit && token_chars {
        return Some("<token>");
    }
    None
}

fn is_uuid(segment: &str) -> bool {
    let groups: Vec<&str> = segment.split('-').collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_date(bytes: &[u8]) -> bool {
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// Makes `path` labels and enforces the per-server cap.
#[derive(Debug)]
pub struct RouteLabeler {
    mode: PathLabelMode,
    max_paths_per_server: usize,
    seen: HashMap<IdentityLabels, HashSet<String>>,
    overflowed: u64,
}

impl RouteLabeler {
    pub fn new(mode: PathLabelMode, max_paths_per_server: usize) -> Self {
        RouteLabeler {
            mode,
            max_paths_per_server,
            seen: HashMap::new(),
            overflowed: 0,
        }
    }

    pub fn label(&mut self, identity: &IdentityLabels, target: &str) -> String {
        let path = request_path(target);
        let label = match self.mode {
            PathLabelMode::Raw => path,
            PathLabelMode::Route => template(&path),
        };
        let seen = self.seen.entry(identity.clone()).or_default();
        if seen.contains(&label) {
            return label;
        }
        if seen.len() >= self.max_paths_per_server {
            self.overflowed += 1;
            return OVERFLOW_PATH.to_owned();
        }
        seen.insert(label.clone());
        label
    }

    /// Forgets a server whose series were removed.
    pub fn forget(&mut self, identity: &IdentityLabels) {
        self.seen.remove(identity);
    }

    /// Requests whose path was replaced by [`OVERFLOW_PATH`].
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn request_path_matches_werkzeug() {
        assert_eq!(request_path("/items/5?x=1&y=2"), "/items/5");
        assert_eq!(request_path("/a%20b/%E2%9C%93"), "/a b/✓");
        assert_eq!(request_path("/bad%FFbyte"), "/bad\u{FFFD}byte");
        assert_eq!(request_path("//double/slash"), "/double/slash");
        assert_eq!(request_path("http://example.com/abs?q"), "/abs");
        assert_eq!(request_path("*"), "/*");
        assert_eq!(request_path("/frag#x"), "/frag");
    }

    #[test]
    fn templates_typed_segments() {
        assert_eq!(template("/users/12345/orders"), "/users/<int>/orders");
        assert_eq!(
            template("/u/3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
            "/u/<uuid>"
        );
        assert_eq!(
            template("/blob/9f86d081884c7d659a2feaa0c55ad015"),
            "/blob/<hex>"
        );
        assert_eq!(template("/day/2026-11-25"), "/day/<date>");
        assert_eq!(template("/price/3.25"), "/price/<float>");
        assert_eq!(template("/t/Zm9vYmFyYmF6cXV4MTIzNDU2"), "/t/<token>");
        assert_eq!(template("/static/app.css"), "/static/app.css");
        assert_eq!(template("/"), "/");
    }

    #[test]
    fn distinct_paths_per_server_are_capped() {
        let mut labeler = RouteLabeler::new(PathLabelMode::Raw, 3);
        let server: IdentityLabels = Arc::from(vec!["a".to_owned()]);
        let other: IdentityLabels = Arc::from(vec!["b".to_owned()]);
        let labels: Vec<String> = (0..5)
            .map(|i| labeler.label(&server, &format!("/p{i}")))
            .collect();
        assert_eq!(labels, ["/p0", "/p1", "/p2", OVERFLOW_PATH, OVERFLOW_PATH]);
        assert_eq!(labeler.label(&server, "/p1?again"), "/p1");
        assert_eq!(labeler.label(&other, "/p4"), "/p4");
        assert_eq!(labeler.overflowed(), 2);
    }
}
