//! The library's modules form layers: no module may depend (through `crate::` paths) on a
//! module that depends back on it. This test reads `src/lib.rs` and every library module's
//! source, builds the graph of `crate::MODULE` references (code only: comments and string
//! literals are skipped, `use crate::{a, b}` groups count) and fails with the cycle if there
//! is one. The binary's modules (`src/main.rs`, `src/cli/`) are not part of the library and
//! are not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The source with comments, string and char literals blanked out (replaced by spaces).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(b' ');
        } else if b[i] == b'r' && (rest.starts_with(b"r\"") || rest.starts_with(b"r#")) {
            // Raw string: r"..." or r#"..."# (any number of #).
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push(b' ');
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(b' ');
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former ends
            // with a quote within a few bytes.
            let end = if rest.get(1) == Some(&b'\\') {
                rest.iter().skip(2).position(|&c| c == b'\'').map(|p| p + 2)
            } else if rest.get(2) == Some(&b'\'') {
                Some(2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    i += e + 1;
                    out.push(b' ');
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The modules `code` names through `crate::NAME` or `crate::{NAME, ...}`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == ':' || c == '$') {
            continue; // `$crate::`, `other_crate::`, `::crate`
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // Top-level names of the group: `crate::{a::X, b, c::{D, E}}`.
            let mut depth = 0;
            let mut item = String::new();
            let mut first = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if first && !item.is_empty() {
                            refs.insert(std::mem::take(&mut item));
                        }
                        first = true;
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && first {
                    if is_ident(c) {
                        item.push(c);
                    } else if !item.is_empty() {
                        refs.insert(std::mem::take(&mut item));
                        first = false;
                    }
                }
            }
            if first && !item.is_empty() {
                refs.insert(item);
            }
        } else {
            let name: String = rest_trim.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// The modules `lib.rs` declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_modules(lib: &str) -> Vec<String> {
    code_only(lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?.trim();
            name.chars().all(is_ident).then(|| name.to_string())
        })
        .collect()
}

/// A cycle in `graph`, as the path of modules that closes it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(n.to_string(), Mark::Open);
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match marks.get(m.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = path.iter().position(|p| p == m).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, graph, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if marks.get(n.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, graph, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// The library's module graph: each module and the library modules it names.
fn library_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let modules = declared_modules(&lib);
    assert!(
        modules.len() >= 5,
        "too few modules found in lib.rs: {modules:?}"
    );
    let set: BTreeSet<String> = modules.iter().cloned().collect();
    let mut graph = BTreeMap::new();
    for m in &modules {
        let file = [src.join(format!("{m}.rs")), src.join(m).join("mod.rs")]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no source file for module {m}"));
        let text = std::fs::read_to_string(&file).unwrap();
        let deps: BTreeSet<String> = crate_refs(&code_only(&text))
            .into_iter()
            .filter(|d| d != m && set.contains(d))
            .collect();
        graph.insert(m.clone(), deps);
    }
    graph
}

#[test]
fn the_library_module_graph_has_no_cycle() {
    let graph = library_graph();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the vmm library's modules import each other in a cycle: {}\nmove the shared \
             types to the lower module or pass a callback/trait so that dependencies point \
             one way (see the layers in src/lib.rs)\ngraph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
    // The layers the crate documentation promises (each may use only those before it).
    let order = [
        "transport",
        "tls",
        "size",
        "outcome",
        "console",
        "ram",
        "dirty",
        "lifecycle",
        "runctl",
        "machine",
        "sev_launch",
        "migrate",
        "snapshot",
        "control",
        "session",
    ];
    let known: BTreeSet<&str> = order.iter().copied().collect();
    for (m, deps) in &graph {
        assert!(
            known.contains(m.as_str()),
            "module {m} is not placed in a layer: add it to the list in this test and to \
             the layers in src/lib.rs"
        );
        let at = order.iter().position(|o| o == m).unwrap();
        for d in deps {
            let dat = order.iter().position(|o| o == d).unwrap();
            assert!(
                dat < at,
                "module {m} uses {d}, which is not below it in the layers {order:?}"
            );
        }
    }
}

#[test]
fn the_checker_finds_cycles_and_reads_paths() {
    let code = code_only(
        "use crate::a::X; // crate::zz\nlet s = \"crate::yy\"; use crate::{b::Y, c, d::{E, F}};\n\
         fn f<'a>(x: &'a u8) -> char { '\"' } $crate::ww; other_crate::vv; crate::e::g();",
    );
    let refs: Vec<String> = crate_refs(&code).into_iter().collect();
    assert_eq!(refs, ["a", "b", "c", "d", "e"]);
    assert_eq!(
        declared_modules("//! x\npub mod a;\nmod b;\npub(crate) mod c;\n// mod z;\n"),
        ["a", "b", "c"]
    );
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap(),
        ["a", "b", "c", "a"]
    );
}
