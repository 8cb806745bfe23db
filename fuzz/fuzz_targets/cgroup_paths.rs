//! `/proc/<pid>/cgroup` as any process could have it.
#![no_main]

use flask_ebpf_exporter::identity::cgroup::{container_of, parse_cgroup_path};
use libfuzzer_sys::fuzz_target;
use procfs::{FromRead as _, ProcessCGroups};

fuzz_target!(|text: &str| {
    for line in text.lines() {
        let _ = parse_cgroup_path(line);
    }
    if let Ok(cgroups) = ProcessCGroups::from_read(text.as_bytes()) {
        let _ = container_of(&cgroups);
    }
});
