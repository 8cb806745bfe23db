//! Route discovery's harvest of any Python source an image author could
//! write, with the bounds the helper runs it under: it ends without a
//! crash, and never long past its deadline.
#![no_main]

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use flask_ebpf_exporter::routes::discovery::{
    ParseBudget,
    entrypoint::{AppObject, AppSource, Entrypoint},
    harvest::harvest,
    tree::FilesInMemory,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// /srv/app.py, the module gunicorn names.
    app: String,
    /// /srv/views.py and /srv/pkg/__init__.py, for it to import.
    views: String,
    package: String,
    factory: bool,
}

/// The helper's own deadline is seconds; a short one finds overruns sooner.
const DEADLINE: Duration = Duration::from_millis(50);

fuzz_target!(|input: Input| {
    let files = FilesInMemory(HashMap::from([
        (PathBuf::from("/srv/app.py"), input.app),
        (PathBuf::from("/srv/views.py"), input.views),
        (PathBuf::from("/srv/pkg/__init__.py"), input.package),
    ]));
    let entrypoint = Entrypoint {
        server: "gunicorn",
        source: AppSource::Module("app".to_owned()),
        object: if input.factory {
            AppObject::Factory("create_app".to_owned())
        } else {
            AppObject::Default
        },
        search_path: vec![PathBuf::from("/srv")],
        site_packages: Vec::new(),
    };
    // The helper harvests on a stack this deep.
    let finished = std::thread::Builder::new()
        .stack_size(64 * 1024 * 1024)
        .spawn(move || {
            let started = Instant::now();
            let found = harvest(&entrypoint, &files, ParseBudget::default(), started + DEADLINE);
            (started.elapsed(), found.rules.len())
        })
        .expect("thread")
        .join()
        .expect("the harvest ended");
    // One statement may finish past the deadline, not more.
    assert!(finished.0 < DEADLINE * 20, "took {:?}", finished.0);
});
