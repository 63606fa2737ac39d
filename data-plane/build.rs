//! Names the commit the binaries are built from, for the `lb_build_info` metric of both planes:
//! `LB_BUILD_COMMIT` when set (a build without the repository, as in a container image), else
//! `git rev-parse HEAD`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Asks cargo to run this again when `git_path` (a path inside the repository) changes.
fn watch(git_path: &str) {
    if let Some(p) = git(&["rev-parse", "--git-path", git_path])
        && Path::new(&p).exists()
    {
        println!("cargo:rerun-if-changed={p}");
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=LB_BUILD_COMMIT");
    let commit = std::env::var("LB_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // HEAD moves on a branch switch; the branch's ref (loose or packed) on a commit.
            watch("HEAD");
            watch("packed-refs");
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&branch);
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=LB_BUILD_COMMIT={commit}");
}
