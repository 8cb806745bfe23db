//! Where an app's source is read from, and how much of it may be read.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    time::Duration,
};

use pathrs::{Root, flags::OpenFlags};

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

/// What tells one version of a source file from another without reading
/// it: containers of one image share both, an edited or rebuilt file
/// changes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub bytes: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// Files to read modules from: a process's root, or (in tests) a map.
pub trait SourceTree {
    /// The file's text, if it is a file of at most `limit` bytes.
    fn read(&self, path: &Path, limit: usize) -> Option<String>;
    fn is_file(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
    /// The file's size and modification time, if it is a file.
    fn stamp(&self, path: &Path) -> Option<FileStamp>;
}

/// The filesystem as a process sees it, through `/proc/<pid>/root`. Paths
/// are resolved inside that root, symlinks and `..` included (openat2's
/// `RESOLVE_IN_ROOT`, through libpathrs): a link in a container's image
/// never leads to the node's own files.
pub struct ProcessRoot {
    root: Option<Root>,
}

impl ProcessRoot {
    pub fn of(tgid: u32) -> Self {
        // The magic link itself is followed (libpathrs's own open would not
        // follow a link); from its directory on, everything stays inside.
        let root = std::fs::File::open(PathBuf::from(format!("/proc/{tgid}/root")))
            .ok()
            .map(|directory| Root::from_fd(std::os::fd::OwnedFd::from(directory)));
        ProcessRoot { root }
    }

    fn open(&self, path: &Path) -> Option<std::fs::File> {
        let inside = path.strip_prefix("/").unwrap_or(path);
        self.root
            .as_ref()?
            .open_subpath(inside, OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC)
            .ok()
    }
}

impl SourceTree for ProcessRoot {
    fn read(&self, path: &Path, limit: usize) -> Option<String> {
        let file = self.open(path)?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(limit as u64 + 1).read_to_string(&mut text).ok()?;
        (text.len() <= limit).then_some(text)
    }

    fn is_file(&self, path: &Path) -> bool {
        self.open(path)
            .and_then(|file| file.metadata().ok())
            .is_some_and(|metadata| metadata.is_file())
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.open(path)
            .and_then(|file| file.metadata().ok())
            .is_some_and(|metadata| metadata.is_dir())
    }

    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        let metadata = self.open(path)?.metadata().ok()?;
        metadata.is_file().then(|| FileStamp {
            bytes: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_never_lead_out_of_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("app")).expect("dirs");
        std::fs::write(root.join("app/views.py"), "X = 1\n").expect("write");
        std::fs::write(dir.path().join("outside.py"), "SECRET = 1\n").expect("write");
        // An absolute link and a climbing one, both aimed outside.
        std::os::unix::fs::symlink(dir.path().join("outside.py"), root.join("app/abs.py"))
            .expect("link");
        std::os::unix::fs::symlink("../../outside.py", root.join("app/up.py")).expect("link");
        std::os::unix::fs::symlink("/app/views.py", root.join("app/inside.py")).expect("link");
        let tree = ProcessRoot {
            root: Root::open(&root).ok(),
        };
        assert_eq!(
            tree.read(Path::new("/app/views.py"), 100).as_deref(),
            Some("X = 1\n")
        );
        // Resolved inside the root: the absolute link names /app/views.py there.
        assert_eq!(
            tree.read(Path::new("/app/inside.py"), 100).as_deref(),
            Some("X = 1\n")
        );
        assert_eq!(tree.read(Path::new("/app/abs.py"), 100), None);
        assert_eq!(tree.read(Path::new("/app/up.py"), 100), None);
        assert_eq!(tree.read(Path::new("/../outside.py"), 100), None);
        assert!(tree.is_dir(Path::new("/app")) && tree.is_file(Path::new("/app/views.py")));
        // Over the limit: not read.
        assert_eq!(tree.read(Path::new("/app/views.py"), 3), None);
    }
}
