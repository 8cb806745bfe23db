//! User routes are matched as Flask's router matches them: the exporter's
//! matcher against real Werkzeug (via tests/fixtures/routes_app.py, whose
//! `--match` mode asks the app's own url_map) on thousands of randomized
//! requests.

mod support;

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use flask_ebpf_exporter::routes::{
    flask_rules::{NO_RULE, RuleMatch, RuleSet},
    request_path,
};
use support::{routes_traffic::Traffic, *};

fn app(venv: &std::path::Path, args: &[&str], input: &str) -> String {
    let mut child = Command::new(venv.join("bin/python"))
        .arg(workspace().join("tests/fixtures/routes_app.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("UTF-8")
}

#[test]
fn matches_as_werkzeug_does() {
    let venv = require_prerequisites();
    let rules_text = app(&venv, &["--rules"], "");
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
    let werkzeug: Vec<String> = app(&venv, &["--match"], &input)
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
