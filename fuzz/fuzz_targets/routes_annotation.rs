//! A pod's routes annotation, written by anyone who may create a pod.
#![no_main]

use flask_ebpf_exporter::identity::pods::{MAX_ANNOTATION_RULES, parse_routes_annotation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (routes, _) = parse_routes_annotation(text);
    assert!(routes.rules.len() <= MAX_ANNOTATION_RULES);
});
