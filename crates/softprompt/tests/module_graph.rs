//! The module graph stays acyclic: in the library and in the CLI, no top-level module reaches
//! back to one that reaches it (`config` never imports `train`, `adapter` never imports `config`,
//! no command imports another). Read from the sources: every `crate::NAME` outside comments and
//! outside a file's `#[cfg(test)] mod tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it names, with one place for each.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The `.rs` files under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifiers after each `crate::` in `line`.
fn crate_paths(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .filter(|(i, _)| !line[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, m)| {
            line[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .collect()
}

/// The graph of the crate whose sources are in `src` (its root file `lib.rs`/`main.rs` left out).
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let top = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let edges = graph.entry(top.clone()).or_default();
        for (n, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for name in crate_paths(line) {
                if name != top {
                    edges
                        .entry(name)
                        .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
                }
            }
        }
    }
    graph
}

/// A cycle of `graph`, as the modules along it with the place of each step, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(graph: &Graph, node: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|p| p == node) {
            let mut cycle: Vec<String> = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node.to_string()) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(graph, start, &mut Vec::new(), &mut done))
        .map(|cycle| {
            cycle
                .windows(2)
                .map(|w| format!("{} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect()
        })
}

fn crate_src(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_library_modules_form_no_cycle() {
    let graph = module_graph(&crate_src("softprompt"));
    assert!(graph.len() > 10, "{graph:?}");
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn the_cli_modules_form_no_cycle() {
    let graph = module_graph(&crate_src("softprompt-cli"));
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut graph = Graph::new();
    graph
        .entry("config".into())
        .or_default()
        .insert("train".into(), "config/mod.rs:3".into());
    graph
        .entry("train".into())
        .or_default()
        .insert("config".into(), "train/mod.rs:9".into());
    let cycle = find_cycle(&graph).unwrap();
    assert_eq!(
        cycle,
        ["config -> train (config/mod.rs:3)", "train -> config (train/mod.rs:9)"]
    );
    assert_eq!(crate_paths("use crate::a::b; x(crate::c); my_crate::d"), ["a", "c"]);
}
