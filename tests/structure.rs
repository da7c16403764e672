//! The source tree keeps the layers the README's Architecture section describes: each rule is
//! a plain check over `src/` (which module may name which), the README lists the modules as
//! they are, no source file grows past the size a reader can hold, and nothing large is in git.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    out.sort();
    out
}

/// The top-level modules a file under `src/<module>` names as `crate::<name>`.
fn crate_modules_named(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Which crate modules the files of `module` may name (besides themselves).
fn check_layer(module: &str, allowed: &[&str]) {
    let root = repo_root().join("src").join(module);
    let files = sources(&root);
    assert!(!files.is_empty(), "src/{module} has no sources");
    let mut violations = Vec::new();
    for (path, text) in files {
        for name in crate_modules_named(&text) {
            if name != module && !allowed.contains(&name.as_str()) {
                violations.push(format!("{}: crate::{name}", path.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "src/{module} may use only {allowed:?}; found:\n{}",
        violations.join("\n")
    );
}

#[test]
fn formats_is_the_bottom_layer() {
    check_layer("formats", &[]);
}

#[test]
fn kernels_use_only_formats() {
    check_layer("kernels", &["formats"]);
}

#[test]
fn nn_uses_only_kernels_and_formats() {
    check_layer("nn", &["kernels", "formats"]);
}

#[test]
fn eval_uses_only_nn() {
    check_layer("eval", &["nn"]);
}

#[test]
fn model_and_export_take_layouts_from_formats_not_quant() {
    check_layer("model", &["nn", "kernels", "formats"]);
    check_layer("export", &["model", "formats", "store"]);
}

#[test]
fn quant_stays_below_jobs_engine_and_http() {
    check_layer("quant", &["model", "nn", "kernels", "formats"]);
}

/// The modules `src/lib.rs` declares.
fn crate_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(repo_root().join("src/lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

#[test]
fn the_readme_architecture_section_lists_every_module() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("\n## Architecture")
        .expect("README has an Architecture section");
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let modules = crate_modules();
    assert!(modules.len() > 10, "{modules:?}");
    for module in modules {
        let dir = repo_root().join("src").join(&module);
        let named = if dir.is_dir() {
            format!("`{module}/`")
        } else {
            format!("`{module}.rs`")
        };
        assert!(
            section.contains(&named),
            "README's Architecture section does not list {named}"
        );
    }
}

/// STYLE asks for small modules: no source file over 700 lines (the guideline is about 600).
#[test]
fn no_source_file_is_too_long_to_read() {
    let mut long = Vec::new();
    for dir in ["src", "tests", "benches"] {
        for (path, text) in sources(&repo_root().join(dir)) {
            let lines = text.lines().count();
            if lines > 700 {
                long.push(format!("{} ({lines} lines)", path.display()));
            }
        }
    }
    assert!(long.is_empty(), "split these files: {long:?}");
}

#[test]
fn no_file_in_git_is_over_2_mb() {
    let root = repo_root();
    let Ok(out) = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
    else {
        panic!("git is needed to list the tracked files");
    };
    assert!(out.status.success(), "git ls-files failed");
    let listed = String::from_utf8(out.stdout).unwrap();
    let files: Vec<&str> = listed.split('\0').filter(|f| !f.is_empty()).collect();
    assert!(files.len() > 50, "git lists {} files", files.len());
    let big: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let size = std::fs::metadata(root.join(f)).ok()?.len();
            (size > 2 * 1024 * 1024).then(|| format!("{f} ({size} bytes)"))
        })
        .collect();
    assert!(big.is_empty(), "files over 2 MB in git: {big:?}");
}
