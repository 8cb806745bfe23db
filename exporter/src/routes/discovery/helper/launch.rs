//! The agent's side: one helper process per harvest, started from the
//! agent's own binary with only what it needs (the process's root as a
//! descriptor, how the process was started, the budget), no capabilities,
//! `no_new_privs`, and rlimits on memory, CPU time, stack, files and file
//! size. The agent reads at most [`MAX_ANSWER_BYTES`] of its answer and
//! kills it at a wall-clock deadline. Nothing it does reaches the agent's
//! memory or threads.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{
    child::SUBCOMMAND,
    protocol::{self, MAX_ANSWER_BYTES, Malformed, Message, Previous, Request, VERSION},
};
use crate::routes::discovery::{Discovery, ParseBudget, process_start};

/// Address space a helper may map: the agent's binary, a parsed app and
/// its values.
const ADDRESS_SPACE_BYTES: u64 = 1024 * 1024 * 1024;
/// Descriptors a helper may hold: its stdio, the root, and the one file it
/// reads at a time.
const OPEN_FILES: u64 = 16;
/// The helper's main thread only reads and writes; it harvests on a thread
/// whose stack it sizes itself (within the address space).
const MAIN_STACK_BYTES: u64 = 8 * 1024 * 1024;
/// Time to start, on top of the harvest's own budget.
const START_TIME: Duration = Duration::from_secs(1);
/// What is kept of a helper's stderr, for the reason it died.
const STDERR_BYTES: usize = 4096;

/// The program a helper runs: the agent's own binary, or (in tests and
/// benchmarks) the one cargo built.
#[derive(Clone, Debug)]
pub struct HelperProgram(pub PathBuf);

impl Default for HelperProgram {
    fn default() -> Self {
        HelperProgram(PathBuf::from("/proc/self/exe"))
    }
}

/// What became of one helper.
#[derive(Debug)]
pub enum HelperOutcome {
    Harvested(Discovery),
    Unchanged,
    /// It died, answered something malformed, or could not start.
    Failed {
        reason: String,
        read: Vec<PathBuf>,
    },
    /// Still running at the deadline: killed.
    TimedOut {
        read: Vec<PathBuf>,
    },
}

/// Harvests process `tgid` in a helper; `previous` is its workload's last
/// harvest.
pub fn harvest(
    program: &HelperProgram,
    tgid: u32,
    previous: Option<&Discovery>,
    budget: ParseBudget,
) -> HelperOutcome {
    let Some(start) = process_start(tgid) else {
        return HelperOutcome::Harvested(Discovery {
            unresolved: vec![format!("process {tgid} is gone")],
            ..Discovery::default()
        });
    };
    let root = match std::fs::File::open(format!("/proc/{tgid}/root")) {
        Ok(root) => root,
        Err(error) => {
            return HelperOutcome::Harvested(Discovery {
                unresolved: vec![format!("the root of process {tgid}: {error}")],
                ..Discovery::default()
            });
        }
    };
    let previous = previous.and_then(|previous| {
        Some(Previous {
            found: previous.found.clone()?,
            files: previous.files.clone(),
        })
    });
    let request = Request {
        version: VERSION,
        root_fd: root.as_raw_fd(),
        start,
        budget: budget.into(),
        previous,
    };
    let request = match serde_json::to_vec(&request) {
        Ok(request) => request,
        Err(error) => return failed(format!("the request: {error}"), Vec::new()),
    };
    let mut child = match spawn(program, &root, budget) {
        Ok(child) => child,
        Err(error) => return failed(format!("starting the helper: {error}"), Vec::new()),
    };
    drop(root);
    let deadline = Instant::now() + budget.time + START_TIME;
    run(&mut child, request, deadline)
}

fn failed(reason: String, read: Vec<PathBuf>) -> HelperOutcome {
    HelperOutcome::Failed { reason, read }
}

fn spawn(
    program: &HelperProgram,
    root: &std::fs::File,
    budget: ParseBudget,
) -> std::io::Result<Child> {
    let root_fd = root.as_raw_fd();
    let cpu_seconds = budget.time.as_secs() + 2;
    let mut command = Command::new(&program.0);
    command
        .arg(SUBCOMMAND)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (dup2, setrlimit, prctl, capset), on values computed before the fork.
    unsafe {
        command.pre_exec(move || confine(root_fd, cpu_seconds));
    }
    command.spawn()
}

/// Marks every descriptor from `first` up close-on-exec, so the helper
/// inherits none that the agent's own parent left open without the flag.
/// Kernels before 5.11 lack the flag on close_range; there each descriptor
/// up to the open-files limit is marked one by one.
///
/// # Safety
/// Only system calls: callable between fork and exec.
unsafe fn close_on_exec_from(first: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: plain system calls on integers and stack values.
    unsafe {
        let all = libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if all == 0 {
            return Ok(());
        }
        let mut open_files = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut open_files) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let last = open_files.rlim_cur.min(libc::c_int::MAX as u64) as libc::c_int;
        for fd in first as libc::c_int..last {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// In the child, before exec: the root kept open across exec, the limits,
/// no capabilities, and no way to gain any at exec (the binary's file
/// capabilities included).
fn confine(root_fd: i32, cpu_seconds: u64) -> std::io::Result<()> {
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on integers and stack values.
    unsafe {
        close_on_exec_from(3)?;
        check(libc::fcntl(root_fd, libc::F_SETFD, 0))?;
        for (resource, limit) in [
            (libc::RLIMIT_AS, ADDRESS_SPACE_BYTES),
            (libc::RLIMIT_STACK, MAIN_STACK_BYTES),
            (libc::RLIMIT_CPU, cpu_seconds),
            (libc::RLIMIT_NOFILE, OPEN_FILES),
            (libc::RLIMIT_FSIZE, 0),
            (libc::RLIMIT_CORE, 0),
        ] {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            check(libc::setrlimit(resource, &limit))?;
        }
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        // Under the container's memory limit, the helper goes first.
        let adjustment = b"1000";
        let file = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
        if file >= 0 {
            libc::write(file, adjustment.as_ptr().cast(), adjustment.len());
            libc::close(file);
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // Every set emptied: with no_new_privs, exec grants nothing back.
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Feeds the request, reads the answer within its bounds, and waits for the
/// helper until the deadline.
fn run(child: &mut Child, request: Vec<u8>, deadline: Instant) -> HelperOutcome {
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return failed("the helper's pipes".to_owned(), Vec::new());
    };
    std::thread::spawn(move || {
        let _ = stdin.write_all(&request);
    });
    let (lines, answered) = mpsc::channel();
    let reader = std::thread::spawn(move || read_answer(stdout, &lines));
    let errors = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = stderr.take(STDERR_BYTES as u64).read_to_end(&mut kept);
        String::from_utf8_lossy(&kept).into_owned()
    });

    let mut read = Vec::new();
    let mut last = None;
    let mut malformed = None;
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match answered.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(Ok(Message::Reading(_))) if read.len() >= protocol::MAX_LISTED => {
                malformed.get_or_insert(Malformed::TooManyEntries(read.len() + 1));
                let _ = child.kill();
            }
            Ok(Ok(Message::Reading(path))) => read.push(path),
            Ok(Ok(message)) => last = Some(message),
            Ok(Err(error)) => {
                malformed.get_or_insert(error);
                let _ = child.kill();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The answer is read whole: the helper ends now.
                break wait_until(child, deadline);
            }
        }
        if Instant::now() >= deadline {
            break None;
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        return HelperOutcome::TimedOut { read };
    };
    let _ = reader.join();
    let stderr = errors.join().unwrap_or_default();
    if let Some(error) = malformed {
        return failed(format!("a malformed answer: {error}"), read);
    }
    if !status.success() {
        return failed(death(status, &stderr), read);
    }
    match last {
        Some(Message::Harvested(discovery)) => HelperOutcome::Harvested(*discovery),
        Some(Message::Unchanged) => HelperOutcome::Unchanged,
        _ => failed(format!("a malformed answer: {}", Malformed::Missing), read),
    }
}

/// Reads the helper's lines into `lines`, at most [`MAX_ANSWER_BYTES`] in
/// all; past that one error is sent and reading stops.
fn read_answer(stdout: impl std::io::Read, lines: &mpsc::Sender<Result<Message, Malformed>>) {
    let mut reader = BufReader::new(stdout.take(MAX_ANSWER_BYTES as u64 + 1));
    let mut total = 0;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(read) => total += read,
        }
        if total > MAX_ANSWER_BYTES {
            let _ = lines.send(Err(Malformed::Syntax(format!(
                "more than {MAX_ANSWER_BYTES} bytes"
            ))));
            return;
        }
        if lines.send(protocol::parse(line.trim_end())).is_err() {
            return;
        }
    }
}

/// Waits for the helper to exit until `deadline`.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

/// Why a helper died, in words: its signal or exit code, and its last
/// line on stderr (Rust's own note on a stack overflow or a panic).
fn death(status: ExitStatus, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let how = match (status.signal(), status.code()) {
        (Some(libc::SIGXCPU), _) => "out of CPU time (SIGXCPU)".to_owned(),
        (Some(signal), _) => format!("killed by signal {signal}"),
        (None, Some(code)) => format!("exit status {code}"),
        (None, None) => "ended".to_owned(),
    };
    match stderr.lines().map(str::trim).rfind(|line| !line.is_empty()) {
        Some(line) => format!("{how}: {line}"),
        None => how,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A helper that is a shell script: `body` runs where the helper would.
    fn script(dir: &tempfile::TempDir, body: &str) -> HelperProgram {
        let path = dir.path().join("helper.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        HelperProgram(path)
    }

    fn quick() -> ParseBudget {
        ParseBudget {
            time: Duration::from_millis(100),
            ..ParseBudget::default()
        }
    }

    /// An outcome, without the files it read (which may be many).
    fn describe(outcome: &HelperOutcome) -> String {
        match outcome {
            HelperOutcome::Failed { reason, read } => {
                format!("failed: {reason}, {} read", read.len())
            }
            HelperOutcome::TimedOut { read } => format!("timed out, {} read", read.len()),
            other => format!("{other:?}"),
        }
    }

    /// A descriptor of the test process without close-on-exec, the way a
    /// parent of the agent may leave one open; the helper must not see it.
    fn leak_a_descriptor(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("leaked-by-the-parent");
        let file = std::fs::File::create(&path).expect("marker");
        // SAFETY: dup of an open descriptor; the copy is left open on purpose.
        let copy = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(copy > 2, "dup: {}", std::io::Error::last_os_error());
        path
    }

    fn run_helper(body: &str) -> HelperOutcome {
        let dir = tempfile::tempdir().expect("tempdir");
        harvest(&script(&dir, body), std::process::id(), None, quick())
    }

    /// The helper starts with nothing of the agent's: no capabilities even
    /// for root, no_new_privs, the rlimits, only the root among the
    /// agent's descriptors. A line of the answer carries what it saw.
    #[test]
    fn the_helper_is_confined() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leaked = leak_a_descriptor(&dir);
        let helper = script(
            &dir,
            r#"status=$(grep -E '^(CapPrm|CapEff|NoNewPrivs):' /proc/self/status | tr -s '\t\n' '= ')
limits=$(grep -E '^Max (address space|cpu time|open files|file size|stack size)' /proc/self/limits | tr -s ' ' | cut -d' ' -f1-5 | tr '\n' ';')
fds=$(for fd in /proc/$$/fd/*; do [ "${fd##*/}" -gt 2 ] && readlink "$fd"; done | tr '\n' ' ')
printf '{"Reading":"%s oom=%s %s fds=%s"}\n' "$status" "$(cat /proc/self/oom_score_adj)" "$limits" "$fds"
exit 1"#,
        );
        let outcome = harvest(&helper, std::process::id(), None, quick());
        let HelperOutcome::Failed { reason, read } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reason, "exit status 1");
        let seen = read[0].display().to_string();
        for wanted in [
            "CapPrm:=0000000000000000",
            "CapEff:=0000000000000000",
            "NoNewPrivs:=1",
            "oom=1000",
            "Max cpu time 2 2",
            "Max open files 16 16",
            "Max file size 0 0",
            "Max address space 1073741824",
            "Max stack size 8388608",
        ] {
            assert!(seen.contains(wanted), "{wanted} not in {seen}");
        }
        // Beyond stdin, stdout and stderr: the root, and what the shell
        // itself opened (its script, its command substitution's pipe).
        let script_path = helper.0.display().to_string();
        let inherited: Vec<&str> = seen
            .split("fds=")
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .filter(|target| *target != script_path && !target.starts_with("pipe:"))
            .collect();
        assert_eq!(inherited, ["/"], "{} leaked? {seen}", leaked.display());
    }

    #[test]
    fn a_helper_past_its_deadline_is_killed() {
        let started = Instant::now();
        let outcome = run_helper(r#"echo '{"Reading":"/srv/app.py"}'; exec sleep 30"#);
        assert!(started.elapsed() < Duration::from_secs(5));
        let HelperOutcome::TimedOut { read } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(read, [PathBuf::from("/srv/app.py")]);
    }

    #[test]
    fn a_dead_or_babbling_helper_fails_with_its_reason() {
        let killed =
            run_helper(r#"echo "thread 'harvest' has overflowed its stack" >&2; kill -SEGV $$"#);
        assert!(
            matches!(&killed, HelperOutcome::Failed { reason, .. }
                if reason == "killed by signal 11: thread 'harvest' has overflowed its stack"),
            "{killed:?}"
        );
        let garbage = run_helper("echo 'not json'");
        assert!(
            matches!(&garbage, HelperOutcome::Failed { reason, .. } if reason.starts_with("a malformed answer: a line that is not a message")),
            "{garbage:?}"
        );
        let silent = run_helper("exit 0");
        assert!(
            matches!(&silent, HelperOutcome::Failed { reason, .. } if reason == "a malformed answer: no answer"),
            "{silent:?}"
        );
        // Past MAX_ANSWER_BYTES, or past MAX_LISTED files: stopped, not
        // read on.
        let flood = run_helper("head -c 20000000 /dev/zero | tr '\\0' a");
        assert!(
            matches!(&flood, HelperOutcome::Failed { reason, .. } if reason.contains("more than 8388608 bytes")),
            "{}",
            describe(&flood)
        );
        let files = run_helper(r#"yes '{"Reading":"/x"}' | head -n 5000"#);
        assert!(
            matches!(&files, HelperOutcome::Failed { reason, read } if reason.contains("1025 entries, more than 1024") && read.len() == 1024),
            "{}",
            describe(&files)
        );
        let unchanged = run_helper(r#"echo '"Unchanged"'"#);
        assert!(
            matches!(unchanged, HelperOutcome::Unchanged),
            "{unchanged:?}"
        );
    }
}
