//! The manual's links resolve: every relative link in README.md,
//! CONTRIBUTING.md, docs/ and the other READMEs names a file of the
//! repository, and every `#anchor` a heading of its page (as GitHub makes
//! anchors). Links out of the repository are not followed (no network
//! here). README.md stays a front page.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use pulldown_cmark::{Event, Parser, Tag, TagEnd};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Markdown pages people read.
fn pages() -> Vec<PathBuf> {
    let root = workspace();
    let mut pages: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "e2e/README.md",
        "manifests/README.md",
    ]
    .iter()
    .map(|page| root.join(page))
    .collect();
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// Each link's destination in `text`.
fn links(text: &str) -> Vec<String> {
    Parser::new(text)
        .filter_map(|event| match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                Some(dest_url.into_string())
            }
            _ => None,
        })
        .collect()
}

/// The anchors GitHub gives a page's headings: lower case, punctuation
/// but `-` and `_` dropped, spaces as `-`, repeats numbered.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut heading: Option<String> = None;
    for event in Parser::new(text) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(part) | Event::Code(part) => {
                if let Some(heading) = heading.as_mut() {
                    heading.push_str(&part);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let Some(text) = heading.take() else { continue };
                let slug: String = text
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect();
                let mut anchor = slug.clone();
                let mut repeat = 0;
                while anchors.contains(&anchor) {
                    repeat += 1;
                    anchor = format!("{slug}-{repeat}");
                }
                anchors.insert(anchor);
            }
            _ => {}
        }
    }
    anchors
}

fn broken_link(page: &Path, link: &str) -> Option<String> {
    if link.contains("://") || link.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match link.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (link, None),
    };
    let target = if path.is_empty() {
        page.to_path_buf()
    } else {
        page.parent().expect("a page's folder").join(path)
    };
    if !target.exists() {
        return Some(format!("{link}: no {}", target.display()));
    }
    let anchor = anchor?;
    let text = fs::read_to_string(&target).ok()?;
    (!anchors(&text).contains(anchor)).then(|| format!("{link}: no heading #{anchor}"))
}

#[test]
fn every_link_in_the_manual_resolves() {
    let mut checked = 0;
    let mut broken = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        for link in links(&text) {
            checked += 1;
            if let Some(why) = broken_link(&page, &link) {
                broken.push(format!("{}: {why}", page.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: the pages were not read"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn a_broken_link_and_a_missing_anchor_are_found() {
    let page = workspace().join("README.md");
    assert!(broken_link(&page, "docs/no-such-page.md").is_some());
    assert!(broken_link(&page, "docs/limits.md#no-such-heading").is_some());
    assert!(broken_link(&page, "docs/limits.md#limits-and-budgets").is_none());
    assert!(broken_link(&page, "https://example.com/anything").is_none());
}

#[test]
fn readme_is_a_front_page() {
    let text = fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines; the depth belongs in docs/"
    );
}
