//! What this side remembers of what it told the kernel: the listening
//! sockets it ignores and the server processes whose bits it set, each
//! within a budget of entries, so it can clear them when they go.

use std::collections::{HashMap, HashSet};

use exporter_common::ConnKey;
use prometheus::IntCounter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Not HTTP/1.x: TLS, another protocol, or upgraded (WebSocket).
    NotHttp,
    /// Not a server this agent monitors (`--port`, `--pid`, outside any pod).
    Unmonitored,
}

impl IgnoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::NotHttp => "not_http",
            IgnoreReason::Unmonitored => "unmonitored",
        }
    }
}

/// Listening sockets this side remembers as ignored (the kernel's own map
/// holds as many, LRU). Processes in any pod can open listeners.
pub(super) const MAX_IGNORED_LISTENERS: usize = 4_096;

/// The listening sockets this side told the kernel to ignore, within a
/// budget of entries. Past it a verdict still reaches the kernel but is not
/// remembered here (counted); from then on a listener found speaking HTTP
/// is cleared in the kernel even when it is not remembered.
#[derive(Debug)]
pub(super) struct IgnoredListeners {
    /// Why each is ignored, and the start time of its process (a reused
    /// pid is another process, whose listeners are judged anew).
    listeners: HashMap<ConnKey, (IgnoreReason, u64)>,
    max: usize,
    /// Some verdict went unremembered: the kernel may hold ones not here.
    unremembered: bool,
    budget: IntCounter,
}

impl IgnoredListeners {
    pub(super) fn new(max: usize, budget: IntCounter) -> Self {
        IgnoredListeners {
            listeners: HashMap::new(),
            max,
            unremembered: false,
            budget,
        }
    }

    /// Remembers a listener told to be ignored, and why, for the process
    /// started at `process_start`; whether it is new here.
    pub(super) fn remember(
        &mut self,
        listener: ConnKey,
        reason: IgnoreReason,
        process_start: u64,
    ) -> bool {
        if let Some(known) = self.listeners.get_mut(&listener) {
            *known = (reason, process_start);
            return false;
        }
        if self.listeners.len() >= self.max {
            self.unremembered = true;
            self.budget.inc();
            return false;
        }
        self.listeners
            .insert(listener, (reason, process_start))
            .is_none()
    }

    /// Why the listener is remembered as ignored.
    pub(super) fn reason_of(&self, listener: &ConnKey) -> Option<IgnoreReason> {
        self.listeners.get(listener).map(|&(reason, _)| reason)
    }

    /// Forgets the listeners ignored for `reason`; returns them.
    pub(super) fn forget_ignored_for(&mut self, reason: IgnoreReason) -> Vec<ConnKey> {
        self.forget_where(|_, why, _| why == reason)
    }

    /// Forgets the listeners `pick` names; returns them.
    pub(super) fn forget_where(
        &mut self,
        pick: impl Fn(&ConnKey, IgnoreReason, u64) -> bool,
    ) -> Vec<ConnKey> {
        self.listeners
            .extract_if(|listener, &mut (why, start)| pick(listener, why, start))
            .map(|(listener, _)| listener)
            .collect()
    }

    /// Forgets a listener found speaking HTTP: (whether it was remembered,
    /// whether the kernel may hold a verdict for it).
    pub(super) fn forget(&mut self, listener: &ConnKey) -> (bool, bool) {
        let remembered = self.listeners.remove(listener).is_some();
        (remembered, remembered || self.unremembered)
    }

    /// The listening fds of `tgid` told to be ignored.
    pub(super) fn fds_of(&self, tgid: u32) -> impl Iterator<Item = u32> + '_ {
        self.listeners
            .keys()
            .filter(move |listener| listener.tgid == tgid)
            .map(|listener| listener.fd)
    }

    /// Forgets the listeners of processes that exited, or whose pid names
    /// another process now (`runs`: whether a pid still names the process
    /// started then); returns them.
    pub(super) fn forget_exited(&mut self, runs: &dyn Fn(u32, u64) -> bool) -> Vec<ConnKey> {
        self.forget_where(|listener, _, start| !runs(listener.tgid, start))
    }

    pub(super) fn len(&self) -> usize {
        self.listeners.len()
    }
}

/// Server processes this side remembers, at most. Pods can start processes.
pub(super) const MAX_SERVER_PROCESSES: usize = 65_536;

/// The pids this side marked, or saw the kernel mark, as servers, so that
/// their bits are cleared when they exit; within a budget of entries. Past
/// it a pid is not remembered (counted): if it exits, its bit stays set, so
/// the kernel looks a little further into whatever process reuses the pid.
/// That costs time, never an exchange.
#[derive(Debug)]
pub(super) struct ServerProcesses {
    pids: HashSet<u32>,
    max: usize,
    budget: IntCounter,
}

impl ServerProcesses {
    pub(super) fn new(max: usize, budget: IntCounter) -> Self {
        ServerProcesses {
            pids: HashSet::new(),
            max,
            budget,
        }
    }

    pub(super) fn remember(&mut self, tgid: u32) {
        if self.pids.contains(&tgid) {
            return;
        }
        if self.pids.len() >= self.max {
            self.budget.inc();
            return;
        }
        self.pids.insert(tgid);
    }

    pub(super) fn forget(&mut self, tgid: u32) {
        self.pids.remove(&tgid);
    }

    /// Forgets the pids of processes that exited; returns them.
    pub(super) fn forget_exited(&mut self, alive: &dyn Fn(u32) -> bool) -> Vec<u32> {
        self.pids.extract_if(|&tgid| !alive(tgid)).collect()
    }

    pub(super) fn len(&self) -> usize {
        self.pids.len()
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;
    use crate::telemetry::{Budget, Budgets};

    #[test]
    fn ignored_listeners_stay_within_their_budget_and_still_clear() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let budget = budgets.counter(Budget::IgnoredListeners);
        let mut ignored = IgnoredListeners::new(2, budget.clone());
        let listener = |fd| ConnKey { tgid: 100, fd };
        const START: u64 = 5;
        assert!(ignored.remember(listener(3), IgnoreReason::NotHttp, START));
        assert!(
            !ignored.remember(listener(3), IgnoreReason::NotHttp, START),
            "already remembered"
        );
        assert!(ignored.remember(listener(4), IgnoreReason::NotHttp, START));
        // Past the budget: not remembered, counted.
        assert!(!ignored.remember(listener(5), IgnoreReason::NotHttp, START));
        assert_eq!(ignored.len(), 2);
        assert_eq!(budget.get(), 1);
        // A remembered listener found speaking HTTP is cleared; so is one
        // that went unremembered, which the kernel may still hold.
        assert_eq!(ignored.forget(&listener(3)), (true, true));
        assert_eq!(ignored.forget(&listener(5)), (false, true));
        // Listeners of exited processes are let go.
        assert!(ignored.remember(listener(6), IgnoreReason::NotHttp, START));
        let gone = ignored.forget_exited(&|tgid, _| tgid != 100);
        assert_eq!(gone.len(), 2);
        assert_eq!(ignored.len(), 0);
        // So are those of a process whose pid now names another.
        assert!(ignored.remember(listener(7), IgnoreReason::NotHttp, START + 1));
        assert!(ignored.remember(listener(8), IgnoreReason::NotHttp, START));
        let runs = |tgid, start| tgid == 100 && start == START;
        assert_eq!(ignored.forget_exited(&runs), vec![listener(7)]);
        assert_eq!(ignored.len(), 1);
        // Within budget, nothing unknown is cleared in the kernel.
        let mut within = IgnoredListeners::new(2, budget);
        assert_eq!(within.forget(&listener(9)), (false, false));
    }

    #[test]
    fn server_processes_stay_within_their_budget() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let budget = budgets.counter(Budget::ServerProcesses);
        let mut servers = ServerProcesses::new(2, budget.clone());
        servers.remember(10);
        servers.remember(10);
        servers.remember(11);
        assert_eq!(budget.get(), 0, "a pid remembered twice is one entry");
        // Past the budget: not remembered, counted.
        servers.remember(12);
        assert_eq!(servers.len(), 2);
        assert_eq!(budget.get(), 1);
        // Exited processes are let go, which makes room.
        assert_eq!(servers.forget_exited(&|tgid| tgid != 10), vec![10]);
        servers.remember(12);
        assert_eq!(servers.len(), 2);
        servers.forget(11);
        assert_eq!(servers.forget_exited(&|_| false), vec![12]);
        assert_eq!(budget.get(), 1);
    }
}
