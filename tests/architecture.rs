//! The layering of `src/` (docs/architecture.md): data flows one way, config -> data -> model ->
//! objective -> optimizer -> checkpoint / metrics / reports -> training -> commands. Every
//! `crate::` path in a module (imports, paths in code and in doc links alike) must name a module
//! of a strictly lower layer; a new top-level module must be given a layer here.

use std::path::Path;

/// Top-level modules of `src/`, lowest layer first.
const LAYERS: &[&[&str]] = &[
    &["error", "rng"],
    &["config"],
    &["ops"],
    &[
        "data",
        "device",
        "memory",
        "checkpoint",
        "report",
        "launch",
        "distributed",
    ],
    &["models"],
    &["objectives", "optim"],
    &["eval", "session"],
    &["samples", "metrics"],
    &["train"],
    &["bench", "kernel_check"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The modules named by `crate::NAME` in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn no_module_reaches_up_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer(&top) else {
            wrong.push(format!(
                "{}: module `{top}` has no layer in tests/architecture.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for dep in crate_paths(&text) {
            if dep == top {
                continue;
            }
            match layer(&dep) {
                Some(l) if l < own => {}
                Some(_) => wrong.push(format!(
                    "{}: `crate::{dep}` is not below `{top}`",
                    rel.display()
                )),
                None => wrong.push(format!("{}: `crate::{dep}` has no layer", rel.display())),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward or unplaced references:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_path() {
    // The scanner itself: a path in code or in a doc link is found.
    assert_eq!(
        crate_paths("use crate::config::Config;\n/// see [`crate::train::train`]"),
        vec!["config", "train"]
    );
    assert!(layer("config") < layer("train"));
}
