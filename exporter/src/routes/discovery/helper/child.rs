//! The helper process's side: it reads one request, harvests inside the
//! root the agent handed it as a descriptor, writes its answer, and exits.
//! It starts with no capabilities, `no_new_privs`, and the rlimits the agent
//! set before `exec` ([`super::launch`]); whatever the source makes it do,
//! the worst is its own death, which the agent counts.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    sync::Mutex,
};

use super::protocol::{MAX_ANSWER_BYTES, Message, Previous, Request, VERSION};
use crate::routes::discovery::{
    FileStamp, ParseBudget, ProcessRoot, SourceTree, discover_in, runs_the_same_source_in,
};

/// The first argument that makes the agent's binary this helper.
pub const SUBCOMMAND: &str = "route-discovery-helper";

/// Stack of the thread that harvests: deep enough for any app a person
/// wrote, with the harvester's own depth bounds well inside it.
const STACK_BYTES: usize = 64 * 1024 * 1024;

/// Runs the helper; the process's exit status is what it returns.
pub fn main() -> i32 {
    // The agent dropped them before exec; drop again, should it not have.
    let _ = caps::clear(None, caps::CapSet::Effective);
    let _ = caps::clear(None, caps::CapSet::Permitted);
    let mut request = String::new();
    if std::io::stdin()
        .take(MAX_ANSWER_BYTES as u64)
        .read_to_string(&mut request)
        .is_err()
    {
        return 2;
    }
    let Ok(request) = serde_json::from_str::<Request>(&request) else {
        return 2;
    };
    if request.version != VERSION {
        return 2;
    }
    let harvest = std::thread::Builder::new()
        .name("harvest".to_owned())
        .stack_size(STACK_BYTES)
        .spawn(move || answer(request));
    match harvest.map(|thread| thread.join()) {
        Ok(Ok(())) => 0,
        _ => 3,
    }
}

fn answer(request: Request) {
    let root = ProcessRoot::from_fd(request.root_fd);
    let tree = Announcing {
        inner: &root,
        out: Mutex::new(std::io::stdout().lock()),
    };
    let budget = ParseBudget::from(request.budget);
    let message = match &request.previous {
        Some(Previous { found, files })
            if runs_the_same_source_in(&request.start, &tree, found, files, budget) =>
        {
            Message::Unchanged
        }
        _ => Message::Harvested(Box::new(discover_in(&request.start, &tree, budget))),
    };
    tree.send(&message);
}

/// The process's root, saying each file it reads before reading it: should
/// the harvest die on it, the agent knows which files decide whether to try
/// again.
struct Announcing<'a> {
    inner: &'a ProcessRoot,
    out: Mutex<std::io::StdoutLock<'static>>,
}

impl Announcing<'_> {
    fn send(&self, message: &Message) {
        let Ok(mut line) = serde_json::to_vec(message) else {
            return;
        };
        line.push(b'\n');
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
}

impl SourceTree for Announcing<'_> {
    fn read(&self, path: &Path, limit: usize) -> Option<String> {
        self.send(&Message::Reading(path.to_path_buf()));
        self.inner.read(path, limit)
    }

    fn is_file(&self, path: &Path) -> bool {
        self.inner.is_file(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }

    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        self.inner.stamp(path)
    }
}
