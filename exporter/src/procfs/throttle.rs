//! How often a process's sockets may be scanned.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// When each process was last scanned, so that one is scanned at most
/// once per interval however many of its connections ask; within a
/// budget of processes (past it, the oldest half is forgotten: a process
/// forgotten early is scanned again sooner, which costs time, never a
/// label).
#[derive(Debug)]
pub struct ScanThrottle {
    last: HashMap<u32, Instant>,
    interval: Duration,
    max_processes: usize,
}

impl ScanThrottle {
    pub fn new(interval: Duration, max_processes: usize) -> Self {
        ScanThrottle {
            last: HashMap::new(),
            interval,
            max_processes,
        }
    }

    /// Whether `tgid` may be scanned now (and, if so, it is noted).
    pub fn may_scan(&mut self, tgid: u32, now: Instant) -> bool {
        if let Some(&at) = self.last.get(&tgid)
            && now.duration_since(at) < self.interval
        {
            return false;
        }
        if self.last.len() >= self.max_processes && !self.last.contains_key(&tgid) {
            let mut times: Vec<Instant> = self.last.values().copied().collect();
            let middle = times.len() / 2;
            let (_, &mut median, _) = times.select_nth_unstable(middle);
            self.last.retain(|_, at| *at > median);
        }
        self.last.insert(tgid, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many connections ask, a process is scanned once per
    /// interval; the set of processes stays within its budget.
    #[test]
    fn a_process_is_scanned_once_per_interval() {
        let mut throttle = ScanThrottle::new(Duration::from_secs(1), 4);
        let start = Instant::now();
        assert!(throttle.may_scan(7, start));
        assert!(!throttle.may_scan(7, start + Duration::from_millis(10)));
        assert!(throttle.may_scan(8, start));
        assert!(throttle.may_scan(7, start + Duration::from_secs(1)));
        for (n, tgid) in (100..200).enumerate() {
            assert!(throttle.may_scan(tgid, start + Duration::from_millis(n as u64)));
            assert!(throttle.last.len() <= 4);
        }
    }
}
