//! House rules of the kernel programs (exporter-ebpf), which clippy cannot
//! check: the toolchain that builds them for the BPF target has none.
//! - `unsafe` lives only in the safe helpers (`programs/kernel.rs`,
//!   `programs/maps.rs`) and the object's panic handler; the hook families
//!   read memory through those helpers.
//! - Every `unsafe` block says why it is sound in a `// SAFETY:` comment
//!   just above it, as `clippy::undocumented_unsafe_blocks` asks of the
//!   userspace crates.
//! - Files stay small enough to read at once.

use std::{fs, path::Path};

const KERNEL_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../exporter-ebpf/src");

/// Where `unsafe` may appear.
const UNSAFE_ALLOWED_IN: &[&str] = &["programs/kernel.rs", "programs/maps.rs", "object.rs"];

const MAX_LINES: usize = 400;

fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut pending = vec![Path::new(KERNEL_SRC).to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read exporter-ebpf/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let name = path
                    .strip_prefix(KERNEL_SRC)
                    .expect("under src")
                    .to_string_lossy()
                    .into_owned();
                files.push((name, fs::read_to_string(&path).expect("read")));
            }
        }
    }
    files.sort();
    assert!(files.len() >= 8, "found {files:?}");
    files
}

/// Lines (1-based) of `unsafe` blocks whose statement has no `// SAFETY:`
/// comment in the comment lines just above it.
fn undocumented_unsafe_blocks(text: &str) -> Vec<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut undocumented = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        if !code.contains("unsafe {") {
            continue;
        }
        // The statement may begin lines above (a method chain).
        let mut start = at;
        while start > 0 {
            let previous = lines[start - 1].trim();
            if previous.is_empty()
                || previous.starts_with("//")
                || previous.ends_with([';', '{', '}'])
            {
                break;
            }
            start -= 1;
        }
        let documented = lines[..start]
            .iter()
            .rev()
            .map(|line| line.trim())
            .take_while(|line| line.starts_with("//"))
            .any(|comment| comment.starts_with("// SAFETY:"));
        if !documented {
            undocumented.push(at + 1);
        }
    }
    undocumented
}

#[test]
fn unsafe_stays_in_the_helpers_and_says_why() {
    let mut misplaced = Vec::new();
    let mut undocumented = Vec::new();
    for (name, text) in sources() {
        let uses_unsafe = text
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .any(|code| code.contains("unsafe {") || code.contains("unsafe fn"));
        if uses_unsafe && !UNSAFE_ALLOWED_IN.contains(&name.as_str()) {
            misplaced.push(name.clone());
        }
        for line in undocumented_unsafe_blocks(&text) {
            undocumented.push(format!("{name}:{line}"));
        }
    }
    assert!(
        misplaced.is_empty(),
        "unsafe outside the helpers: {misplaced:?}"
    );
    assert!(
        undocumented.is_empty(),
        "unsafe blocks without a SAFETY comment: {undocumented:?}"
    );
}

#[test]
fn the_rule_finds_an_undocumented_block() {
    let documented =
        "fn a() {\n    // SAFETY: a helper without arguments.\n    let x = unsafe { f() };\n}\n";
    let undocumented = "fn a() {\n    // Reads the clock.\n    let x = unsafe { f() };\n}\n";
    let chained = "fn a() {\n    // SAFETY: a map value.\n    MAP\n        .get(0)\n        .map(|v| unsafe { &*v })\n}\n";
    let after_another =
        "fn a() {\n    // SAFETY: a map value.\n    let y = g();\n    let x = unsafe { f() };\n}\n";
    assert!(undocumented_unsafe_blocks(documented).is_empty());
    assert!(undocumented_unsafe_blocks(chained).is_empty());
    assert_eq!(undocumented_unsafe_blocks(undocumented), [3]);
    assert_eq!(undocumented_unsafe_blocks(after_another), [4]);
}

#[test]
fn kernel_files_are_small() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter(|(_, text)| text.lines().count() > MAX_LINES)
        .map(|(name, text)| format!("{name}: {} lines", text.lines().count()))
        .collect();
    assert!(long.is_empty(), "{long:?}");
}
