//! Records the git revision the `esvm` binary is built from (`esvm --version`): the short
//! commit id, with `-dirty` when tracked files differ from it, or `unknown` outside a git
//! checkout (a source tarball) or without git.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let revision = match git(&manifest, &["rev-parse", "--short", "HEAD"]) {
        Some(rev) if !rev.is_empty() => {
            let dirty = git(
                &manifest,
                &["status", "--porcelain", "--untracked-files=no"],
            )
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=ESVM_GIT_REVISION={revision}");

    // Run again when the revision or the tree's state may have changed: a commit or checkout
    // (HEAD, the branch's ref), staging (the index), or an edit of the workspace's sources.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(git_dir) = git(&manifest, &["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        for f in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={}", git_dir.join(f).display());
        }
        if let Some(common) = git(&manifest, &["rev-parse", "--git-common-dir"]) {
            let common = manifest.join(common);
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
            if let Some(branch) = git(&manifest, &["symbolic-ref", "-q", "HEAD"]) {
                println!("cargo:rerun-if-changed={}", common.join(branch).display());
            }
        }
        if let Some(top) = git(&manifest, &["rev-parse", "--show-toplevel"]) {
            let top = PathBuf::from(top);
            for d in ["crates", "guests", "Cargo.toml", "Cargo.lock"] {
                println!("cargo:rerun-if-changed={}", top.join(d).display());
            }
        }
    }
}
