//! Route templates learned from a workload's traffic, for when no user rule
//! names a request: a trie of path segments in which
//!
//! - segments that look like values (integers, UUIDs, hex ids, dates,
//!   floats, long tokens) are parameters of that type from the start;
//! - a position that has seen more than `segment_cap` distinct literal
//!   values under the same prefix (four times that for the first segment,
//!   an app's sections) becomes a `<string>` parameter, its
//!   subtrees merged (literals much busier than the rest stay literal: they
//!   are static siblings such as `/users/me`);
//! - a `<string>` parameter whose subtree has routes of several depths and
//!   many values again becomes `<path>`, the rest of the path; a last
//!   segment that keeps coming back under it (`<path>/meta`) stays literal.

use std::collections::HashMap;

use smallvec::SmallVec;

/// A learned parameter's type, and its text in templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    Int,
    Uuid,
    Hex,
    Date,
    Float,
    Token,
    String,
    Path,
}

impl Param {
    pub fn text(self) -> &'static str {
        match self {
            Param::Int => "<int>",
            Param::Uuid => "<uuid>",
            Param::Hex => "<hex>",
            Param::Date => "<date>",
            Param::Float => "<float>",
            Param::Token => "<token>",
            Param::String => "<string>",
            Param::Path => "<path>",
        }
    }

    /// Learned from cardinality, not from how one value looks.
    pub fn is_learned(self) -> bool {
        matches!(self, Param::String | Param::Path)
    }
}

/// Longest segment kept as a literal; a longer one is a `<string>` value.
pub const MAX_LITERAL_SEGMENT_BYTES: usize = 64;

/// The type a single segment's value has, if it looks like a value.
pub fn classify(segment: &str) -> Option<Param> {
    if segment.is_empty() {
        return None;
    }
    if segment.len() > MAX_LITERAL_SEGMENT_BYTES {
        return Some(Param::String);
    }
    let bytes = segment.as_bytes();
    if bytes.iter().all(u8::is_ascii_digit) {
        return Some(Param::Int);
    }
    if is_uuid(segment) {
        return Some(Param::Uuid);
    }
    if is_date(bytes) {
        return Some(Param::Date);
    }
    if bytes.contains(&b'.')
        && bytes
            .iter()
            .all(|b| b.is_ascii_digit() || *b == b'.' || *b == b'-')
        && segment.parse::<f64>().is_ok()
    {
        return Some(Param::Float);
    }
    let has_digit = bytes.iter().any(u8::is_ascii_digit);
    if bytes.len() >= 16 && has_digit && bytes.iter().all(u8::is_ascii_hexdigit) {
        return Some(Param::Hex);
    }
    let token_chars = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if bytes.len() >= 20 && has_digit && token_chars {
        return Some(Param::Token);
    }
    None
}

/// 8-4-4-4-12 hex digits.
fn is_uuid(segment: &str) -> bool {
    const DASHES: [usize; 4] = [8, 13, 18, 23];
    segment.len() == 36
        && segment.bytes().enumerate().all(|(i, b)| {
            if DASHES.contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

fn is_date(bytes: &[u8]) -> bool {
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

/// A literal busier than this many times the average of its siblings stays
/// literal when they become a parameter.
const HOT_LITERAL_FACTOR: u64 = 4;
/// ... and it must have been seen at least this often.
const HOT_LITERAL_MIN_HITS: u64 = 5;
/// A last segment under `<path>` seen this often, and at least this share
/// of the parameter's requests, is a static suffix.
const PATH_SUFFIX_MIN_HITS: u64 = 5;
const PATH_SUFFIX_MIN_SHARE: f64 = 0.1;
/// Segments past this depth are one `<path>`.
const MAX_DEPTH: usize = 32;
/// Last segments tracked under one `<path>` parameter.
const MAX_PATH_SUFFIXES: usize = 64;

#[derive(Debug, Default, Clone)]
struct Node {
    literals: HashMap<String, Node>,
    params: Vec<(Param, Node)>,
    /// A request ended here.
    terminal: bool,
    hits: u64,
    /// Under a `<path>` parameter: how often each last segment was seen.
    path_suffixes: HashMap<String, u64>,
}

impl Node {
    /// Nodes in this subtree, each tracked `<path>` suffix counted as one.
    fn size(&self) -> usize {
        1 + self.path_suffixes.len()
            + self.literals.values().map(Node::size).sum::<usize>()
            + self
                .params
                .iter()
                .map(|(_, node)| node.size())
                .sum::<usize>()
    }

    fn param(&mut self, param: Param) -> &mut Node {
        let index = match self.params.iter().position(|(p, _)| *p == param) {
            Some(index) => index,
            None => {
                self.params.push((param, Node::default()));
                self.params.sort_by_key(|(p, _)| *p);
                self.params
                    .iter()
                    .position(|(p, _)| *p == param)
                    .unwrap_or_default()
            }
        };
        &mut self.params[index].1
    }

    fn has_param(&self, param: Param) -> bool {
        self.params.iter().any(|(p, _)| *p == param)
    }

    /// Folds `other` into `self`.
    fn merge(&mut self, other: Node) {
        self.terminal |= other.terminal;
        self.hits += other.hits;
        for (segment, child) in other.literals {
            match self.literals.get_mut(&segment) {
                Some(existing) => existing.merge(child),
                None => {
                    self.literals.insert(segment, child);
                }
            }
        }
        for (param, child) in other.params {
            self.param(param).merge(child);
        }
        for (suffix, hits) in other.path_suffixes {
            *self.path_suffixes.entry(suffix).or_default() += hits;
        }
    }

    /// Depths (from here) at which requests ended.
    fn terminal_depths(&self, depth: usize, out: &mut Vec<usize>) {
        if self.terminal && !out.contains(&depth) {
            out.push(depth);
        }
        for child in self.literals.values() {
            child.terminal_depths(depth + 1, out);
        }
        for (_, child) in &self.params {
            child.terminal_depths(depth + 1, out);
        }
    }
}

/// How a label was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Contains a parameter learned from cardinality (`<string>`, `<path>`).
    Learned,
    /// Literal segments and typed parameters only.
    Heuristic,
}

/// One workload's learned routes.
#[derive(Debug)]
pub struct RouteLearner {
    /// Template prefixes made obsolete by collapses since the last
    /// [`RouteLearner::take_retired`].
    retired: Vec<String>,
    root: Node,
    segment_cap: usize,
    max_nodes: usize,
    nodes: usize,
}

impl RouteLearner {
    pub fn new(segment_cap: usize, max_nodes: usize) -> Self {
        RouteLearner {
            retired: Vec::new(),
            root: Node::default(),
            segment_cap: segment_cap.max(1),
            max_nodes,
            nodes: 1,
        }
    }

    /// Learns from a served path and returns its template; `None` when the
    /// path needs new nodes and the node budget is spent (nothing learned).
    pub fn learn(&mut self, path: &str) -> Option<(String, Learned)> {
        let mut template = String::new();
        let learned = self.learn_into(path, &mut template)?;
        Some((template, learned))
    }

    /// [`Self::learn`], writing the template into `template` (cleared
    /// first), so that a caller reusing one buffer allocates nothing.
    pub fn learn_into(&mut self, path: &str, template: &mut String) -> Option<Learned> {
        let segments: Segments = path.split('/').skip(1).collect();
        let limits = Limits {
            segment_cap: self.segment_cap,
            room: self.max_nodes.saturating_sub(self.nodes),
        };
        template.clear();
        let mut walk = Walk {
            template,
            learned: Learned::Heuristic,
            created: 0,
            collapsed: false,
        };
        let mut node = &mut self.root;
        let mut index = 0;
        while index < segments.len() {
            let segment = segments[index];
            walk.template.push('/');
            if index >= MAX_DEPTH || node.has_param(Param::Path) {
                learn_path_tail(node, &segments[index..], &limits, &mut walk);
                self.count_nodes(walk.created, walk.collapsed);
                return Some(walk.learned);
            }
            node = match choose(
                node,
                segment,
                limits.cap_at(index),
                &limits,
                &mut walk,
                &mut self.retired,
            ) {
                Descend::Param(param) => node.param(param),
                Descend::KnownLiteral => node
                    .literals
                    .get_mut(segment)
                    .unwrap_or_else(|| unreachable!("chosen because it is there")),
                Descend::NewLiteral => node.literals.entry(segment.to_owned()).or_default(),
                // `<path>` takes this segment and the rest: read it again.
                Descend::PathFromHere => continue,
                Descend::NoRoom => {
                    self.count_nodes(walk.created, walk.collapsed);
                    return None;
                }
            };
            index += 1;
        }
        node.hits += 1;
        node.terminal = true;
        self.count_nodes(walk.created, walk.collapsed);
        Some(walk.learned)
    }

    /// The template of a path, without learning it; `None` if it does not
    /// end where a learned route ends.
    pub fn fit(&self, path: &str) -> Option<(String, Learned)> {
        let mut template = String::new();
        let learned = self.fit_into(path, &mut template)?;
        Some((template, learned))
    }

    /// [`Self::fit`], writing the template into `template` (cleared first).
    pub fn fit_into(&self, path: &str, template: &mut String) -> Option<Learned> {
        let segments: Segments = path.split('/').skip(1).collect();
        template.clear();
        fit_node(&self.root, &segments, template)
    }

    /// Prefixes of templates a collapse made obsolete (`/tags/rust`: that
    /// template and every one below it), since the last call.
    pub fn take_retired(&mut self) -> Vec<String> {
        std::mem::take(&mut self.retired)
    }

    /// Nodes in the trie (bounded by `max_nodes`).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Keeps the node count: added nodes, or a recount after a collapse
    /// merged subtrees (rare, so the walk is affordable).
    fn count_nodes(&mut self, created: usize, collapsed: bool) {
        if collapsed {
            self.nodes = self.root.size();
        } else {
            self.nodes += created;
        }
    }
}

/// What may grow while learning one path.
struct Limits {
    segment_cap: usize,
    /// Nodes the budget still allows.
    room: usize,
}

impl Limits {
    /// Whether one more node fits, `created` being made already.
    fn can_grow(&self, walk: &Walk) -> bool {
        walk.created < self.room
    }

    /// First segments are an app's sections, nearly always static: they
    /// get a larger cap.
    fn cap_at(&self, depth: usize) -> usize {
        if depth == 0 {
            self.segment_cap * 4
        } else {
            self.segment_cap
        }
    }
}

/// A path's segments, inline for all but unusually deep paths.
type Segments<'a> = SmallVec<[&'a str; 16]>;

/// The template of the path being learned, so far.
struct Walk<'t> {
    template: &'t mut String,
    learned: Learned,
    /// Nodes added.
    created: usize,
    /// A position became a parameter, merging subtrees.
    collapsed: bool,
}

/// Where the walk goes from a node.
enum Descend {
    Param(Param),
    KnownLiteral,
    NewLiteral,
    /// The node now has a `<path>` parameter, which takes this segment on.
    PathFromHere,
    /// The segment needs a new node and the budget is spent.
    NoRoom,
}

/// Decides how `segment` is learned at `node`: as a typed or learned
/// parameter, or a literal (a new one while the position is under its
/// cap, else the position collapses into a parameter). Extends the
/// template. A spent node budget never collapses anything: the path is
/// then not learned.
fn choose(
    node: &mut Node,
    segment: &str,
    cap: usize,
    limits: &Limits,
    walk: &mut Walk,
    retired: &mut Vec<String>,
) -> Descend {
    if let Some(param) = classify(segment) {
        if param == Param::String && !node.has_param(param) && !node.literals.is_empty() {
            // A value too long to be a literal: this position holds values,
            // and its literals collapse as they would at the cap.
            return collapse_position(node, cap, walk, retired);
        }
        if !node.has_param(param) {
            if !limits.can_grow(walk) {
                return Descend::NoRoom;
            }
            walk.created += 1;
        }
        node.hits += 1;
        walk.template.push_str(param.text());
        if param.is_learned() {
            walk.learned = Learned::Learned;
        }
        return Descend::Param(param);
    }
    if node.literals.contains_key(segment) {
        node.hits += 1;
        walk.template.push_str(segment);
        return Descend::KnownLiteral;
    }
    if node.has_param(Param::String) {
        node.hits += 1;
        walk.template.push_str(Param::String.text());
        walk.learned = Learned::Learned;
        return Descend::Param(Param::String);
    }
    if node.literals.len() < cap {
        if !limits.can_grow(walk) {
            return Descend::NoRoom;
        }
        node.hits += 1;
        walk.template.push_str(segment);
        walk.created += 1;
        return Descend::NewLiteral;
    }
    collapse_position(node, cap, walk, retired)
}

/// Makes the position at `node` a parameter: its literals merge into it,
/// but for hot ones (static siblings), and their templates are retired.
fn collapse_position(
    node: &mut Node,
    cap: usize,
    walk: &mut Walk,
    retired: &mut Vec<String>,
) -> Descend {
    node.hits += 1;
    let (became, merged) = collapse(node, cap);
    walk.collapsed = true;
    walk.learned = Learned::Learned;
    // Templates under the merged literals are gone: the template ends with
    // the '/' before this segment.
    let prefix = &walk.template[..walk.template.len() - 1];
    retired.extend(
        merged
            .into_iter()
            .map(|literal| format!("{prefix}/{literal}")),
    );
    if became == Param::Path {
        walk.template.pop();
        return Descend::PathFromHere;
    }
    walk.template.push_str(became.text());
    Descend::Param(became)
}

/// The rest of the path is one `<path>` parameter, with a static last
/// segment kept when it keeps coming back. Last segments are tracked while
/// the budget has room, and only literal-sized ones.
fn learn_path_tail(node: &mut Node, rest: &[&str], limits: &Limits, walk: &mut Walk) {
    if !node.has_param(Param::Path) {
        // Past MAX_DEPTH: one node, always allowed (a deep path must still
        // end somewhere).
        walk.created += 1;
    }
    let path_node = node.param(Param::Path);
    path_node.hits += 1;
    path_node.terminal = true;
    walk.template.push_str(Param::Path.text());
    walk.learned = Learned::Learned;
    let Some(last) = rest.last().filter(|_| rest.len() > 1) else {
        return;
    };
    let tracked = path_node.path_suffixes.len();
    match path_node.path_suffixes.get_mut(*last) {
        Some(hits) => *hits += 1,
        None if last.len() <= MAX_LITERAL_SEGMENT_BYTES
            && tracked < MAX_PATH_SUFFIXES
            && limits.can_grow(walk) =>
        {
            walk.created += 1;
            path_node.path_suffixes.insert((*last).to_owned(), 1);
        }
        None => {}
    }
    if is_path_suffix(path_node, last) {
        walk.template.push('/');
        walk.template.push_str(last);
    }
}

fn is_path_suffix(path_node: &Node, last: &str) -> bool {
    let hits = path_node.path_suffixes.get(last).copied().unwrap_or(0);
    hits >= PATH_SUFFIX_MIN_HITS && hits as f64 >= PATH_SUFFIX_MIN_SHARE * path_node.hits as f64
}

/// Turns a node's literal children into one parameter, keeping hot ones.
/// Returns `<path>` when the merged subtree ends at several depths and
/// itself has too many values: the parameter spans segments. Also returns
/// the literals merged away.
fn collapse(node: &mut Node, segment_cap: usize) -> (Param, Vec<String>) {
    let literals = std::mem::take(&mut node.literals);
    let total: u64 = literals.values().map(|child| child.hits.max(1)).sum();
    let average = total / literals.len().max(1) as u64;
    let mut merged = Node::default();
    let mut merged_names = Vec::new();
    for (segment, child) in literals {
        if child.hits >= HOT_LITERAL_MIN_HITS && child.hits >= HOT_LITERAL_FACTOR * average.max(1) {
            node.literals.insert(segment, child);
        } else {
            merged.merge(child);
            merged_names.push(segment);
        }
    }
    let mut depths = Vec::new();
    merged.terminal_depths(0, &mut depths);
    let spans_segments = depths.len() >= 2 && merged.literals.len() >= segment_cap / 2;
    let param = if spans_segments {
        Param::Path
    } else {
        Param::String
    };
    if param == Param::Path {
        let path = node.param(Param::Path);
        path.terminal = true;
        path.hits += merged.hits;
    } else {
        node.param(Param::String).merge(merged);
    }
    (param, merged_names)
}

fn fit_node(node: &Node, segments: &[&str], template: &mut String) -> Option<Learned> {
    let Some((segment, rest)) = segments.split_first() else {
        return node.terminal.then_some(Learned::Heuristic);
    };
    if let Some(child) = node.literals.get(*segment) {
        let mark = template.len();
        template.push('/');
        template.push_str(segment);
        if let Some(learned) = fit_node(child, rest, template) {
            return Some(learned);
        }
        template.truncate(mark);
    }
    let typed = classify(segment);
    for (param, child) in &node.params {
        let fits = match param {
            Param::String => typed.is_none() || typed == Some(Param::String),
            Param::Path => true,
            typed_param => typed == Some(*typed_param),
        };
        if !fits {
            continue;
        }
        let mark = template.len();
        template.push('/');
        template.push_str(param.text());
        if *param == Param::Path {
            if !rest.is_empty()
                && let Some(last) = rest.last()
                && is_path_suffix(child, last)
            {
                template.push('/');
                template.push_str(last);
            }
            return Some(Learned::Learned);
        }
        if let Some(learned) = fit_node(child, rest, template) {
            return Some(if param.is_learned() {
                Learned::Learned
            } else {
                learned
            });
        }
        template.truncate(mark);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template learned, and how; panics when the budget is spent.
    fn learn(learner: &mut RouteLearner, path: &str) -> (String, Learned) {
        learner.learn(path).expect("room to learn")
    }

    #[test]
    fn typed_segments_are_parameters_at_once() {
        let mut learner = RouteLearner::new(4, 10_000);
        assert_eq!(
            learn(&mut learner, "/users/12345/orders"),
            ("/users/<int>/orders".to_owned(), Learned::Heuristic)
        );
        assert_eq!(
            learn(&mut learner, "/u/3f2504e0-4f89-11d3-9a0c-0305e82c3301").0,
            "/u/<uuid>"
        );
        assert_eq!(
            learn(&mut learner, "/blob/9f86d081884c7d659a2feaa0c55ad015").0,
            "/blob/<hex>"
        );
        assert_eq!(learn(&mut learner, "/day/2026-11-25").0, "/day/<date>");
        assert_eq!(learn(&mut learner, "/price/3.25").0, "/price/<float>");
        assert_eq!(
            learn(&mut learner, "/t/Zm9vYmFyYmF6cXV4MTIzNDU2").0,
            "/t/<token>"
        );
        assert_eq!(learn(&mut learner, "/").0, "/");
        assert_eq!(
            learner.fit("/users/7/orders").map(|f| f.0).as_deref(),
            Some("/users/<int>/orders")
        );
        assert_eq!(learner.fit("/users/7"), None, "no route ends there");
    }

    #[test]
    fn a_busy_position_becomes_a_parameter_keeping_static_siblings() {
        let mut learner = RouteLearner::new(4, 10_000);
        for _ in 0..20 {
            learn(&mut learner, "/tags/featured");
        }
        for tag in ["rust", "go", "zig"] {
            assert_eq!(
                learn(&mut learner, &format!("/tags/{tag}")).0,
                format!("/tags/{tag}")
            );
        }
        // The fifth distinct value passes the cap of 4.
        assert_eq!(
            learn(&mut learner, "/tags/python"),
            ("/tags/<string>".to_owned(), Learned::Learned)
        );
        assert_eq!(learn(&mut learner, "/tags/rust").0, "/tags/<string>");
        assert_eq!(
            learn(&mut learner, "/tags/featured").0,
            "/tags/featured",
            "hot static sibling"
        );
        assert_eq!(
            learn(&mut learner, "/tags/haskell/related").0,
            "/tags/<string>/related"
        );
        assert_eq!(
            learner.fit("/tags/ocaml/related").map(|f| f.0).as_deref(),
            Some("/tags/<string>/related")
        );
    }

    #[test]
    fn deep_varied_tails_become_a_path_with_its_static_suffix() {
        let mut learner = RouteLearner::new(4, 10_000);
        let files = [
            "a.txt",
            "b/c.txt",
            "d/e/f.txt",
            "g.txt",
            "h/i.txt",
            "j/k/l/m.txt",
            "n.txt",
            "o/p.txt",
        ];
        let mut last = String::new();
        for file in files {
            last = learn(&mut learner, &format!("/files/{file}")).0;
        }
        assert_eq!(last, "/files/<path>");
        for n in 0..10 {
            learn(&mut learner, &format!("/files/dir{n}/x{n}.txt/meta"));
        }
        assert_eq!(
            learn(&mut learner, "/files/q/r/s.txt/meta").0,
            "/files/<path>/meta"
        );
        assert_eq!(learn(&mut learner, "/files/q/r/s.txt").0, "/files/<path>");
    }

    #[test]
    fn a_spent_node_budget_learns_nothing_new_and_collapses_nothing() {
        let mut learner = RouteLearner::new(1000, 50);
        assert_eq!(
            learn(&mut learner, "/users/1/orders").0,
            "/users/<int>/orders"
        );
        let refused = (0..5000)
            .filter(|n| learner.learn(&format!("/x{n}/y{n}/z{n}")).is_none())
            .count();
        assert!(learner.nodes() <= 50, "{}", learner.nodes());
        assert!(refused > 4900, "{refused}");
        // What was learned stands: no position collapsed, the root included.
        assert_eq!(
            learn(&mut learner, "/users/2/orders"),
            ("/users/<int>/orders".to_owned(), Learned::Heuristic)
        );
        assert_eq!(
            learner.fit("/x0/y0/z0").map(|f| f.0).as_deref(),
            Some("/x0/y0/z0")
        );
        assert_eq!(learner.fit("/x4999/y4999/z4999"), None);
    }

    #[test]
    fn long_segments_are_values_and_path_suffixes_are_bounded() {
        let mut learner = RouteLearner::new(4, 10_000);
        for _ in 0..20 {
            learn(&mut learner, "/catalog/tags/featured");
        }
        for tag in ["rust", "go", "zig"] {
            learn(&mut learner, &format!("/catalog/tags/{tag}"));
        }
        let slug = "a".repeat(2000);
        assert_eq!(
            learn(&mut learner, &format!("/catalog/tags/{slug}")),
            ("/catalog/tags/<string>".to_owned(), Learned::Learned)
        );
        assert_eq!(
            learner
                .fit(&format!("/catalog/tags/{}", "b".repeat(100)))
                .map(|f| f.0)
                .as_deref(),
            Some("/catalog/tags/<string>")
        );
        // The long value made the position a parameter: its literals were
        // retired, but for the hot static sibling.
        let mut retired = learner.take_retired();
        retired.sort();
        assert_eq!(
            retired,
            [
                "/catalog/tags/go",
                "/catalog/tags/rust",
                "/catalog/tags/zig"
            ]
        );
        assert_eq!(
            learn(&mut learner, "/catalog/tags/featured").0,
            "/catalog/tags/featured"
        );
        // A `<path>` under /files, then many distinct last segments.
        for file in ["a.txt", "b/c.txt", "d/e/f.txt", "g.txt", "h/i.txt"] {
            learn(&mut learner, &format!("/files/{file}"));
        }
        assert_eq!(learn(&mut learner, "/files/j/k.txt").0, "/files/<path>");
        let before = learner.nodes();
        for n in 0..10_000 {
            learn(&mut learner, &format!("/files/dir/{n}.bin"));
        }
        let suffixes = learner.nodes() - before;
        assert!(suffixes <= MAX_PATH_SUFFIXES, "{suffixes}");
    }
}
