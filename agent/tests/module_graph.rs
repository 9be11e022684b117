//! The agent's top-level modules import each other without a cycle (issue
//! 6, "the structural step"): data flows one way, desired state → store →
//! planner → data plane → kernel, and only `main` wires the tasks together.
//! A cycle is reported with the files that close it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level modules: `src/x.rs` and `src/x/`.
fn modules(src: &Path) -> BTreeSet<String> {
    let mut mods = BTreeSet::new();
    for e in fs::read_dir(src).expect("read src") {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            mods.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "lib"
            && stem != "main"
        {
            mods.insert(stem.to_string());
        }
    }
    mods
}

fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in fs::read_dir(path).expect("read dir") {
            files(&e.expect("dir entry").path(), out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

/// `crate::x` paths in code (comments stripped), x a top-level module.
fn imports(text: &str, mods: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if mods.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

/// module → (imported module → a file that imports it).
fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = src();
    let mods = modules(&src);
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for m in &mods {
        let mut fs_ = Vec::new();
        let dir = src.join(m);
        files(
            &if dir.is_dir() {
                dir
            } else {
                src.join(format!("{m}.rs"))
            },
            &mut fs_,
        );
        let edges = g.entry(m.clone()).or_default();
        for f in fs_ {
            let text = fs::read_to_string(&f).expect("read source");
            for t in imports(&text, &mods) {
                if &t != m {
                    edges.entry(t).or_insert_with(|| f.clone());
                }
            }
        }
    }
    g
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(g: &BTreeMap<String, BTreeMap<String, PathBuf>>, start: &str) -> Option<Vec<String>> {
    fn dfs(
        g: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(node).into_iter().flat_map(|e| e.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    dfs(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let g = graph();
    assert!(
        g.len() > 10,
        "found only {} modules: {:?}",
        g.len(),
        g.keys()
    );
    assert!(
        g["core"].contains_key("store"),
        "the scan misses imports (core must import store)"
    );
    let mut cycles = Vec::new();
    for m in g.keys() {
        if let Some(c) = cycle_from(&g, m) {
            let hops: Vec<String> = c
                .iter()
                .zip(c.iter().cycle().skip(1))
                .map(|(a, b)| format!("{a} -> {b} ({})", g[a][b].display()))
                .collect();
            cycles.push(hops.join("; "));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_scan_finds_a_cycle_when_there_is_one() {
    let mods: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        imports("use crate::b::X; // crate::a", &mods),
        BTreeSet::from(["b".to_string()])
    );
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    g.entry("a".into())
        .or_default()
        .insert("b".into(), "a.rs".into());
    g.entry("b".into()).or_default();
    assert_eq!(cycle_from(&g, "a"), None);
    g.entry("b".into())
        .or_default()
        .insert("a".into(), "b.rs".into());
    assert_eq!(cycle_from(&g, "a"), Some(vec!["a".into(), "b".into()]));
}
