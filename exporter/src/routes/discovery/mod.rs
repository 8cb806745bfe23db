//! Flask's url rules of a running app, read from its own source without
//! running it: which application a server process serves
//! ([`entrypoint`]), then its modules parsed with a real Python parser and
//! the rules collected as Flask builds them ([`harvest`]). Everything is
//! read inside the process's root (`/proc/<pid>/root`), within a budget of
//! files, bytes and time: the source belongs to whoever deployed the pod.

pub mod entrypoint;
pub mod harvest;
pub mod helper;
pub mod rules;
pub mod tree;
pub mod worker;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use self::entrypoint::{Entrypoint, ProcessStart};
pub use self::{
    harvest::HarvestedRule,
    tree::{FileStamp, ParseBudget, ProcessRoot, SourceTree},
};
use crate::procfs;

/// Whether apps' rules are read from their source (`--route-discovery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteDiscovery {
    /// Read each app's url rules from its own source.
    Source,
    /// Do not: rules come from flags, annotations and learning only.
    Off,
}

/// What was found for one server process.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Discovery {
    /// How the app was found (`gunicorn shop.wsgi:app`), when it was.
    pub entrypoint: Option<String>,
    pub rules: Vec<HarvestedRule>,
    /// What could not be followed, and why.
    pub unresolved: Vec<String>,
    /// Files read, each with its stamp then: a later process of the
    /// workload with the same entrypoint and stamps has the same rules.
    pub files: Vec<(PathBuf, Option<FileStamp>)>,
    /// The entrypoint, when found, to compare a later process's with.
    pub found: Option<Entrypoint>,
    /// The parse budget ran out before everything was read.
    pub budget_spent: bool,
}

impl Discovery {
    /// The rules a line each, `METHODS RULE`, as the tests' oracle prints
    /// Flask's (` strict_slashes=False` after a lax one).
    pub fn rules_text(&self) -> String {
        self.rules
            .iter()
            .map(|rule| {
                let methods: Vec<&str> = rule.methods.iter().map(String::as_str).collect();
                let lax = if rule.strict_slashes {
                    ""
                } else {
                    " strict_slashes=False"
                };
                format!("{} {}{lax}\n", methods.join(","), rule.rule)
            })
            .collect()
    }
}

/// Finds and harvests the app a server process runs, in this process (the
/// agent runs it in a helper: [`helper`]).
pub fn discover(tgid: u32, budget: ParseBudget) -> Discovery {
    match process_start(tgid) {
        Some(start) => discover_in(&start, &ProcessRoot::of(tgid), budget),
        None => Discovery {
            unresolved: vec![format!("process {tgid} is gone")],
            ..Discovery::default()
        },
    }
}

/// Finds and harvests the app a process started as `start` runs, reading
/// `tree`.
pub fn discover_in(start: &ProcessStart, tree: &dyn SourceTree, budget: ParseBudget) -> Discovery {
    match find_entrypoint(start, tree, budget) {
        Ok(entrypoint) => harvest_entrypoint(&entrypoint, tree, budget),
        Err(reason) => Discovery {
            unresolved: vec![reason],
            ..Discovery::default()
        },
    }
}

/// Whether a process started as `start` runs what `found` and `files` were
/// read from: the same entrypoint, and every file read then with the same
/// stamp in `tree`. Costs a stat per file, not a parse.
pub fn runs_the_same_source_in(
    start: &ProcessStart,
    tree: &dyn SourceTree,
    found: &Entrypoint,
    files: &[(PathBuf, Option<FileStamp>)],
    budget: ParseBudget,
) -> bool {
    find_entrypoint(start, tree, budget).is_ok_and(|entrypoint| entrypoint == *found)
        && files
            .iter()
            .all(|(path, stamp)| stamp.is_some() && tree.stamp(path) == *stamp)
}

fn find_entrypoint(
    start: &ProcessStart,
    tree: &dyn SourceTree,
    budget: ParseBudget,
) -> Result<Entrypoint, String> {
    let read_config = |path: &Path| tree.read(path, budget.file_bytes);
    let mut entrypoint = entrypoint::find(start, &read_config).map_err(|e| e.to_string())?;
    entrypoint.site_packages = entrypoint::site_packages(start, &|path| tree.is_file(path));
    Ok(entrypoint)
}

/// Harvests the app an entrypoint names.
pub fn harvest_entrypoint(
    entrypoint: &Entrypoint,
    tree: &dyn SourceTree,
    budget: ParseBudget,
) -> Discovery {
    let deadline = Instant::now() + budget.time;
    let harvest = harvest::harvest(entrypoint, tree, budget, deadline);
    Discovery {
        entrypoint: Some(describe(entrypoint)),
        rules: harvest.rules,
        unresolved: harvest.unresolved,
        files: harvest
            .files
            .into_iter()
            .map(|path| {
                let stamp = tree.stamp(&path);
                (path, stamp)
            })
            .collect(),
        found: Some(entrypoint.clone()),
        budget_spent: harvest.budget_spent,
    }
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

/// How process `tgid` was started, as its `/proc` entries say.
pub fn process_start(tgid: u32) -> Option<ProcessStart> {
    // The kernel names a chrooted process's cwd from the agent's root
    // (`/var/lib/root/srv` for `/srv`): the root's own name comes off.
    let root = procfs::root_directory(tgid);
    let inside = |path: PathBuf| match root.as_deref() {
        Some(root) if root != Path::new("/") => match path.strip_prefix(root) {
            Ok(inner) => Path::new("/").join(inner),
            Err(_) => path,
        },
        _ => path,
    };
    Some(ProcessStart {
        argv: procfs::command_line_arguments(tgid)?,
        environment: procfs::environment(tgid),
        cwd: inside(procfs::working_directory(tgid)?),
        executable: procfs::executable(tgid).map(inside),
    })
}
