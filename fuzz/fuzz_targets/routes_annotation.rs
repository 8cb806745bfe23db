//! A pod's routes annotation, written by anyone who may create a pod.
#![no_main]

use flask_ebpf_exporter::{
    exchange::WorkloadKey,
    identity::pods::{MAX_ANNOTATION_RULES, parse_routes_annotation},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let workload = WorkloadKey::Pod {
        namespace: "fuzz".to_owned(),
        workload: "annotated".to_owned(),
        workload_kind: "Deployment".to_owned(),
    };
    let (routes, _) = parse_routes_annotation(text, &workload);
    assert!(routes.rules.len() <= MAX_ANNOTATION_RULES);
});
