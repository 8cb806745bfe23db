//! The compiled regexes of a rule set. A rule's converters come from
//! whoever wrote the rule (a pod annotation, an app's source), so the
//! memory their regexes take is bounded per converter, per rule set and
//! per node, and the rules of a set share the regex of one source.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
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
    #[error("its regexes pass the node's {MAX_NODE_REGEX_BYTES} bytes of compiled regex")]
    NodeBudget,
    #[error("its regex does not compile")]
    Malformed,
}

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

/// A rule set's regexes by source, and the memory they take; given back
/// to the node's budget when the set goes.
#[derive(Debug)]
pub struct RegexCache {
    by_source: HashMap<String, Regex>,
    bytes: usize,
    max_bytes: usize,
    memory: Option<RegexMemory>,
}

impl Default for RegexCache {
    fn default() -> Self {
        RegexCache::new(MAX_SET_REGEX_BYTES, None)
    }
}

impl RegexCache {
    /// A set of at most `max_bytes`, counted against `memory` when given.
    pub fn new(max_bytes: usize, memory: Option<RegexMemory>) -> Self {
        RegexCache {
            by_source: HashMap::new(),
            bytes: 0,
            max_bytes,
            memory,
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
        if let Some(memory) = &self.memory
            && !memory.charge(bytes)
        {
            return Err(RegexRefused::NodeBudget);
        }
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
        if let Some(memory) = &self.memory {
            memory.release(self.bytes);
        }
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
        let mut cache = RegexCache::new(100_000, Some(node.clone()));
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
}
