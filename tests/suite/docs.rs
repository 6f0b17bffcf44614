//! The documentation resolves in a clone: every relative link in `README.md`,
//! `CHANGELOG.md` and `docs/*.md` names a file inside the repository (and, for a
//! `#fragment` into a Markdown file, a heading that exists), nothing points outside the
//! repository (such as `../shared/...`), and the module docs cite the contract where it
//! lives, `docs/design.md`.
//!
//! Plain file reading: no network, no loopback block.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents a reader of a clone meets: the README, the changelog, and `docs/`.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md"), root().join("CHANGELOG.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    docs.extend(pages);
    docs
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Markdown text with fenced code blocks and inline code spans blanked out, so that
/// `[a](b)` inside code is not taken for a link. Lines are kept, for messages.
fn without_code(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(marker) = &fence {
            if trimmed.starts_with(marker.as_str()) {
                fence = None;
            }
            out.push(String::new());
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(trimmed[..3].to_string());
            out.push(String::new());
            continue;
        }
        out.push(strip_code_spans(line));
    }
    out
}

fn strip_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '`' {
            let run = chars[i..].iter().take_while(|&&c| c == '`').count();
            // Find the closing run of the same length; unmatched backticks are literal.
            let mut j = i + run;
            let mut closed = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                    if r == run {
                        closed = Some(j + r);
                        break;
                    }
                    j += r;
                } else {
                    j += 1;
                }
            }
            match closed {
                Some(end) => {
                    out.push(' ');
                    i = end;
                }
                None => {
                    out.extend(&chars[i..i + run]);
                    i += run;
                }
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Link targets with their 1-based line: inline links and images `[text](target "title")`,
/// and reference definitions `[label]: target`.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in without_code(text).iter().enumerate() {
        let line_no = n + 1;
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            if let Some(close) = trimmed.find("]:") {
                let target = trimmed[close + 2..].split_whitespace().next();
                if let Some(target) = target {
                    found.push((
                        line_no,
                        target.trim_matches(|c| c == '<' || c == '>').to_string(),
                    ));
                }
                continue;
            }
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            // The target ends at the `)` that balances the opening one.
            let mut depth = 0usize;
            let mut end = None;
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            let inside = after[..end].trim();
            let target = if let Some(stripped) = inside.strip_prefix('<') {
                stripped.split('>').next().unwrap_or("")
            } else {
                inside.split_whitespace().next().unwrap_or("")
            };
            found.push((line_no, target.to_string()));
            rest = &after[end..];
        }
    }
    found
}

fn is_external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

/// The anchors GitHub gives a Markdown file's headings: the heading text without
/// formatting, lower-cased, punctuation dropped, spaces as hyphens, repeats numbered.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = !fence;
            continue;
        }
        if fence || !trimmed.starts_with('#') {
            continue;
        }
        let heading = trimmed.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(&link_text_only(heading.trim()));
        let mut anchor = base.clone();
        let mut n = 1;
        while seen.contains(&anchor) {
            anchor = format!("{base}-{n}");
            n += 1;
        }
        seen.insert(anchor);
    }
    seen
}

/// `[text](target)` becomes `text`.
fn link_text_only(heading: &str) -> String {
    let mut out = String::new();
    let mut rest = heading;
    while let Some(at) = rest.find("](") {
        out.push_str(&rest[..at]);
        match rest[at..].find(')') {
            Some(close) => rest = &rest[at + close + 1..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `base/relative` without `.` and `..`, lexically; `None` when `..` climbs above `/`.
fn normalize(base: &Path, relative: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in base.join(relative).components() {
        match component {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// Every problem with one document's links, as "file:line: message" lines.
fn link_problems(doc: &Path) -> Vec<String> {
    let root = root();
    let root_real = root.canonicalize().expect("repository root");
    let text = read(doc);
    let shown = doc.strip_prefix(&root).unwrap_or(doc).display().to_string();
    let mut problems = Vec::new();
    for (line, target) in links(&text) {
        let at = format!("{shown}:{line}: `{target}`");
        if target.is_empty() {
            problems.push(format!("{at}: empty link"));
            continue;
        }
        if is_external(&target) {
            continue;
        }
        let (path, fragment) = match target.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (target.as_str(), None),
        };
        if path.starts_with('/') {
            problems.push(format!(
                "{at}: absolute path; link relative to the document so it resolves in a clone"
            ));
            continue;
        }
        let file = if path.is_empty() {
            doc.to_path_buf()
        } else {
            let dir = doc.parent().expect("a document has a directory");
            let Some(resolved) = normalize(dir, path) else {
                problems.push(format!("{at}: climbs above the file system root"));
                continue;
            };
            if !resolved.starts_with(&root) {
                problems.push(format!(
                    "{at}: points outside the repository, which a clone does not have"
                ));
                continue;
            }
            if !resolved.exists() {
                problems.push(format!("{at}: no such file in the repository"));
                continue;
            }
            // A symlink out of the repository would resolve here and not in a clone.
            match resolved.canonicalize() {
                Ok(real) if real.starts_with(&root_real) => {}
                _ => {
                    problems.push(format!("{at}: resolves outside the repository"));
                    continue;
                }
            }
            resolved
        };
        if let Some(fragment) = fragment {
            if file.extension().is_some_and(|e| e == "md") {
                let known = anchors(&read(&file));
                if !known.contains(fragment) {
                    problems.push(format!(
                        "{at}: no heading with anchor `#{fragment}` in {}",
                        file.strip_prefix(&root).unwrap_or(&file).display()
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn the_contract_the_guide_and_the_module_map_are_in_the_repository() {
    for page in [
        "docs/design.md",
        "docs/privatelink-guide.md",
        "docs/architecture.md",
        "CHANGELOG.md",
    ] {
        let text = read(&root().join(page));
        assert!(text.len() > 1000, "{page} is nearly empty");
    }
    let changelog = read(&root().join("CHANGELOG.md"));
    assert!(
        changelog.contains("## Unreleased"),
        "CHANGELOG.md has an Unreleased section"
    );
}

#[test]
fn every_relative_link_in_the_docs_resolves_inside_the_repository() {
    let docs = documents();
    assert!(docs.len() >= 5, "README, CHANGELOG and the docs/ pages");
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        checked += links(&read(doc))
            .iter()
            .filter(|(_, t)| !is_external(t))
            .count();
        problems.extend(link_problems(doc));
    }
    assert!(
        problems.is_empty(),
        "broken documentation links:\n{}",
        problems.join("\n")
    );
    // The README and the docs link to each other; zero links means the scan is broken.
    assert!(checked >= 10, "only {checked} relative links found");
}

#[test]
fn the_readme_links_the_docs() {
    let readme: BTreeSet<String> = links(&read(&root().join("README.md")))
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    for page in [
        "docs/design.md",
        "docs/privatelink-guide.md",
        "docs/architecture.md",
        "CHANGELOG.md",
    ] {
        assert!(readme.contains(page), "README.md does not link {page}");
    }
}

#[test]
fn nothing_cites_files_outside_the_repository() {
    // The contract and the guide used to live beside the repository, as DESIGN.md and
    // seed/privatelink-setup-guide.md; a clone has neither.
    let mut files = documents();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("src/ entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.push(root().join("config/gpulink.example.toml"));
    let mut problems = Vec::new();
    for file in &files {
        let text = read(file);
        let shown = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            for stale in ["DESIGN.md", "../shared", "seed/privatelink-setup-guide"] {
                if line.contains(stale) {
                    problems.push(format!("{shown}:{}: cites `{stale}`", n + 1));
                }
            }
            // A path such as `docs/design.md` named in a comment must exist too.
            let mut rest = line;
            while let Some(at) = rest.find("docs/") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || "/._-".contains(*c))
                    .collect();
                let name = name.trim_end_matches('.');
                if name.ends_with(".md") && !root().join(name).exists() {
                    problems.push(format!("{shown}:{}: `{name}` does not exist", n + 1));
                }
                rest = &rest[at + 5..];
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// The scanner itself: a check that finds nothing proves nothing.

#[test]
fn the_scanner_finds_links_and_skips_code() {
    let text = "see [the guide](docs/guide.md#step-2) and ![pic](img/a.png \"title\")\n\
                `[not](a-link.md)` and [web](https://example.com)\n\
                ```\n[also not](code.md)\n```\n\
                [ref]: ../outside.md\n\
                [nested](a_(b).md) [angle](<docs/with space.md>)\n";
    let targets: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        targets,
        [
            "docs/guide.md#step-2",
            "img/a.png",
            "https://example.com",
            "../outside.md",
            "a_(b).md",
            "docs/with space.md"
        ]
    );
}

#[test]
fn the_scanner_reports_missing_outside_and_bad_anchors() {
    // Inside the repository's tree (under target/, which git ignores), so that "inside"
    // and "outside" mean what they mean for the real documents.
    let inside = root()
        .join("target")
        .join(format!("docs-scanner-{}", std::process::id()));
    std::fs::create_dir_all(&inside).expect("scratch directory under target/");
    let page = inside.join("page.md");
    std::fs::write(
        &page,
        "# A page\n\n## Error codes\n\n[ok](#error-codes) [self](page.md#a-page)\n\
         [missing](nope.md) [out](../../../outside.md) [anchor](#no-such-heading)\n\
         [abs](/etc/passwd)\n",
    )
    .expect("write page");
    let problems = link_problems(&page);
    std::fs::remove_dir_all(&inside).ok();
    let joined = problems.join("\n");
    assert_eq!(problems.len(), 4, "{joined}");
    assert!(joined.contains("`nope.md`: no such file"), "{joined}");
    assert!(
        joined.contains("`../../../outside.md`: points outside"),
        "{joined}"
    );
    assert!(joined.contains("`#no-such-heading`"), "{joined}");
    assert!(joined.contains("`/etc/passwd`: absolute path"), "{joined}");
}

#[test]
fn anchors_follow_github() {
    let text = "# gpulink: the product contract\n### `[listen]`: the app-facing listener\n\
                ## Error codes\n## Error codes\n## Data-path health (planned, issue #8)\n";
    let found = anchors(text);
    for expected in [
        "gpulink-the-product-contract",
        "listen-the-app-facing-listener",
        "error-codes",
        "error-codes-1",
        "data-path-health-planned-issue-8",
    ] {
        assert!(found.contains(expected), "{expected} not in {found:?}");
    }
}
