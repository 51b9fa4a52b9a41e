//! The README's walkthrough, run as written: the "Try it with curl" shell block (its config file,
//! the example proxy in the background, the curl mint and the streamed call) and then its Python
//! SDK snippet in the same environment, against the built-in mock upstream.
//!
//! Two things are substituted, and only these: `cargo run --example perishable-proxy -- ARGS` runs
//! the example binary that `cargo test --workspace` builds (a nested `cargo run` would wait on
//! this build's lock; `.ci/readme-path` runs the `cargo run` command itself), and the port is a free one instead of 8081 (tests run in parallel).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    crate::support::repo()
}

/// The first fenced block of `language` after the heading `heading`.
fn block(readme: &str, heading: &str, language: &str) -> String {
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("the README has no {heading:?}"))
        .1;
    let fence = format!("```{language}\n");
    let start = section
        .find(&fence)
        .unwrap_or_else(|| panic!("no {language} block after {heading:?}"))
        + fence.len();
    let len = section[start..].find("```").unwrap();
    section[start..start + len].to_owned()
}

#[test]
#[cfg_attr(
    any(perishable_missing_shell, perishable_missing_openai),
    ignore = "needs bash, curl and the openai Python package (apt-get install curl; python3 -m pip install openai)"
)]
fn the_curl_walkthrough_and_the_python_snippet_run_as_written() {
    let binary = crate::support::example_binary();

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let shell = block(&readme, "### Try it with curl", "sh");
    let python = block(&readme, "### Try it with curl", "python");
    assert!(shell.contains("8081") && python.contains("8081"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let (shell, python) = (shell.replace("8081", &port), python.replace("8081", &port));

    let dir = std::env::temp_dir().join(format!("perishable-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("snippet.py"), python).unwrap();
    let script = format!(
        r#"set -euo pipefail
cargo() {{
  local args=() after=0
  for a in "$@"; do
    if [ "$after" = 1 ]; then args+=("$a"); elif [ "$a" = "--" ]; then after=1; fi
  done
  # `exec`: the background job is the proxy itself, so the trap below stops it.
  exec "$PERISHABLE_EXAMPLE" "${{args[@]}}"
}}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_for_port() {{
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}}
{setup}
wait_for_port {port}
{calls}
echo
echo '--- python ---'
python3 snippet.py
"#,
        // The proxy starts in the background: the calls wait until it listens.
        setup = shell
            .lines()
            .take_while(|line| !line.starts_with("export TOKEN"))
            .collect::<Vec<_>>()
            .join("\n"),
        calls = shell
            .lines()
            .skip_while(|line| !line.starts_with("export TOKEN"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("PERISHABLE_EXAMPLE", &binary)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PORT")
        .env_remove("PERISHABLE_STORE_URL")
        .env_remove("PERISHABLE_JWT_SECRET")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the walkthrough did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let (curl, sdk) = stdout.split_once("--- python ---").unwrap();
    assert!(
        curl.contains("data: [DONE]") && curl.contains("chat.completion.chunk"),
        "the curl call streamed: {curl}"
    );
    assert!(
        sdk.contains("You said: Hello"),
        "the Python SDK streamed the answer: {sdk}\nstderr:\n{stderr}"
    );
}
