//! The agent's modules depend on each other in one direction only, so a
//! reader follows a byte from stage to stage without coming back: the
//! graph of which source file uses which (through `use` or any path into
//! the crate) has no cycle, apart from a file's uses of the module folder
//! it belongs to. Files are parsed with `syn`, not searched as
//! text.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// A module's path from the crate root (`["identity", "pods"]`).
type ModulePath = Vec<String>;

/// Every module file of the library, by module path.
fn module_files(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut files = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut module: ModulePath = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("main") if module.len() == 1 => continue, // the binary
                Some("lib") if module.len() == 1 => module.clear(),
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            files.insert(module, path);
        }
    }
    files
}

/// Collects the crate paths one file uses, resolved to module paths.
struct Uses<'a> {
    files: &'a BTreeMap<ModulePath, PathBuf>,
    /// The module being read (the file's, plus inline `mod` blocks).
    module: ModulePath,
    used: BTreeSet<ModulePath>,
}

impl Uses<'_> {
    fn resolve(&mut self, segments: &[String]) {
        let Some((first, rest)) = segments.split_first() else {
            return;
        };
        match first.as_str() {
            "crate" => self.record(Vec::new(), rest),
            "self" => self.record(self.module.clone(), rest),
            "super" => {
                let mut base = self.module.clone();
                base.pop();
                let mut rest = rest;
                while let Some(("super", after)) = rest.split_first().map(|(s, r)| (s.as_str(), r))
                {
                    base.pop();
                    rest = after;
                }
                self.record(base, rest);
            }
            // Paths are relative to the module: a child module may be named
            // without `self::`. Anything else is another crate, or a name.
            name => {
                let mut child = self.module.clone();
                child.push(name.to_owned());
                if self.files.contains_key(&child) {
                    self.record(self.module.clone(), segments);
                }
            }
        }
    }

    /// The deepest module file `base` + `rest` reaches.
    fn record(&mut self, mut path: ModulePath, rest: &[String]) {
        let mut deepest = self.files.contains_key(&path).then(|| path.clone());
        for segment in rest {
            path.push(segment.clone());
            if self.files.contains_key(&path) {
                deepest = Some(path.clone());
            }
        }
        if let Some(module) = deepest {
            self.used.insert(module);
        }
    }
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(path) => {
            prefix.push(path.ident.to_string());
            use_paths(&path.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(name) => {
            let mut full = prefix.clone();
            if name.ident != "self" {
                full.push(name.ident.to_string());
            }
            out.push(full);
        }
        syn::UseTree::Rename(rename) => {
            let mut full = prefix.clone();
            full.push(rename.ident.to_string());
            out.push(full);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(group) => {
            for item in &group.items {
                use_paths(item, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Uses<'_> {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        use_paths(&item.tree, &mut Vec::new(), &mut paths);
        for path in paths {
            self.resolve(&path);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
    }
}

/// Module file → the module files it uses.
fn dependency_graph(src: &Path) -> BTreeMap<ModulePath, BTreeSet<ModulePath>> {
    let files = module_files(src);
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        let text = fs::read_to_string(path).expect("read source");
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut uses = Uses {
            files: &files,
            module: module.clone(),
            used: BTreeSet::new(),
        };
        uses.visit_file(&file);
        // A file may use the module it belongs to: a component split into a
        // folder shares its own types (Rust's privacy is built for it). The
        // direction that matters is between siblings and components.
        uses.used.retain(|used| !module.starts_with(used));
        graph.insert(module.clone(), uses.used);
    }
    graph
}

/// A cycle of the graph, if it has one (depth-first search).
fn find_cycle(graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Option<Vec<ModulePath>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    fn visit(
        node: &ModulePath,
        graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        marks: &mut BTreeMap<ModulePath, Mark>,
        stack: &mut Vec<ModulePath>,
    ) -> Option<Vec<ModulePath>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Active) => {
                let start = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Active);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

fn name(module: &ModulePath) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

fn module(path: &str) -> ModulePath {
    path.split("::").map(str::to_owned).collect()
}

#[test]
fn the_modules_depend_on_each_other_in_one_direction() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = dependency_graph(&src);
    // The graph is read for real: the data path's hand-offs are in it.
    for (from, to) in [
        ("pipeline", "stream"),
        ("stream", "http"),
        ("http", "exchange"),
        ("identity::attribution", "identity::pods"),
        ("routes", "exchange"),
        ("metrics", "exchange"),
        ("debug::reports", "routes"),
    ] {
        assert!(
            graph
                .get(&module(from))
                .is_some_and(|used| used.contains(&module(to))),
            "{from} should use {to}: {:?}",
            graph.get(&module(from))
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!("modules use each other in a circle: {}", names.join(" → "));
    }
    for (from, used) in &graph {
        let used: Vec<String> = used.iter().map(name).collect();
        eprintln!("{} → {}", name(from), used.join(", "));
    }
}

#[test]
fn a_circle_is_found() {
    let graph = BTreeMap::from([
        (module("stream"), BTreeSet::from([module("identity")])),
        (
            module("identity"),
            BTreeSet::from([module("identity::pods")]),
        ),
        (module("identity::pods"), BTreeSet::from([module("stream")])),
        (module("metrics"), BTreeSet::new()),
    ]);
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    let acyclic = BTreeMap::from([
        (module("stream"), BTreeSet::from([module("http")])),
        (module("http"), BTreeSet::new()),
    ]);
    assert!(find_cycle(&acyclic).is_none());
}

/// The graph between top-level modules (`identity::pods` counts as
/// `identity`), without a module's uses of itself.
fn top_level_graph(
    graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, used) in graph {
        let Some(from) = from.first() else { continue };
        let entry = top.entry(from.clone()).or_default();
        for to in used.iter().filter_map(|to| to.first()) {
            if to != from {
                entry.insert(to.clone());
            }
        }
    }
    top
}

/// Which top-level module may use which, in the data path's order: the
/// capture, the stream, HTTP, identity, routes, metrics; the plain data
/// they hand on (`exchange`, `rules`), the helpers every stage may use
/// (`telemetry`, `health`, `procfs`), and what assembles them. A new use
/// between modules is declared here, where a reviewer sees it.
const MAY_USE: &[(&str, &[&str])] = &[
    ("telemetry", &[]),
    ("health", &[]),
    ("rules", &[]),
    ("exchange", &["rules"]),
    ("metrics", &["exchange", "telemetry"]),
    // procfs implements metrics' view of the kernel's network counts.
    ("procfs", &["metrics"]),
    ("preflight", &["procfs"]),
    ("capture", &["preflight", "procfs", "telemetry"]),
    ("http", &["exchange", "telemetry"]),
    ("stream", &["capture", "exchange", "http", "telemetry"]),
    (
        "identity",
        &["exchange", "health", "procfs", "rules", "telemetry"],
    ),
    (
        "routes",
        &["exchange", "metrics", "procfs", "rules", "telemetry"],
    ),
    (
        "debug",
        &["exchange", "identity", "metrics", "routes", "stream"],
    ),
    ("server", &["debug", "health", "telemetry"]),
    (
        "config",
        &[
            "capture", "exchange", "identity", "metrics", "routes", "rules", "server",
        ],
    ),
    (
        "pipeline",
        &[
            "capture",
            "config",
            "debug",
            "exchange",
            "health",
            "identity",
            "metrics",
            "procfs",
            "routes",
            "rules",
            "stream",
            "telemetry",
        ],
    ),
    (
        "agent",
        &[
            "capture",
            "config",
            "debug",
            "health",
            "identity",
            "pipeline",
            "preflight",
            "procfs",
            "rules",
            "server",
            "telemetry",
        ],
    ),
];

#[test]
fn top_level_modules_use_only_what_the_table_declares() {
    let declared: BTreeMap<ModulePath, BTreeSet<ModulePath>> = MAY_USE
        .iter()
        .map(|(from, used)| (module(from), used.iter().map(|to| module(to)).collect()))
        .collect();
    if let Some(cycle) = find_cycle(&declared) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!("the declared table has a circle: {}", names.join(" → "));
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let actual = top_level_graph(&dependency_graph(&src));
    // The graph is read for real.
    assert!(
        actual
            .get("stream")
            .is_some_and(|used| used.contains("http"))
    );
    for (from, used) in &actual {
        let allowed = declared
            .get(&module(from))
            .unwrap_or_else(|| panic!("top-level module {from} has no row in MAY_USE"));
        for to in used {
            assert!(
                allowed.contains(&module(to)),
                "{from} uses {to}, which MAY_USE does not declare"
            );
        }
    }
}
