//! A workload's rules as read from its source, compiled into a matcher
//! on the worker's thread (its regexes are what the source makes them,
//! within the set's and the node's budgets), never on the pipeline's.

use std::collections::HashMap;

use super::{Discovery, HarvestedRule};
use crate::rules::{flask::RuleSet, regexes::SharedBudgets};

/// A workload's rules as read from its source, matched as user rules are.
#[derive(Debug)]
pub struct SourceRules {
    pub discovery: Discovery,
    pub set: RuleSet,
    /// Each rule text's first registration in `discovery.rules`.
    by_text: HashMap<String, usize>,
}

impl SourceRules {
    /// The matcher over a harvest, its regexes counted against `shared`
    /// (its workload's and the node's budgets); rules it cannot take are
    /// added to what could not be resolved.
    pub fn new(mut discovery: Discovery, shared: SharedBudgets) -> Self {
        let mut set = RuleSet::counted_in(shared);
        for rule in &discovery.rules {
            let methods: Vec<&str> = rule.methods.iter().map(String::as_str).collect();
            if let Err(error) = set.add(
                &rule.rule,
                Some(&methods),
                rule.strict_slashes,
                Some(&rule.endpoint),
            ) {
                discovery.unresolved.push(error.to_string());
            }
        }
        set.finish();
        let mut by_text = HashMap::with_capacity(discovery.rules.len());
        for (index, rule) in discovery.rules.iter().enumerate() {
            by_text.entry(rule.rule.clone()).or_insert(index);
        }
        SourceRules {
            discovery,
            set,
            by_text,
        }
    }

    /// Where the rule with this text was first registered.
    pub fn registered(&self, text: &str) -> Option<&HarvestedRule> {
        self.discovery.rules.get(*self.by_text.get(text)?)
    }
}
