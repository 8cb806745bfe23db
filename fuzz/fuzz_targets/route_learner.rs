//! The route learner on any paths: it stays within its node budget, and
//! what it names stays within the label bound.
#![no_main]

use arbitrary::Arbitrary;
use flask_ebpf_exporter::routes::learned::RouteLearner;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    segment_cap: u8,
    paths: Vec<(bool, String)>,
}

const MAX_NODES: usize = 200;

fuzz_target!(|input: Input| {
    let mut learner = RouteLearner::new(usize::from(input.segment_cap).max(1), MAX_NODES);
    for (learn, path) in &input.paths {
        let path = format!("/{}", path.trim_start_matches('/'));
        let _ = if *learn {
            learner.learn(&path)
        } else {
            learner.fit(&path)
        };
        // A path adds at most one node per segment past the check, plus
        // its `<path>` suffix.
        assert!(learner.nodes() <= MAX_NODES + 2, "{}", learner.nodes());
        let _ = learner.take_retired();
    }
});
