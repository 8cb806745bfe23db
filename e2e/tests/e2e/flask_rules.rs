//! User routes are matched as Flask's router matches them: the exporter's
//! matcher against real Werkzeug (tests/fixtures/print_rules.py's `--match`
//! asks routes_app's own url_map) on thousands of randomized
//! requests.

use flask_ebpf_exporter_e2e as support;

use flask_ebpf_exporter::{
    routes::request_path,
    rules::flask::{NO_RULE, RuleMatch, RuleSet},
};
use support::{routes_traffic::Traffic, *};

#[test]
fn matches_as_werkzeug_does() {
    let venv = require_prerequisites();
    let rules_text = flask_oracle(&venv, "routes_app:app", &[], "");
    let (rules, errors) = RuleSet::parse(&rules_text);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(rules.len(), rules_text.lines().count());

    let mut traffic = Traffic::new(7);
    let mut requests: Vec<(String, String)> = Vec::new();
    for _ in 0..4000 {
        let request = traffic.next_request();
        requests.push((
            request.method.to_owned(),
            request_path(&request.target).into_owned(),
        ));
    }
    for _ in 0..500 {
        let request = traffic.random_url();
        requests.push((
            request.method.to_owned(),
            request_path(&request.target).into_owned(),
        ));
    }
    let input: String = requests
        .iter()
        .map(|(method, path)| format!("{method} {path}\n"))
        .collect();
    let werkzeug: Vec<String> = flask_oracle(&venv, "routes_app:app", &["--match"], &input)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(werkzeug.len(), requests.len());

    let mut mismatches = Vec::new();
    let mut matched = 0;
    for ((method, path), expected) in requests.iter().zip(&werkzeug) {
        let ours = match rules.match_path(path, method) {
            RuleMatch::Rule(rule) => rule,
            RuleMatch::NoRule => NO_RULE,
        };
        if ours != expected {
            mismatches.push(format!("{method} {path}: werkzeug {expected}, ours {ours}"));
        }
        if expected != NO_RULE {
            matched += 1;
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // The traffic exercised both sides.
    assert!(
        matched > 2500 && matched < requests.len() - 500,
        "{matched}"
    );
}
