//! What the agent reads about other processes in `/proc`, through the
//! `procfs` crate: a process's name, parent and start time (to find a
//! server's root process and to tell a reused pid apart), its command line,
//! cgroups and network namespace; its sockets, within bounds, in
//! [`sockets`].
//!
//! Any process may exit between two reads, so every read answers "nothing"
//! rather than an error.

pub mod sockets;
pub mod throttle;
pub mod worker;

use std::path::PathBuf;

use procfs::{
    ProcessCGroups,
    process::{Process, Stat},
};

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessStat {
    /// `comm`: the name, which may hold spaces and parentheses.
    pub name: String,
    pub ppid: u32,
    /// Start time in clock ticks since boot: tells a reused pid apart.
    pub start_ticks: u64,
}

impl From<Stat> for ProcessStat {
    fn from(stat: Stat) -> Self {
        ProcessStat {
            name: stat.comm,
            ppid: u32::try_from(stat.ppid).unwrap_or(0),
            start_ticks: stat.starttime,
        }
    }
}

fn process(tgid: u32) -> Option<Process> {
    Process::new(i32::try_from(tgid).ok()?).ok()
}

/// Whether a process with this pid exists (it may be another process than
/// the one once seen under it: compare [`ProcessStat::start_ticks`]).
pub fn is_running(tgid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}")).exists()
}

/// Whether `tgid` still names the process that started at `start_ticks`.
pub fn runs(tgid: u32, start_ticks: u64) -> bool {
    stat(tgid).is_some_and(|stat| stat.start_ticks == start_ticks)
}

pub fn stat(tgid: u32) -> Option<ProcessStat> {
    process(tgid)?.stat().ok().map(ProcessStat::from)
}

/// The arguments joined by spaces; empty when unreadable.
pub fn command_line(tgid: u32) -> String {
    process(tgid)
        .and_then(|process| process.cmdline().ok())
        .map(|arguments| arguments.join(" "))
        .unwrap_or_default()
}

/// A process's arguments, as it was started (or as it renamed itself).
pub fn command_line_arguments(tgid: u32) -> Option<Vec<String>> {
    process(tgid)?.cmdline().ok()
}

/// A process's environment as it was started (names and values that are
/// not UTF-8 are left out).
pub fn environment(tgid: u32) -> Vec<(String, String)> {
    let Some(environment) = process(tgid).and_then(|process| process.environ().ok()) else {
        return Vec::new();
    };
    environment
        .into_iter()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// A process's working directory, as the kernel names it from this
/// agent's root (see [`root_directory`]).
pub fn working_directory(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.cwd().ok()
}

/// A process's root directory as the kernel names it from this agent's
/// root: `/` for a container's pivoted root, the directory's own path for
/// a chroot. The kernel names the process's cwd and executable the same
/// way, so they are this prefix plus their path inside the root.
pub fn root_directory(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.root().ok()
}

/// The program a process runs (`/proc/<pid>/exe`), named as
/// [`working_directory`] is: for Python, the real interpreter, links
/// resolved.
pub fn executable(tgid: u32) -> Option<PathBuf> {
    process(tgid)?.exe().ok()
}

/// The kernel's per-network-namespace counts, as the metrics stage reads
/// them.
pub struct Network;

impl crate::metrics::NetworkCounts for Network {
    fn namespace(&self, tgid: u32) -> Option<u64> {
        network_namespace(tgid)
    }

    fn own_namespace(&self) -> Option<u64> {
        network_namespace(std::process::id())
    }

    fn listen_overflows(&self, tgid: u32) -> Option<u64> {
        listen_overflows(tgid)
    }
}

/// The network namespace a process is in (its inode number).
pub fn network_namespace(tgid: u32) -> Option<u64> {
    let namespaces = process(tgid)?.namespaces().ok()?;
    namespaces
        .0
        .get(std::ffi::OsStr::new("net"))
        .map(|namespace| namespace.identifier)
}

/// Connections the kernel refused because a listener's accept queue was
/// full, in the network namespace of `tgid`: `TcpExt: ListenOverflows` of
/// `/proc/<tgid>/net/netstat` (a file the procfs crate does not parse:
/// pairs of lines, names then values, per protocol).
pub fn listen_overflows(tgid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/net/netstat")).ok()?;
    listen_overflows_in(&text)
}

fn listen_overflows_in(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let (Some(names), Some(values)) = (
            names.strip_prefix("TcpExt:"),
            values.strip_prefix("TcpExt:"),
        ) {
            return names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == "ListenOverflows")
                .and_then(|(_, value)| value.parse().ok());
        }
    }
    None
}

/// The cgroups a process is in, one per hierarchy.
pub fn cgroups(tgid: u32) -> Option<ProcessCGroups> {
    process(tgid)?.cgroups().ok()
}

/// Whether a filesystem of this type is mounted in the agent's namespace.
pub fn is_mounted(filesystem_type: &str) -> bool {
    procfs::mounts()
        .map(|mounts| {
            mounts
                .iter()
                .any(|mount| mount.fs_vfstype == filesystem_type)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use procfs::FromRead as _;

    use super::*;

    #[test]
    fn listen_overflows_from_netstat() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(listen_overflows_in(netstat), Some(7));
        assert_eq!(listen_overflows_in("IpExt: InNoRoutes\nIpExt: 0\n"), None);
        assert_eq!(listen_overflows_in("TcpExt: ListenOverflows\n"), None);
    }

    #[test]
    fn stat_with_spaces_and_parentheses_in_comm() {
        let text = "4242 (gunicorn: (worker) x) S 4200 4100 4100 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 1 0 987654 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 1 1 1 1 1 1 1 0";
        let stat = Stat::from_read(text.as_bytes()).expect("parses");
        assert_eq!(
            ProcessStat::from(stat),
            ProcessStat {
                name: "gunicorn: (worker) x".to_owned(),
                ppid: 4200,
                start_ticks: 987654,
            }
        );
        let own = super::stat(std::process::id()).expect("own stat");
        assert!(own.start_ticks > 0);
        assert!(Stat::from_read("garbage".as_bytes()).is_err());
    }
}
