//! Finds the programs some end-to-end tests need, so that a test which cannot run says so in
//! cargo's own output (`test ... ignored, needs redis-server ...`) instead of passing silently.
//!
//! For each missing prerequisite this sets a cfg that marks the tests needing it `#[ignore]`,
//! with the reason. Under `CI` nothing is ignored: `.ci/run` installs every prerequisite, so a
//! missing one fails the tests that need it.
//!
//! | cfg                          | set when this is missing                                   |
//! |------------------------------|------------------------------------------------------------|
//! | `perishable_missing_redis`   | `redis-server` and `redis-cli` (one package) on the `PATH` |
//! | `perishable_missing_openai`  | the `openai` package for `python3` (or `$PYTHON`)          |
//! | `perishable_missing_openai_realtime` | `openai[realtime]`: `openai` and `websockets`      |
//! | `perishable_missing_browser` | Chromium, Node.js and `npm ci --prefix tests/browser`      |
//! | `perishable_missing_shell`   | `bash` and `curl` on the `PATH` (the README's walkthrough) |
//!
//! The probe reruns when one of these changes: the `PATH`, the files it found, the directories it
//! looked in (so installing a program is noticed), and the variables below.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFGS: [&str; 5] = [
    "perishable_missing_redis",
    "perishable_missing_openai",
    "perishable_missing_openai_realtime",
    "perishable_missing_browser",
    "perishable_missing_shell",
];

fn main() {
    for cfg in CFGS {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    for var in ["CI", "PATH", "PYTHON", "NODE", "CHROME_PATH", "CHROMIUM"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        return;
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());

    if program("redis-server").is_none() || program("redis-cli").is_none() {
        missing("perishable_missing_redis");
    }
    let (openai, websockets) = openai_installed();
    if !openai {
        missing("perishable_missing_openai");
    }
    if !(openai && websockets) {
        missing("perishable_missing_openai_realtime");
    }
    if !browser_ready(&manifest.join("browser")) {
        missing("perishable_missing_browser");
    }
    if program("bash").is_none() || program("curl").is_none() {
        missing("perishable_missing_shell");
    }
}

fn missing(cfg: &str) {
    println!("cargo::rustc-cfg={cfg}");
}

/// `name` on the `PATH`: the file when found (watched, so removing it is noticed), else every
/// `PATH` directory is watched (so installing it is).
fn program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    let found = dirs
        .iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    match &found {
        Some(file) => watch(file),
        None => dirs.iter().filter(|d| d.is_dir()).for_each(|d| watch(d)),
    }
    found
}

fn watch(path: &Path) {
    println!("cargo::rerun-if-changed={}", path.display());
}

/// Whether `python3 -c "import openai"` works, and `import websockets` (what the SDK's Realtime
/// client needs); watches the packages (or the directories where `pip install` would put them).
fn openai_installed() -> (bool, bool) {
    let python = env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    if Path::new(&python).components().count() == 1 && program(&python).is_none() {
        return (false, false);
    }
    let probe = "import site, sys\n\
                 try:\n    import openai\n    print('found', openai.__file__)\n\
                 except ImportError:\n    pass\n\
                 try:\n    import websockets\n    print('websockets', websockets.__file__)\n\
                 except ImportError:\n    pass\n\
                 for d in site.getsitepackages() + [site.getusersitepackages()]:\n    print('dir', d)\n";
    let Ok(out) = Command::new(&python).args(["-c", probe]).output() else {
        return (false, false);
    };
    let out = String::from_utf8_lossy(&out.stdout);
    let mut found = false;
    let mut websockets = false;
    for line in out.lines() {
        if let Some(file) = line.strip_prefix("found ") {
            found = true;
            watch(Path::new(file));
        }
        if let Some(file) = line.strip_prefix("websockets ") {
            websockets = true;
            watch(Path::new(file));
        }
    }
    if !(found && websockets) {
        out.lines()
            .filter_map(|l| l.strip_prefix("dir "))
            .map(Path::new)
            .filter(|d| d.is_dir())
            .for_each(watch);
    }
    (found, websockets)
}

/// Chromium (`CHROME_PATH`, `CHROMIUM`, or `chromium`, `chromium-browser`, `google-chrome`,
/// `google-chrome-stable` on the `PATH`), Node.js, and the npm packages of `tests/browser`.
fn browser_ready(browser: &Path) -> bool {
    let chromium = ["CHROME_PATH", "CHROMIUM"]
        .iter()
        .filter_map(|var| env::var_os(var).filter(|v| !v.is_empty()))
        .map(PathBuf::from)
        .next()
        .filter(|p| p.is_file())
        .or_else(|| {
            [
                "chromium",
                "chromium-browser",
                "google-chrome",
                "google-chrome-stable",
            ]
            .iter()
            .find_map(|name| program(name))
        });
    let node = env::var("NODE").unwrap_or_else(|_| "node".to_owned());
    let node_found = Path::new(&node).components().count() > 1 || program(&node).is_some();
    // `npm ci` writes node_modules/.package-lock.json last; until then watch the folder.
    let installed = browser.join("node_modules/.package-lock.json");
    if installed.is_file() {
        watch(&installed);
    } else {
        watch(browser);
    }
    chromium.is_some() && node_found && installed.is_file()
}
