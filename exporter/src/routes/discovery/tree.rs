//! Where an app's source is read from, and how much of it may be read.

use std::{
    io::Read as _,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use pathrs::{Handle, Root, flags::OpenFlags};

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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Files in memory, by absolute path: a [`SourceTree`] for tests and fuzzing.
#[derive(Debug, Default)]
pub struct FilesInMemory(pub std::collections::HashMap<PathBuf, String>);

impl FilesInMemory {
    pub fn new(files: &[(&str, &str)]) -> Self {
        FilesInMemory(
            files
                .iter()
                .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
                .collect(),
        )
    }
}

impl SourceTree for FilesInMemory {
    fn read(&self, path: &Path, limit: usize) -> Option<String> {
        self.0.get(path).filter(|text| text.len() <= limit).cloned()
    }

    fn is_file(&self, path: &Path) -> bool {
        self.0.contains_key(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.0
            .keys()
            .any(|file| file.starts_with(path) && file != path)
    }

    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        Some(FileStamp {
            bytes: self.0.get(path)?.len() as u64,
            modified: None,
        })
    }
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

    /// The root another process opened and handed over as descriptor `fd`.
    pub fn from_fd(fd: std::os::fd::RawFd) -> Self {
        // SAFETY: the descriptor was opened for this process to own, and
        // nothing else here uses it.
        let directory =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        ProcessRoot {
            root: Some(Root::from_fd(directory)),
        }
    }

    /// The file at `path`, resolved without opening it (`O_PATH`): a FIFO
    /// or a device an image points at is never opened, only looked at.
    fn resolve(&self, path: &Path) -> Option<(Handle, std::fs::Metadata)> {
        let inside = path.strip_prefix("/").unwrap_or(path);
        let handle = self.root.as_ref()?.resolve(inside).ok()?;
        let metadata = std::fs::File::from(OwnedFd::from(handle.try_clone().ok()?))
            .metadata()
            .ok()?;
        Some((handle, metadata))
    }
}

impl SourceTree for ProcessRoot {
    /// Links inside the root are followed (a ConfigMap's files are links),
    /// never out of it; only a regular file is opened, without blocking.
    fn read(&self, path: &Path, limit: usize) -> Option<String> {
        let (handle, metadata) = self.resolve(path)?;
        if !metadata.is_file() || metadata.len() > limit as u64 {
            return None;
        }
        let file = handle
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC | OpenFlags::O_NONBLOCK)
            .ok()?;
        // The file may have been swapped since: check what was opened.
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(limit as u64 + 1).read_to_string(&mut text).ok()?;
        (text.len() <= limit).then_some(text)
    }

    fn is_file(&self, path: &Path) -> bool {
        self.resolve(path)
            .is_some_and(|(_, metadata)| metadata.is_file())
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.resolve(path)
            .is_some_and(|(_, metadata)| metadata.is_dir())
    }

    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        let (_, metadata) = self.resolve(path)?;
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
        // A FIFO is looked at, never opened: opening it would block until
        // a writer came.
        let fifo = std::ffi::CString::new(
            root.join("app/fifo.py")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("path");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(tree.read(Path::new("/app/fifo.py"), 100), None);
        assert!(!tree.is_file(Path::new("/app/fifo.py")));
        assert_eq!(tree.stamp(Path::new("/app/fifo.py")), None);
    }
}
