//! The house's layout, read from its own source: no two files of the library import
//! each other, directly or around a loop. A module and its own submodules are one room
//! and may use each other (a parent declares its children; children use the parent's
//! shared types), so only edges between files that are not each other's ancestors
//! count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` and `src/a/b/mod.rs` -> `["a", "b"]`; `src/lib.rs` -> `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    match last.as_str() {
        "mod.rs" | "lib.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_string()),
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and string literals, which may mention paths
/// that are not imports.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

/// Every path a file names from `crate::` or `super::`, with use-groups expanded:
/// `use super::{a::B, c}` gives `super::a::B` and `super::c`.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        if at_word && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let (tree, end) = read_tree(&bytes, i);
            expand(&tree, &mut Vec::new(), &mut found);
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

#[derive(Debug)]
enum Tree {
    Path(Vec<String>, Option<Vec<Tree>>),
}

/// Reads `a::b::{c, d::e}` starting at `i`; returns the tree and where it ends.
fn read_tree(s: &[char], mut i: usize) -> (Tree, usize) {
    let mut segs = Vec::new();
    loop {
        let start = i;
        while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
            i += 1;
        }
        if i > start {
            segs.push(s[start..i].iter().collect::<String>());
        }
        if i + 1 < s.len() && s[i] == ':' && s[i + 1] == ':' {
            i += 2;
            if i < s.len() && s[i] == '{' {
                i += 1;
                let mut children = Vec::new();
                loop {
                    while i < s.len() && (s[i].is_whitespace() || s[i] == ',') {
                        i += 1;
                    }
                    if i >= s.len() || s[i] == '}' {
                        return (Tree::Path(segs, Some(children)), i + 1);
                    }
                    let (t, end) = read_tree(s, i);
                    children.push(t);
                    i = end;
                    // `x as y`
                    while i < s.len() && s[i] != ',' && s[i] != '}' {
                        i += 1;
                    }
                }
            }
            continue;
        }
        return (Tree::Path(segs, None), i);
    }
}

fn expand(t: &Tree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Tree::Path(segs, children) = t;
    let n = prefix.len();
    prefix.extend(segs.iter().cloned());
    match children {
        Some(cs) if !cs.is_empty() => {
            for c in cs {
                expand(c, prefix, out);
            }
        }
        _ => out.push(prefix.clone()),
    }
    prefix.truncate(n);
}

/// The module a path lands in: the longest prefix that is a module file.
fn resolve(
    from: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut abs: Vec<String> = from.to_vec();
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            abs.clear();
            segs.next();
        }
        Some("super") => {
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                segs.next();
                abs.pop()?;
            }
        }
        _ => return None,
    }
    let rest: Vec<String> = segs.filter(|s| s.as_str() != "self").cloned().collect();
    (0..=rest.len()).rev().find_map(|k| {
        let mut m = abs.clone();
        m.extend(rest[..k].iter().cloned());
        modules.contains(&m).then_some(m)
    })
}

/// Strongly connected components of more than one file (Tarjan).
fn circles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct State<'g> {
        graph: &'g BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        on: BTreeSet<Vec<String>>,
        next: usize,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit(s: &mut State<'_>, v: &Vec<String>) {
        s.index.insert(v.clone(), s.next);
        s.low.insert(v.clone(), s.next);
        s.next += 1;
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        let edges: Vec<Vec<String>> = s.graph.get(v).into_iter().flatten().cloned().collect();
        for w in edges {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let l = s.low[&w].min(s.low[v]);
                s.low.insert(v.clone(), l);
            } else if s.on.contains(&w) {
                let l = s.index[&w].min(s.low[v]);
                s.low.insert(v.clone(), l);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn is_ancestor(a: &[String], b: &[String]) -> bool {
    a.len() < b.len() && b.starts_with(a)
}

#[test]
fn no_two_files_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // The binary's own files (main.rs, cli.rs) use the library by its name.
    files.retain(|f| {
        let name = f.file_name().unwrap();
        name != "main.rs" && name != "cli.rs"
    });
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        let edges = graph.entry(from.clone()).or_default();
        for p in paths(&code) {
            if let Some(to) = resolve(&from, &p, &modules) {
                if to != from && !is_ancestor(&to, &from) && !is_ancestor(&from, &to) {
                    edges.insert(to);
                }
            }
        }
    }
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 100,
        "the reader found too few imports to be trusted"
    );
    let found = circles(&graph);
    let names: Vec<String> = found
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(" <-> ")
        })
        .collect();
    assert!(names.is_empty(), "import circles: {names:#?}");
}

#[test]
fn the_reader_sees_a_circle_when_there_is_one() {
    let modules: BTreeSet<Vec<String>> = [vec!["a".to_string()], vec!["b".to_string()]]
        .into_iter()
        .collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, code) in [
        ("a", "use crate::b::{X, y::Z}; // crate::a in a comment"),
        ("b", "fn f() { crate::a::g(\"crate::c\") }"),
    ] {
        let from = vec![from.to_string()];
        for p in paths(&code_only(code)) {
            if let Some(to) = resolve(&from, &p, &modules) {
                if to != from {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    assert_eq!(circles(&graph).len(), 1, "{graph:?}");
}

/// Metric names are spelled once, in `src/telemetry.rs`: call sites use its constants
/// (so each emitted metric is in the table `describe()` reads), every constant is used,
/// and no name is there twice.
#[test]
fn metric_names_come_from_the_one_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = std::fs::read_to_string(src.join("telemetry.rs")).unwrap();
    let mut consts = Vec::new();
    for line in table.lines() {
        let line = line.trim();
        if let Some((id, rest)) = line.split_once(':') {
            if let Some(name) = rest.split('"').nth(1) {
                if id
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                    && name.starts_with("smartrelay_")
                {
                    consts.push((id.to_string(), name.to_string()));
                }
            }
        }
    }
    assert!(
        consts.len() > 50,
        "read {} metrics from the table",
        consts.len()
    );
    let names: BTreeSet<&str> = consts.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names.len(),
        consts.len(),
        "a metric name is in the table twice"
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut used = BTreeSet::new();
    for f in &files {
        if f.ends_with("telemetry.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for name in &names {
            assert!(
                !text.contains(&format!("\"{name}\"")),
                "{} spells {name} instead of using its constant",
                f.display()
            );
        }
        for (id, _) in &consts {
            if text.contains(&format!("telemetry::{id}")) || text.contains(&format!("T::{id}")) {
                used.insert(id.clone());
            }
        }
    }
    let unused: Vec<&String> = consts
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !used.contains(*id))
        .collect();
    assert!(
        unused.is_empty(),
        "metrics in the table nobody emits: {unused:?}"
    );
}
