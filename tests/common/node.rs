//! Node.js for the tests that drive real JavaScript clients (the console in a browser, RxDB):
//! installs node and npm with apt-get when they are missing, and a test folder's npm packages
//! with `npm ci` from its committed package-lock.json. Set-up failures panic: these tests fail,
//! never skip, when they cannot install what they need.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Run a set-up command, showing its output; panics with `why` when it fails.
pub fn run(program: &str, args: &[&str], envs: &[(&str, &str)], why: &str) {
    eprintln!("test set-up: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{why}: cannot run {program}: {e}"));
    assert!(status.success(), "{why}: `{program} {}` failed with {status}", args.join(" "));
}

pub fn on_path(program: &str) -> bool {
    Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

pub fn apt_install(packages: &[&str], why: &str) {
    let noninteractive = [("DEBIAN_FRONTEND", "noninteractive")];
    run("apt-get", &["update"], &noninteractive, why);
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run("apt-get", &args, &noninteractive, why);
}

/// Installers of this test binary take turns (two tests must not run `npm ci` into one folder).
static INSTALLING: Mutex<()> = Mutex::new(());

/// node (at least `min_major`) and npm, installed with apt-get if missing.
pub fn ensure_node(min_major: u32, needed_by: &str) {
    let _turn = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if !on_path("node") || !on_path("npm") {
        apt_install(&["nodejs", "npm"], &format!("installing node and npm for {needed_by}"));
    }
    let version = Command::new("node").arg("--version").output().expect("node runs");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    assert!(major >= min_major, "{needed_by} needs node {min_major} or newer; this machine has node {version}");
}

/// The packages of `dir`'s package-lock.json, installed with `npm ci` unless the installed tree
/// is at least as new as the lock file (npm writes `node_modules/.package-lock.json` last).
pub fn npm_ci(dir: &Path, needed_by: &str) {
    let _turn = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let lock = modified(&dir.join("package-lock.json")).unwrap_or_else(|| panic!("{} has no package-lock.json", dir.display()));
    let installed = modified(&dir.join("node_modules/.package-lock.json"));
    if installed.is_some_and(|installed| installed >= lock) {
        return;
    }
    let dir = dir.to_str().expect("UTF-8 path");
    run(
        "npm",
        &["ci", "--prefix", dir, "--no-audit", "--no-fund"],
        &[],
        &format!("installing the npm packages of {dir} for {needed_by} from the npm registry (its package-lock.json)"),
    );
}
