//! The module graphs of the reference crate and of the simulator: which
//! module imports which, read from their `use` lines and paths
//! (`crate::...`, `super::...`). Neither graph has a cycle, and the
//! reference crate's imports point one way down its layers (ARCHITECTURE.md,
//! "Layers"). Run alone: `cargo test --release --test cli modules`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The reference crate's top-level modules, lowest layer first. A module
/// may import its own submodules and anything in a lower layer, never a
/// module of its own layer or above.
const REFERENCE_LAYERS: &[&[&str]] = &[
    &["codes"],
    &["money", "ids"],
    &["sharding"],
    &["ledger"],
    &["events", "peers"],
    &["auth"],
    &["fraud", "notification", "analytics"],
    &["manager", "pipeline"],
    &["audit"],
    &["http"],
    &[ROUTES],
    &["api"],
    &["app"],
];

/// The layer of every service's routes (`auth::routes`,
/// `manager::routes::legacy`, ...): above the HTTP core they stand on,
/// below the route table that puts them together. A service's folder
/// holds both its logic (low) and its routes (high).
const ROUTES: &str = "<service>::routes";

/// Module path (`ledger::mysql`) -> file, for every `.rs` under `src`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            found.insert(parts.join("::"), path);
        }
    }
    found
}

/// The code of a file without comments and without its unit tests.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that follows `prefix` in `code`: `prefix::a::b`, and each
/// name of a `prefix::{a, b::c}` group.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            out.extend(
                group[..end]
                    .split(',')
                    .map(|name| name.trim().trim_start_matches("self").to_string())
                    .filter(|name| !name.is_empty()),
            );
        } else {
            let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            out.push(rest[..end].trim_end_matches(':').to_string());
        }
    }
    out
}

/// The longest known module that `path` names, if any.
fn resolve(known: &BTreeMap<String, PathBuf>, path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

/// Module -> the modules it imports (its own descendants and ancestors
/// left out: a parent declares its children, a child reaches its parent).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut edges = BTreeMap::new();
    for (module, file) in &known {
        let code = code(file);
        let parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
        let parent = parent[..parent.len().saturating_sub(1)].join("::");
        let mut targets: Vec<String> = paths_after(&code, "crate::");
        targets.extend(
            paths_after(&code, "super::")
                .into_iter()
                .map(|p| format!("{parent}::{p}")),
        );
        let imports: BTreeSet<String> = targets
            .iter()
            .filter_map(|p| resolve(&known, p))
            .filter(|t| {
                !t.is_empty()
                    && t != module
                    && !t.starts_with(&format!("{module}::"))
                    && !module.starts_with(&format!("{t}::"))
            })
            .collect();
        edges.insert(module.clone(), imports);
    }
    edges
}

/// A cycle of the graph, if it has one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search; 0 = unvisited, 1 = on the stack, 2 = done.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut found = stack[from..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                0 => {
                    if let Some(found) = visit(next, edges, state, stack) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(found) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(found);
            }
        }
    }
    None
}

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(krate)
        .join("src")
}

#[test]
fn the_reference_crate_has_no_module_cycle() {
    let edges = graph(&src("reference"));
    assert!(edges.len() > 20, "read too few modules: {edges:?}");
    assert_eq!(cycle(&edges), None, "{edges:#?}");
}

#[test]
fn the_simulator_has_no_module_cycle() {
    let edges = graph(&src("simulator"));
    assert!(edges.len() > 10, "read too few modules: {edges:?}");
    assert_eq!(cycle(&edges), None, "{edges:#?}");
}

#[test]
fn the_reference_crate_imports_point_down_its_layers() {
    let layer_of = |module: &str| -> Option<usize> {
        let key = if module.split("::").any(|s| s == "routes") {
            ROUTES
        } else {
            module.split("::").next().unwrap_or("")
        };
        REFERENCE_LAYERS.iter().position(|l| l.contains(&key))
    };
    let edges = graph(&src("reference"));
    let mut wrong = Vec::new();
    for (module, imports) in &edges {
        if module.is_empty() {
            continue;
        }
        let Some(from) = layer_of(module) else {
            wrong.push(format!(
                "{module} is in no layer: add it to REFERENCE_LAYERS"
            ));
            continue;
        };
        for import in imports {
            let same_top = import.split("::").next() == module.split("::").next();
            match layer_of(import) {
                Some(to) if to < from || (to == from && same_top) => {}
                _ => wrong.push(format!("{module} imports {import}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_cycle_is_found() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.insert("a".into(), ["b".to_string()].into());
    edges.insert("b".into(), ["c".to_string()].into());
    edges.insert("c".into(), BTreeSet::new());
    assert_eq!(cycle(&edges), None);
    edges.get_mut("c").unwrap().insert("a".into());
    assert_eq!(
        cycle(&edges),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let code = "use crate::ledger::book;\nuse super::{x, y::z};\nlet v = crate::events::Event;";
    assert_eq!(
        paths_after(code, "crate::"),
        ["ledger::book", "events::Event"]
    );
    assert_eq!(paths_after(code, "super::"), ["x", "y::z"]);
}
