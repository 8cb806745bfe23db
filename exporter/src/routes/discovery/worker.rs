//! Harvests run off the pipeline's thread: reading and parsing an app's
//! source takes milliseconds to seconds, and the pipeline must keep
//! draining the ring buffer meanwhile. Each harvest runs in a helper
//! process ([`super::helper`]), up to [`CONCURRENT_HELPERS`] at once (one
//! slow source must not keep every other app waiting past its wait for
//! rules), one at a time per workload. The worker keeps each workload's
//! last harvest: a later process of the workload that runs the same files
//! costs a stat per file, and one that runs other files is read again. A
//! workload whose helper failed is not tried again until its command line
//! or a file the helper was reading changes.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, Receiver, Sender},
    },
    thread,
};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::{info, warn};

use super::{
    Discovery, FileStamp, ParseBudget, ProcessRoot, SourceTree as _,
    helper::{self, HelperOutcome, HelperProgram},
    rules::SourceRules,
};
use crate::{
    exchange::WorkloadKey,
    procfs,
    rules::regexes::SharedBudgets,
    telemetry::{Budget, Budgets},
};

/// Workloads whose last harvest (or failure) is kept; past it, one is
/// dropped (and read again if it comes back).
pub const CACHED_WORKLOADS: usize = 1024;
/// Helpers running at once, at most.
pub const CONCURRENT_HELPERS: usize = 4;

/// What became of one process's source.
#[derive(Debug)]
pub enum Outcome {
    /// Read (the first process of its workload, or one whose files differ),
    /// and compiled into a matcher here, off the pipeline's thread.
    Harvested(Arc<SourceRules>),
    /// The same entrypoint and files as the workload's last harvest.
    Unchanged,
    /// No rules from the source: the helper failed (now or, with the same
    /// files, before). Why, in words.
    Failed(String),
}

/// What the worker counts.
#[derive(Clone, Debug)]
pub struct DiscoveryCounters {
    /// Harvests that ran out of their parse budget.
    pub budget_spent: IntCounter,
    /// Cached harvests dropped past [`CACHED_WORKLOADS`].
    pub cache_budget: IntCounter,
    pub harvested: IntCounter,
    pub unchanged: IntCounter,
    pub failed: IntCounter,
    pub timed_out: IntCounter,
    /// Processes of a workload whose helper failed, with the same files.
    pub not_retried: IntCounter,
}

impl DiscoveryCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        let processes = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_route_discovery_processes_total",
                "Server processes whose source was looked at, each in a helper process: outcome=\"harvested\" read and parsed (a workload's first process, or one running other files than the last one read), \"unchanged\" the same entrypoint and file stamps as its workload's last harvest, \"failed\" the helper died or answered something malformed, \"timed_out\" it was killed at its deadline, \"not_retried\" a process of a workload whose helper failed, with the same command line and files",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(processes.clone()))?;
        Ok(DiscoveryCounters {
            budget_spent: budgets.counter(Budget::RouteDiscoveryParse),
            cache_budget: budgets.counter(Budget::RouteDiscoveryCache),
            harvested: processes.with_label_values(&["harvested"]),
            unchanged: processes.with_label_values(&["unchanged"]),
            failed: processes.with_label_values(&["failed"]),
            timed_out: processes.with_label_values(&["timed_out"]),
            not_retried: processes.with_label_values(&["not_retried"]),
        })
    }
}

/// A thread that has apps' rules read from their source, in helpers.
pub struct DiscoveryWorker {
    requests: Sender<Event>,
    results: Receiver<(WorkloadKey, Outcome)>,
}

/// What the worker thread hears: an ask, a helper's end, or the worker's.
enum Event {
    Ask(WorkloadKey, u32),
    Done(WorkloadKey, u32, Box<HelperOutcome>),
    Stop,
}

impl DiscoveryWorker {
    pub fn start(
        program: HelperProgram,
        budget: ParseBudget,
        counters: DiscoveryCounters,
    ) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Event>();
        let (outgoing, results) = mpsc::channel();
        let done = requests.clone();
        thread::Builder::new()
            .name("route-discovery".to_owned())
            .spawn(move || {
                let mut state = Harvests {
                    program,
                    budget,
                    counters,
                    last: HashMap::new(),
                    logged: HashSet::new(),
                    running: HashSet::new(),
                    waiting: VecDeque::new(),
                    done,
                };
                for event in incoming {
                    let answers = match event {
                        Event::Ask(workload, tgid) => {
                            state.waiting.push_back((workload, tgid));
                            Vec::new()
                        }
                        Event::Done(workload, tgid, outcome) => {
                            state.running.remove(&workload);
                            vec![(workload.clone(), state.finish(&workload, tgid, *outcome))]
                        }
                        Event::Stop => return,
                    };
                    for answer in answers.into_iter().chain(state.start_waiting()) {
                        if outgoing.send(answer).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(DiscoveryWorker { requests, results })
    }

    /// Reads the source of the app `tgid` serves, for `workload`, unless
    /// it is the one last read for the workload.
    pub fn ask(&self, workload: WorkloadKey, tgid: u32) {
        // The thread only ends with the worker.
        let _ = self.requests.send(Event::Ask(workload, tgid));
    }

    /// Answers since the last call: a workload's in the order asked.
    pub fn finished(&self) -> impl Iterator<Item = (WorkloadKey, Outcome)> + '_ {
        self.results.try_iter()
    }
}

impl Drop for DiscoveryWorker {
    fn drop(&mut self) {
        // The thread holds a sender of its own (for its helpers' ends).
        let _ = self.requests.send(Event::Stop);
    }
}

/// A workload's last look at its source.
enum Last {
    Harvested(Discovery),
    /// The helper failed: why, the command line, and the files it had begun
    /// to read with their stamps then.
    Failed {
        reason: String,
        argv: Vec<String>,
        files: Vec<(PathBuf, Option<FileStamp>)>,
    },
}

/// The worker thread's state.
struct Harvests {
    program: HelperProgram,
    budget: ParseBudget,
    counters: DiscoveryCounters,
    last: HashMap<WorkloadKey, Last>,
    /// Workloads whose failure was logged (once each).
    logged: HashSet<WorkloadKey>,
    /// Workloads with a helper running.
    running: HashSet<WorkloadKey>,
    /// Asks not started yet, in order.
    waiting: VecDeque<(WorkloadKey, u32)>,
    /// Where helpers' ends are sent.
    done: Sender<Event>,
}

impl Harvests {
    /// Starts helpers for waiting asks while there is room, one per
    /// workload at a time; answers at once the asks that need none.
    fn start_waiting(&mut self) -> Vec<(WorkloadKey, Outcome)> {
        let mut answers = Vec::new();
        let mut index = 0;
        while index < self.waiting.len() && self.running.len() < CONCURRENT_HELPERS {
            if self.running.contains(&self.waiting[index].0) {
                index += 1;
                continue;
            }
            let Some((workload, tgid)) = self.waiting.remove(index) else {
                break;
            };
            let previous = match self.last.get(&workload) {
                Some(Last::Failed {
                    reason,
                    argv,
                    files,
                }) if same_failure(tgid, argv, files) => {
                    self.counters.not_retried.inc();
                    answers.push((workload, Outcome::Failed(reason.clone())));
                    continue;
                }
                Some(Last::Harvested(previous)) => Some(previous.clone()),
                _ => None,
            };
            let (program, budget, done) = (self.program.clone(), self.budget, self.done.clone());
            let key = workload.clone();
            let started = thread::Builder::new()
                .name("route-discovery-helper".to_owned())
                .spawn(move || {
                    let outcome = helper::harvest(&program, tgid, previous.as_ref(), budget);
                    let _ = done.send(Event::Done(key, tgid, Box::new(outcome)));
                });
            match started {
                Ok(_) => {
                    self.running.insert(workload);
                }
                Err(error) => {
                    let outcome = HelperOutcome::Failed {
                        reason: format!("starting a thread for the helper: {error}"),
                        read: Vec::new(),
                    };
                    answers.push((workload.clone(), self.finish(&workload, tgid, outcome)));
                }
            }
        }
        answers
    }

    /// Counts and keeps what a helper found.
    fn finish(&mut self, workload: &WorkloadKey, tgid: u32, outcome: HelperOutcome) -> Outcome {
        let last = match outcome {
            HelperOutcome::Unchanged => {
                self.counters.unchanged.inc();
                return Outcome::Unchanged;
            }
            HelperOutcome::Harvested(discovery) => {
                self.logged.remove(workload);
                self.count_harvest(tgid, &discovery);
                Last::Harvested(discovery)
            }
            HelperOutcome::Failed { reason, read } => {
                self.counters.failed.inc();
                self.failed(workload, tgid, reason, read)
            }
            HelperOutcome::TimedOut { read } => {
                self.counters.timed_out.inc();
                let reason = format!(
                    "the helper was still reading after {:?}: killed",
                    self.budget.time
                );
                self.failed(workload, tgid, reason, read)
            }
        };
        let outcome = match &last {
            Last::Harvested(discovery) => Outcome::Harvested(Arc::new(SourceRules::new(
                discovery.clone(),
                SharedBudgets::of_workload(&format!("{workload:?}")),
            ))),
            Last::Failed { reason, .. } => Outcome::Failed(reason.clone()),
        };
        if self.last.len() >= CACHED_WORKLOADS
            && !self.last.contains_key(workload)
            && let Some(dropped) = self.last.keys().next().cloned()
        {
            self.last.remove(&dropped);
            self.counters.cache_budget.inc();
        }
        self.last.insert(workload.clone(), last);
        outcome
    }

    fn failed(
        &mut self,
        workload: &WorkloadKey,
        tgid: u32,
        reason: String,
        read: Vec<PathBuf>,
    ) -> Last {
        if self.logged.insert(workload.clone()) {
            warn!(
                tgid,
                ?workload,
                %reason,
                "route discovery failed: this workload's routes are learned from its traffic until its files change"
            );
        }
        let root = ProcessRoot::of(tgid);
        let files = read
            .into_iter()
            .map(|path| {
                let stamp = root.stamp(&path);
                (path, stamp)
            })
            .collect();
        Last::Failed {
            reason,
            argv: procfs::command_line_arguments(tgid).unwrap_or_default(),
            files,
        }
    }

    fn count_harvest(&self, tgid: u32, discovery: &Discovery) {
        self.counters.harvested.inc();
        if discovery.budget_spent {
            self.counters.budget_spent.inc();
        }
        info!(
            tgid,
            entrypoint = discovery.entrypoint.as_deref().unwrap_or("none found"),
            rules = discovery.rules.len(),
            files = discovery.files.len(),
            unresolved = discovery.unresolved.len(),
            "url rules read from the app's source"
        );
        for reason in &discovery.unresolved {
            warn!(tgid, "route discovery: {reason}");
        }
    }
}

/// Whether process `tgid` runs what a failed helper was reading: the same
/// command line, and each file it had begun to read unchanged (a stat each,
/// through the process's root).
fn same_failure(tgid: u32, argv: &[String], files: &[(PathBuf, Option<FileStamp>)]) -> bool {
    if procfs::command_line_arguments(tgid).as_deref() != Some(argv) {
        return false;
    }
    let root = ProcessRoot::of(tgid);
    files.iter().all(|(path, stamp)| root.stamp(path) == *stamp)
}
