//! A real browser for the status page's tests: Debian's Chromium, headless,
//! run in the calling thread's namespace (so it loads the page as a peer in
//! that namespace would). `xtask setup` installs it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// Where Debian installs it.
const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one page load may take (a cold start of Chromium is slow).
const LOAD_WITHIN: Duration = Duration::from_secs(90);

/// A fresh profile for each run, removed afterwards: runs share nothing.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tailguard-chromium-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a profile directory");
        Self(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chromium(args: &[&str]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the status page's tests need Debian's chromium \
         (cargo +stable xtask setup installs it)"
    );
    let profile = Profile::new();
    let seconds = crate::patience(LOAD_WITHIN).as_secs().to_string();
    let out = Command::new("timeout")
        .arg(&seconds)
        .arg(CHROMIUM)
        .args([
            "--headless",
            // Root in a test namespace: Chromium's sandbox needs a user
            // namespace of its own, which this one is not.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {CHROMIUM}: {e}"));
    assert!(
        out.status.success(),
        "{CHROMIUM} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM of `url` as the browser built it, serialised.
pub fn dom(url: &str) -> String {
    chromium(&["--dump-dom", url])
}

/// A screenshot of `url` (PNG) at `path`, `width` × `height` CSS pixels.
pub fn screenshot(url: &str, path: &Path, width: u32, height: u32) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("the screenshot's directory");
    }
    chromium(&[
        &format!("--screenshot={}", path.display()),
        &format!("--window-size={width},{height}"),
        url,
    ]);
    let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        path.display()
    );
}

/// The workspace's `target/` directory, where tests leave what people look at.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}
