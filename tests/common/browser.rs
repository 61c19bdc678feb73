//! What the browser tests share: Debian's chromium, node and playwright-core (installed when
//! missing), and where the repository and its screenshots are.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::node;

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where screenshots are kept as test artifacts.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}

/// Chromium, node (20 or newer) and playwright-core, installed if missing, for `purpose`.
/// Idempotent; one installer at a time within a test binary.
pub fn ensure_browser_tools(purpose: &str) {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    if !Path::new(CHROMIUM).exists() {
        node::apt_install(&["chromium"], &format!("installing Debian's chromium for {purpose} (needs root and the Debian archive)"));
        assert!(Path::new(CHROMIUM).exists(), "apt-get installed chromium but {CHROMIUM} is missing");
    }
    node::ensure_node(20, &format!("{purpose} (playwright-core)"));
    node::npm_ci(&repo().join("tests/browser"), &format!("{purpose} (playwright-core)"));
    *done = true;
}

/// Echo a browser script's error output as it comes, and keep it for the failure message.
pub fn echo_and_keep(stderr: tokio::process::ChildStderr) -> tokio::task::JoinHandle<String> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    })
}
