//! User rules (flags, files, pod annotations) and the matcher: any text
//! parses to rules or errors, and any path matches or not.
#![no_main]

use arbitrary::Arbitrary;
use flask_ebpf_exporter::rules::flask::{RuleMatch, RuleSet};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    rules: String,
    requests: Vec<(String, String)>,
}

fuzz_target!(|input: Input| {
    let (rules, _) = RuleSet::parse(&input.rules);
    for (method, path) in &input.requests {
        if let RuleMatch::Rule(rule) = rules.match_path(path, method) {
            assert!(rules.rules().any(|known| known == rule));
        }
    }
});
