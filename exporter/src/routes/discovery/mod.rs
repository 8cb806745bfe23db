//! Flask's url rules of a running app, read from its own source without
//! running it: which application a server process serves
//! ([`entrypoint`]), then its modules parsed with a real Python parser and
//! the rules collected as Flask builds them ([`harvest`]). Everything is
//! read inside the process's root (`/proc/<pid>/root`), within a budget of
//! files, bytes and time: the source belongs to whoever deployed the pod.

pub mod entrypoint;
pub mod harvest;
pub mod worker;

use std::{
    collections::BTreeSet,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use self::entrypoint::{Entrypoint, ProcessStart};
use crate::procfs;

/// Whether apps' rules are read from their source (`--route-discovery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteDiscovery {
    /// Read each app's url rules from its own source.
    Source,
    /// Do not: rules come from flags, annotations and learning only.
    Off,
}

/// What one app's harvest may read.
#[derive(Clone, Copy, Debug)]
pub struct ParseBudget {
    pub files: usize,
    pub bytes: usize,
    /// Largest single file read; a longer one is skipped.
    pub file_bytes: usize,
    pub time: Duration,
}

impl Default for ParseBudget {
    fn default() -> Self {
        ParseBudget {
            files: 256,
            bytes: 16 * 1024 * 1024,
            file_bytes: 2 * 1024 * 1024,
            time: Duration::from_secs(2),
        }
    }
}

/// Files to read modules from: a process's root, or (in tests) a map.
pub trait SourceTree {
    /// The file's text, if it is a file of at most `limit` bytes.
    fn read(&self, path: &Path, limit: usize) -> Option<String>;
    fn is_file(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
}

/// The filesystem as a process sees it, through `/proc/<pid>/root`.
pub struct ProcessRoot {
    root: PathBuf,
}

impl ProcessRoot {
    pub fn of(tgid: u32) -> Self {
        ProcessRoot {
            root: PathBuf::from(format!("/proc/{tgid}/root")),
        }
    }

    /// `path` (absolute inside the process) on the host. `..` and symlinks
    /// are left to the kernel, which resolves them under the process's root
    /// as it would for the process itself.
    fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

impl SourceTree for ProcessRoot {
    fn read(&self, path: &Path, limit: usize) -> Option<String> {
        let file = fs::File::open(self.host_path(path)).ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(limit as u64 + 1).read_to_string(&mut text).ok()?;
        (text.len() <= limit).then_some(text)
    }

    fn is_file(&self, path: &Path) -> bool {
        self.host_path(path).is_file()
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.host_path(path).is_dir()
    }
}

/// One url rule as the harvest found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarvestedRule {
    /// The rule text, as Flask's `url_rule` has it.
    pub rule: String,
    /// Methods as given (Flask adds HEAD with GET, and OPTIONS).
    pub methods: BTreeSet<String>,
    pub endpoint: String,
    /// Where it was registered (inside the process's root), 1-based line.
    pub file: PathBuf,
    pub line: u32,
}

/// What was found for one server process.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// How the app was found (`gunicorn shop.wsgi:app`), when it was.
    pub entrypoint: Option<String>,
    pub rules: Vec<HarvestedRule>,
    /// What could not be followed, and why.
    pub unresolved: Vec<String>,
    /// Files parsed.
    pub files: usize,
}

impl Discovery {
    /// The rules as `--routes-file` lines (`METHODS RULE`).
    pub fn rules_text(&self) -> String {
        self.rules
            .iter()
            .map(|rule| {
                let methods: Vec<&str> = rule.methods.iter().map(String::as_str).collect();
                format!("{} {}\n", methods.join(","), rule.rule)
            })
            .collect()
    }
}

/// Finds and harvests the app a server process runs.
pub fn discover(tgid: u32, budget: ParseBudget) -> Discovery {
    let Some(start) = process_start(tgid) else {
        return Discovery {
            unresolved: vec![format!("process {tgid} is gone")],
            ..Discovery::default()
        };
    };
    let tree = ProcessRoot::of(tgid);
    let read_config = |path: &Path| tree.read(path, budget.file_bytes);
    match entrypoint::find(&start, &read_config) {
        Ok(entrypoint) => harvest_entrypoint(&entrypoint, &tree, budget),
        Err(error) => Discovery {
            unresolved: vec![error.to_string()],
            ..Discovery::default()
        },
    }
}

/// Harvests the app an entrypoint names.
pub fn harvest_entrypoint(
    entrypoint: &Entrypoint,
    tree: &dyn SourceTree,
    budget: ParseBudget,
) -> Discovery {
    let deadline = Instant::now() + budget.time;
    let mut discovery = harvest::harvest(entrypoint, tree, budget, deadline);
    discovery.entrypoint = Some(describe(entrypoint));
    discovery
}

fn describe(entrypoint: &Entrypoint) -> String {
    use entrypoint::{AppObject, AppSource};
    let source = match &entrypoint.source {
        AppSource::Module(module) => module.clone(),
        AppSource::FirstModule(modules) => modules.join("|"),
        AppSource::File(file) => file.display().to_string(),
    };
    let object = match &entrypoint.object {
        AppObject::Variable(name) => format!(":{name}"),
        AppObject::Factory(name) => format!(":{name}()"),
        AppObject::Default => String::new(),
    };
    format!("{} {source}{object}", entrypoint.server)
}

fn process_start(tgid: u32) -> Option<ProcessStart> {
    Some(ProcessStart {
        argv: procfs::command_line_arguments(tgid)?,
        environment: procfs::environment(tgid),
        cwd: procfs::working_directory(tgid)?,
    })
}
