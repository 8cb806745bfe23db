//! Everything a user needs to build or understand the project is in the
//! repository: no tracked file points at a path outside it.

use std::{path::PathBuf, process::Command};

#[test]
fn no_tracked_file_refers_outside_the_repository() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let listed = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    assert!(listed.status.success());
    let files: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split('\0')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(files.iter().any(|name| name == "README.md"), "{files:?}");
    // Pieced together so that this file does not name it itself.
    let outside = format!("../{}/", "shared");
    let offending: Vec<&String> = files
        .iter()
        .filter(|name| {
            std::fs::read(root.join(name))
                .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains(&outside))
        })
        .collect();
    assert!(offending.is_empty(), "{outside} named in {offending:?}");
}
