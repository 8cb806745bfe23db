//! The compiled regexes of a rule set. A rule's converters come from
//! whoever wrote the rule (a pod annotation, an app's source), so the
//! memory their regexes take is bounded per converter, per rule set, per
//! workload and per node, and the rules of a set share the regex of one
//! source.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use prometheus::IntCounter;
use regex_automata::meta::{Config, Regex};

/// Most memory one converter's compiled regex may take (its NFA, and the
/// lazy DFA's cache when it matches).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Most memory the regexes of one rule set take: an annotation's rules, a
/// workload's harvest, or the flags' rules.
pub const MAX_SET_REGEX_BYTES: usize = 8 * 1024 * 1024;
/// Most memory the regexes of one workload's rule sets take together: its
/// pods' annotations (one set per distinct text) and its harvest, so that
/// one workload cannot take the node's budget from the others.
pub const MAX_WORKLOAD_REGEX_BYTES: usize = 16 * 1024 * 1024;
/// Most memory the regexes of all rule sets read from pods take together:
/// annotations and harvests of every workload on the node.
pub const MAX_NODE_REGEX_BYTES: usize = 64 * 1024 * 1024;

/// Why a regex was not compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegexRefused {
    #[error("its converters make a regex past {REGEX_SIZE_LIMIT} bytes")]
    TooBig,
    #[error("its regexes pass its rule set's {MAX_SET_REGEX_BYTES} bytes of compiled regex")]
    SetBudget,
    #[error("its regexes pass its workload's {MAX_WORKLOAD_REGEX_BYTES} bytes of compiled regex")]
    WorkloadBudget,
    #[error("its regexes pass the node's {MAX_NODE_REGEX_BYTES} bytes of compiled regex")]
    NodeBudget,
    #[error("its regex does not compile")]
    Malformed,
}

static WORKLOAD_REFUSALS: OnceLock<IntCounter> = OnceLock::new();

/// Regex memory shared by the rule sets that count against one budget.
#[derive(Clone, Debug)]
pub struct RegexMemory(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    used: AtomicUsize,
    max: usize,
    refused: OnceLock<IntCounter>,
}

impl RegexMemory {
    pub fn with_limit(max: usize) -> Self {
        RegexMemory(Arc::new(Shared {
            used: AtomicUsize::new(0),
            max,
            refused: OnceLock::new(),
        }))
    }

    /// The node's: every rule set read from a pod counts against it.
    pub fn node() -> &'static RegexMemory {
        static NODE: OnceLock<RegexMemory> = OnceLock::new();
        NODE.get_or_init(|| RegexMemory::with_limit(MAX_NODE_REGEX_BYTES))
    }

    /// The workload's, by a name that tells workloads apart: every rule
    /// set of its pods and its source counts against it (and against the
    /// node's). Kept while a set of the workload lives.
    pub fn workload(workload: &str) -> RegexMemory {
        static WORKLOADS: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
        let mut workloads = WORKLOADS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = workloads.get(workload).and_then(Weak::upgrade) {
            return RegexMemory(shared);
        }
        // Workloads whose sets are all gone are let go here, so the map
        // holds no more workloads than live sets.
        workloads.retain(|_, shared| shared.strong_count() > 0);
        let memory = RegexMemory::with_limit(MAX_WORKLOAD_REGEX_BYTES);
        if let Some(counter) = WORKLOAD_REFUSALS.get() {
            memory.count_refusals_in(counter.clone());
        }
        workloads.insert(workload.to_owned(), Arc::downgrade(&memory.0));
        memory
    }

    /// Where regexes refused for any workload's budget are counted (set
    /// once, at start).
    pub fn count_workload_refusals_in(counter: IntCounter) {
        let _ = WORKLOAD_REFUSALS.set(counter);
    }

    /// Where regexes refused for this budget are counted (once set).
    pub fn count_refusals_in(&self, counter: IntCounter) {
        let _ = self.0.refused.set(counter);
    }

    /// Bytes the live rule sets' regexes take.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) -> bool {
        let charged = self
            .0
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= self.0.max).then_some(used + bytes)
            })
            .is_ok();
        if !charged && let Some(counter) = self.0.refused.get() {
            counter.inc();
        }
        charged
    }

    fn release(&self, bytes: usize) {
        self.0.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// What a set's regexes count against besides its own budget, and what a
/// refusal by each is called.
#[derive(Clone, Debug, Default)]
pub struct SharedBudgets {
    pub workload: Option<RegexMemory>,
    pub node: Option<RegexMemory>,
}

impl SharedBudgets {
    /// A workload's set: its workload's budget, then the node's.
    /// `workload`: a name that tells workloads apart.
    pub fn of_workload(workload: &str) -> Self {
        SharedBudgets {
            workload: Some(RegexMemory::workload(workload)),
            node: Some(RegexMemory::node().clone()),
        }
    }

    /// Charges every budget or none.
    fn charge(&self, bytes: usize) -> Result<(), RegexRefused> {
        if let Some(workload) = &self.workload
            && !workload.charge(bytes)
        {
            return Err(RegexRefused::WorkloadBudget);
        }
        if let Some(node) = &self.node
            && !node.charge(bytes)
        {
            if let Some(workload) = &self.workload {
                workload.release(bytes);
            }
            return Err(RegexRefused::NodeBudget);
        }
        Ok(())
    }

    fn release(&self, bytes: usize) {
        for memory in [&self.workload, &self.node].into_iter().flatten() {
            memory.release(bytes);
        }
    }
}

/// A rule set's regexes by source, and the memory they take; given back
/// to the shared budgets when the set goes.
#[derive(Debug)]
pub struct RegexCache {
    by_source: HashMap<String, Regex>,
    bytes: usize,
    max_bytes: usize,
    shared: SharedBudgets,
}

impl Default for RegexCache {
    fn default() -> Self {
        RegexCache::new(MAX_SET_REGEX_BYTES, SharedBudgets::default())
    }
}

impl RegexCache {
    /// A set of at most `max_bytes`, counted against `shared` too.
    pub fn new(max_bytes: usize, shared: SharedBudgets) -> Self {
        RegexCache {
            by_source: HashMap::new(),
            bytes: 0,
            max_bytes,
            shared,
        }
    }

    /// The regex of `source`, compiled once per set.
    pub fn compile(&mut self, source: &str) -> Result<Regex, RegexRefused> {
        if let Some(regex) = self.by_source.get(source) {
            return Ok(regex.clone());
        }
        let regex = Regex::builder()
            .configure(
                Config::new()
                    .nfa_size_limit(Some(REGEX_SIZE_LIMIT))
                    .onepass_size_limit(Some(REGEX_SIZE_LIMIT))
                    .dfa_size_limit(Some(REGEX_SIZE_LIMIT))
                    .hybrid_cache_capacity(REGEX_SIZE_LIMIT),
            )
            .build(source)
            .map_err(|error| match error.size_limit() {
                Some(_) => RegexRefused::TooBig,
                None => RegexRefused::Malformed,
            })?;
        let bytes = regex.memory_usage();
        if self.bytes + bytes > self.max_bytes {
            return Err(RegexRefused::SetBudget);
        }
        self.shared.charge(bytes)?;
        self.bytes += bytes;
        self.by_source.insert(source.to_owned(), regex.clone());
        Ok(regex)
    }

    /// Bytes this set's regexes take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for RegexCache {
    fn drop(&mut self) {
        self.shared.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One set's regexes stay within its budget, whatever the node has
    /// left; a source compiled before costs nothing again.
    #[test]
    fn a_set_stays_within_its_own_budget() {
        let node = RegexMemory::with_limit(usize::MAX);
        let mut cache = RegexCache::new(
            100_000,
            SharedBudgets {
                workload: None,
                node: Some(node.clone()),
            },
        );
        let mut compiled = 0;
        let refused =
            (1..200).find_map(
                |n| match cache.compile(&format!(r"^(?:(?P<c0>[^/]{{{n}}}))\z")) {
                    Ok(_) => {
                        compiled += 1;
                        None
                    }
                    Err(refused) => Some(refused),
                },
            );
        assert_eq!(refused, Some(RegexRefused::SetBudget));
        assert!(
            compiled > 1 && cache.bytes() <= 100_000,
            "{compiled} {}",
            cache.bytes()
        );
        assert_eq!(node.used(), cache.bytes());
        let before = cache.bytes();
        assert!(cache.compile(r"^(?:(?P<c0>[^/]{1}))\z").is_ok());
        assert_eq!(cache.bytes(), before);
        assert_eq!(
            cache.compile(&format!("[^/]{{{}}}", 1_000_000)).err(),
            Some(RegexRefused::TooBig)
        );
        drop(cache);
        assert_eq!(node.used(), 0);
    }

    /// One workload's sets together stay within its budget, and what a
    /// refused regex would have taken is given back to the node's.
    #[test]
    fn a_workloads_sets_share_its_budget() {
        let node = RegexMemory::with_limit(usize::MAX);
        let workload = RegexMemory::with_limit(150_000);
        let shared = SharedBudgets {
            workload: Some(workload.clone()),
            node: Some(node.clone()),
        };
        let fill = |cache: &mut RegexCache, tag: &str| {
            (1..400).find_map(|n| {
                cache
                    .compile(&format!(r"^(?:(?P<{tag}>[^/]{{{n}}}))\z"))
                    .err()
            })
        };
        let mut first = RegexCache::new(100_000, shared.clone());
        assert_eq!(fill(&mut first, "a"), Some(RegexRefused::SetBudget));
        let mut second = RegexCache::new(100_000, shared);
        assert_eq!(fill(&mut second, "b"), Some(RegexRefused::WorkloadBudget));
        assert!(workload.used() <= 150_000);
        assert_eq!(node.used(), first.bytes() + second.bytes());
        assert_eq!(workload.used(), node.used());
        drop((first, second));
        assert_eq!((workload.used(), node.used()), (0, 0));
    }

    /// A workload's budget is one while any of its sets lives.
    #[test]
    fn a_workload_has_one_budget_while_its_sets_live() {
        let one = RegexMemory::workload("test/regex-budget-one");
        let again = RegexMemory::workload("test/regex-budget-one");
        let other = RegexMemory::workload("test/regex-budget-other");
        assert!(Arc::ptr_eq(&one.0, &again.0));
        assert!(!Arc::ptr_eq(&one.0, &other.0));
        assert!(one.charge(10));
        assert_eq!(again.used(), 10);
        assert_eq!(other.used(), 0);
    }
}
