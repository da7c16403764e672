//! The Docker image's build context, checked without a Docker engine: the builder stage's
//! `COPY` lines are replayed into an empty folder and cargo must read and check the crate
//! there, so a file the manifest needs (a declared bench, say) can never be left out of the
//! image again. The environment names the Dockerfile and docker-compose.yml set must be
//! settings that exist in `config/default.toml`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One `COPY src... dest` of the builder stage (multi-stage `--from` copies are not context).
struct CopyLine {
    sources: Vec<String>,
    dest: String,
}

/// The `COPY` lines before the second `FROM` (the runtime stage copies from the builder only).
fn builder_copies(dockerfile: &str) -> Vec<CopyLine> {
    let mut stages = 0;
    let mut copies = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages != 1 || !line.starts_with("COPY ") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert!(
            !words.iter().any(|w| w.starts_with("--")),
            "builder COPY with flags is not understood by this check: {line}"
        );
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        copies.push(CopyLine {
            sources: sources.iter().map(|s| s.to_string()).collect(),
            dest: dest.to_string(),
        });
    }
    copies
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Lays the builder stage's context out in `dir`, leaving out any source named in `omit`.
fn replay(copies: &[CopyLine], dir: &Path, omit: &[&str]) {
    let root = repo_root();
    for copy in copies {
        for source in copy.sources.iter().filter(|s| !omit.contains(&s.as_str())) {
            let from = root.join(source);
            assert!(
                from.exists(),
                "the Dockerfile copies {source}, which is not in the repository"
            );
            // `COPY a b ./` puts files under their own names; `COPY src src` names the target.
            let to = if copy.dest.ends_with('/') || copy.sources.len() > 1 {
                dir.join(&copy.dest)
                    .join(Path::new(source).file_name().unwrap())
            } else {
                dir.join(&copy.dest)
            };
            copy_tree(&from, &to);
        }
    }
}

fn cargo(dir: &Path, args: &[&str], target_dir: &Path) -> Output {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(dir)
        // A target folder of its own: the outer `cargo test` may hold the main one's lock.
        .env("CARGO_TARGET_DIR", target_dir)
        .env("CARGO_TERM_COLOR", "never")
        .output()
        .expect("cargo runs")
}

/// Kept inside the crate's target folder, so consecutive runs reuse the checked dependencies.
fn check_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("docker-context")
}

/// A fixed folder for the replayed context: cargo keys a path package by its folder, so the same
/// path each run lets the check reuse its previous work on the crate itself.
fn fresh_context_dir(name: &str) -> PathBuf {
    let dir = check_target_dir().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dockerfile_copies() -> Vec<CopyLine> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let copies = builder_copies(&text);
    assert!(
        !copies.is_empty(),
        "no COPY lines found in the builder stage"
    );
    copies
}

#[test]
fn the_builder_stage_context_checks_with_cargo() {
    let copies = dockerfile_copies();
    let dir = fresh_context_dir("context");
    replay(&copies, &dir, &[]);
    let target = check_target_dir();
    let metadata = cargo(
        &dir,
        &[
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
            "--locked",
        ],
        &target,
    );
    assert!(
        metadata.status.success(),
        "cargo metadata fails on the Dockerfile's context:\n{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    // The image runs `cargo build --release --locked`; `check` compiles the same crate (lib and
    // bin, build script, embedded migrations) without code generation.
    let check = cargo(&dir, &["check", "--locked", "--offline", "--bins"], &target);
    assert!(
        check.status.success(),
        "cargo check fails on the Dockerfile's context:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The same check on a context with one needed file left out fails, and names it (cargo reads
/// the manifest's targets and the lock file before it compiles anything, so this is quick).
#[test]
fn a_context_missing_what_the_crate_needs_is_caught() {
    let copies = dockerfile_copies();
    for (omitted, named) in [("benches", "int8_gemm"), ("Cargo.lock", "lock file")] {
        let dir = tempfile::tempdir().unwrap();
        replay(&copies, dir.path(), &[omitted]);
        let check = cargo(
            dir.path(),
            &["check", "--locked", "--offline", "--bins"],
            &check_target_dir(),
        );
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(
            !check.status.success(),
            "cargo check passed without {omitted}"
        );
        assert!(stderr.contains(named), "without {omitted}: {stderr}");
    }
}

/// `QUANTD_SERVER__PORT` → `server.port`, `QUANTD_DATA_DIR` → `data_dir`.
fn setting_path(env_name: &str) -> Option<String> {
    let rest = env_name.strip_prefix("QUANTD_")?;
    Some(rest.to_lowercase().replace("__", "."))
}

/// The names assigned by the Dockerfile's `ENV` lines (with continuations).
fn dockerfile_env_names(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_string()))
        .collect()
}

/// The keys under each `environment:` map of docker-compose.yml.
fn compose_env_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut block_indent = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(outer) = block_indent {
            if indent > outer {
                if let Some((key, _)) = trimmed.split_once(':') {
                    names.push(key.trim().to_string());
                }
                continue;
            }
            block_indent = None;
        }
        if trimmed == "environment:" {
            block_indent = Some(indent);
        }
    }
    names
}

#[test]
fn environment_names_in_the_image_and_compose_file_are_settings() {
    use figment::providers::{Format, Toml};
    let defaults = figment::Figment::from(Toml::file(repo_root().join("config/default.toml")));
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    let mut names = dockerfile_env_names(&dockerfile);
    names.extend(compose_env_names(&compose));
    let quantd: Vec<&String> = names.iter().filter(|n| n.starts_with("QUANTD_")).collect();
    assert!(
        quantd.len() >= 5,
        "expected the image's settings, found {names:?}"
    );
    for name in quantd {
        let path = setting_path(name).unwrap();
        assert!(
            defaults.find_value(&path).is_ok(),
            "{name} sets `{path}`, which config/default.toml does not have"
        );
    }
    // Besides quantd's own: the log filter, the standard AWS variables the object store reads,
    // and the documented variables of the postgres, minio and mc images.
    let others = [
        "RUST_LOG",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ALLOW_HTTP",
        "POSTGRES_USER",
        "POSTGRES_DB",
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MC_USER",
        "MC_PASSWORD",
    ];
    for name in names.iter().filter(|n| !n.starts_with("QUANTD_")) {
        assert!(
            others.contains(&name.as_str()),
            "unexpected environment name {name}"
        );
    }
}
