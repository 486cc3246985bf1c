//! The house's layout, kept: no module imports a module that imports it back, and the scheduler's
//! library links neither the Pi agent nor the embedded broker (only `kiln up` does). Read from the
//! sources, as a reviewer would; see the README's layout table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 8] =
    ["src", "protocol/src", "common/src", "worker/src", "scheduler/src", "edge-agent/src", "bench/src", "testenv/src"];

/// Each top-level module of the crate whose sources are in `src`, with the top-level modules its
/// code (not its comments, not its `#[cfg(test)]` part) names through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.to_path_buf()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let top = first.trim_end_matches(".rs").to_owned();
        if ["lib", "main"].contains(&top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let named = graph.entry(top.clone()).or_default();
        for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            named.extend(crate_paths(line).filter(|m| !m.is_empty() && *m != top));
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    graph.values_mut().for_each(|named| named.retain(|m| modules.contains(m)));
    graph
}

/// The modules a line names: `crate::a::…`, and each first name in `use crate::{a, b::{c, d}}`.
fn crate_paths(line: &str) -> impl Iterator<Item = String> + '_ {
    line.match_indices("crate::").flat_map(move |(at, _)| {
        let rest = &line[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            return vec![ident(rest)];
        };
        // The names at the group's own depth, each at its start or after a comma.
        let (mut names, mut depth, mut starts) = (Vec::new(), 0, true);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => starts = true,
                c if c.is_whitespace() => {}
                _ if starts => {
                    names.push(ident(&group[i..]));
                    starts = false;
                }
                _ => {}
            }
        }
        names
    })
}

/// The identifier `s` starts with.
fn ident(s: &str) -> String {
    s.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_owned()
}

/// A path from `from` back to itself through `graph`, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        for next in &graph[path.last().unwrap()] {
            if next == from {
                return Some([path.clone(), vec![from.to_owned()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push([path.clone(), vec![next.clone()]].concat());
            }
        }
    }
    None
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    for krate in CRATES {
        let graph = module_graph(&root().join(krate));
        assert!(graph.len() > 1 || krate == "testenv/src", "{krate}: no modules read");
        for module in graph.keys() {
            if let Some(cycle) = cycle_through(&graph, module) {
                panic!("{krate}: the modules cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle_it_is_shown() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
            .into_iter()
            .map(|(m, to)| (m.to_owned(), to.into_iter().map(str::to_owned).collect()))
            .collect();
    assert_eq!(cycle_through(&graph, "a").unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(cycle_through(&graph, "d"), None);
    let named: Vec<String> =
        crate_paths("use crate::{broker::Relay, store::{A, b::C}, self}; crate::fleet::run(x)").collect();
    assert_eq!(named, ["broker", "store", "self", "fleet"]);
}

#[test]
fn the_scheduler_links_neither_the_pi_agent_nor_the_embedded_broker() {
    let manifest = std::fs::read_to_string(root().join("scheduler/Cargo.toml")).unwrap();
    let deps: Vec<&str> = manifest.lines().filter_map(|l| l.split(['.', ' ', '=']).next()).collect();
    for banned in ["kiln-edge", "rumqttd"] {
        assert!(!deps.contains(&banned), "kiln-scheduler depends on {banned}");
    }
    assert!(deps.contains(&"kiln-worker"), "the manifest was read: {deps:?}");
}
