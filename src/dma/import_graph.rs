//! The import graph of `src/dma` has no circles, and the pure `plan/` folder imports
//! nothing outside itself (test only).
//!
//! The graph is read from the sources: one node per file, one edge per `use` path that
//! names another file's module (`super::…`, `self::…` or `crate::dma::…`, brace groups
//! expanded). `mod` declarations are not edges; a `use` inside an inline module (`mod
//! tests { … }`, `pub mod planning { … }`) is resolved from that module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (segments below `dma`) → the file that defines it.
type Files = BTreeMap<Vec<String>, PathBuf>;

fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).expect("under src/dma");
    let mut segs: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/dma") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let path = path.trim();
    let Some(open) = path.find('{') else {
        return vec![path.to_string()];
    };
    let prefix = &path[..open];
    let close = path.rfind('}').expect("balanced braces");
    let inner = &path[open + 1..close];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand(&format!("{prefix}{}", p.trim())))
        .collect()
}

/// The `use` statements of a file, each with the module it is written in.
fn uses(src: &str, file_module: &[String]) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut inline: Option<String> = None;
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if inline.is_none() && !line.starts_with(' ') {
            let head = t
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            if let Some(name) = head.strip_prefix("mod ").and_then(|r| r.strip_suffix(" {")) {
                inline = Some(name.trim().to_string());
                continue;
            }
        }
        if inline.is_some() && line.starts_with('}') {
            inline = None;
            continue;
        }
        let body = t
            .strip_prefix("pub(crate) use ")
            .or_else(|| t.strip_prefix("pub use "))
            .or_else(|| t.strip_prefix("use "));
        let Some(body) = body else { continue };
        let mut stmt = body.to_string();
        while !stmt.trim_end().ends_with(';') {
            stmt.push(' ');
            stmt.push_str(lines.next().expect("use statement ends").trim());
        }
        let mut module = file_module.to_vec();
        if let Some(m) = &inline {
            module.push(m.clone());
        }
        out.push((module, stmt.trim_end().trim_end_matches(';').to_string()));
    }
    out
}

/// The file a `use` path lands in, if it is a `dma` file other than `from_file`.
fn target(files: &Files, module: &[String], path: &str) -> Option<PathBuf> {
    let path = path.split(" as ").next().unwrap_or(path).trim();
    let mut segs: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut base: Vec<String> = match segs.first().copied() {
        Some("crate") if segs.get(1) == Some(&"dma") => {
            segs.drain(..2);
            Vec::new()
        }
        Some("self") => {
            segs.remove(0);
            module.to_vec()
        }
        Some("super") => {
            let mut b = module.to_vec();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop()?;
            }
            b
        }
        // A bare path names a child module (edition 2018), or another crate.
        Some(first) => {
            let mut b = module.to_vec();
            b.push(first.to_string());
            if !files.contains_key(&b) {
                return None;
            }
            module.to_vec()
        }
        None => return None,
    };
    // The deepest module named by the path that is a file of its own.
    let mut best = files.get(&base).cloned();
    for s in segs {
        base.push(s.to_string());
        match files.get(&base) {
            Some(f) => best = Some(f.clone()),
            None => break,
        }
    }
    best
}

/// `tests`: count the `use`s of inline `mod tests` too.
fn graph(root: &Path, tests: bool) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut paths = Vec::new();
    walk(root, &mut paths);
    let files: Files = paths
        .iter()
        .map(|p| (module_of(root, p), p.clone()))
        .collect();
    let mut g = BTreeMap::new();
    for p in &paths {
        let src = std::fs::read_to_string(p).expect("read source");
        let edges: BTreeSet<PathBuf> = uses(&src, &module_of(root, p))
            .into_iter()
            .filter(|(m, _)| tests || m.last().is_none_or(|l| l != "tests"))
            .flat_map(|(m, stmt)| expand(&stmt).into_iter().map(move |u| (m.clone(), u)))
            .filter_map(|(m, u)| target(&files, &m, &u))
            .filter(|t| t != p)
            .collect();
        g.insert(p.clone(), edges);
    }
    g
}

/// A circle in `g`, as the files on it, if there is one.
fn find_cycle(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        n: &PathBuf,
        g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).expect("on the stack");
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dma")
}

#[test]
fn dma_has_no_import_circles() {
    let g = graph(&root(), true);
    assert!(g.len() > 10, "read too few files: {:?}", g.keys());
    if let Some(c) = find_cycle(&g) {
        let names: Vec<String> = c
            .iter()
            .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
            .collect();
        panic!("import circle in src/dma: {}", names.join(" -> "));
    }
}

#[test]
fn plan_is_pure() {
    let root = root();
    let plan = root.join("plan");
    for (file, edges) in graph(&root, false) {
        if !file.starts_with(&plan) {
            continue;
        }
        let src = std::fs::read_to_string(&file).unwrap();
        for out in edges {
            assert!(
                out.starts_with(&plan),
                "{} imports {} (outside plan/)",
                file.display(),
                out.display()
            );
        }
        // No path out of the crate's pure half either: no object layer, no syscalls.
        for bad in [
            "crate::gmem",
            "crate::iommufd",
            "crate::vfio",
            "crate::sys",
            "unsafe",
            "std::fs",
            "std::os",
        ] {
            let hits = src
                .lines()
                .take_while(|l| !l.starts_with("#[cfg(test)]"))
                .filter(|l| l.contains(bad) && !l.trim_start().starts_with("//"))
                .count();
            assert_eq!(hits, 0, "{} uses {bad}", file.display());
        }
    }
}

#[test]
fn the_checker_sees_circles() {
    // Synthetic graphs: a → b → c → a is found, a → b, a → c, b → c is not.
    let p = |s: &str| PathBuf::from(s);
    let mut g = BTreeMap::new();
    g.insert(p("a"), BTreeSet::from([p("b")]));
    g.insert(p("b"), BTreeSet::from([p("c")]));
    g.insert(p("c"), BTreeSet::from([p("a")]));
    assert_eq!(find_cycle(&g).map(|c| c.len()), Some(4));
    g.insert(p("c"), BTreeSet::new());
    g.insert(p("a"), BTreeSet::from([p("b"), p("c")]));
    assert_eq!(find_cycle(&g), None);
    // Path resolution: groups, `super` from an inline module, the crate path.
    assert_eq!(
        expand("super::{a::X, b::{Y, Z as W}}"),
        ["super::a::X", "super::b::Y", "super::b::Z as W"]
    );
    let files: Files = [
        (vec![], p("mod.rs")),
        (vec!["plan".into()], p("plan/mod.rs")),
        (vec!["plan".into(), "ops".into()], p("plan/ops.rs")),
    ]
    .into_iter()
    .collect();
    let m = vec!["plan".to_string(), "tracker".to_string()];
    assert_eq!(target(&files, &m, "super::ops::Op"), Some(p("plan/ops.rs")));
    assert_eq!(target(&files, &m, "crate::dma::Stats"), Some(p("mod.rs")));
    assert_eq!(target(&files, &m, "std::fmt"), None);
    assert_eq!(
        target(&files, &["plan".into()], "ops::Op"),
        Some(p("plan/ops.rs"))
    );
}
