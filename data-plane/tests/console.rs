//! What the data plane prints for a person at a terminal or into a log file: log lines coloured
//! only on a terminal (and never with `NO_COLOR`), errors said once and readably.

#[path = "support/bin.rs"]
mod bin;
#[path = "support/terminal.rs"]
mod terminal;

use std::process::Command;

use bin::run_binary;
use terminal::{Stderr, assert_caret_under, has_escape, stderr_until};

fn data_plane(no_color: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_data-plane"));
    c.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--control-plane", "http://127.0.0.1:1"])
        .env_remove("LB_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    c
}

const STARTED: &str = "data plane started";

#[test]
fn logs_piped_to_a_file_carry_no_colour_codes() {
    let out = stderr_until(data_plane(None), Stderr::Pipe, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes in piped logs:\n{text:?}");
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let out = stderr_until(data_plane(None), Stderr::Terminal, STARTED);
    assert!(has_escape(&out), "{}", String::from_utf8_lossy(&out));
    // An empty NO_COLOR does not count (no-color.org).
    let out = stderr_until(data_plane(Some("")), Stderr::Terminal, STARTED);
    assert!(has_escape(&out), "{}", String::from_utf8_lossy(&out));
    let out = stderr_until(data_plane(Some("1")), Stderr::Terminal, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes with NO_COLOR=1:\n{text:?}");
}

#[test]
fn a_missing_config_file_is_named_with_its_cause_once() {
    let (code, err) = run_binary(&["--config", "/nonexistent/lb.toml"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/lb.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_toml_error_is_printed_with_a_caret_under_its_place() {
    let path = std::env::temp_dir().join(format!("lb-console-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "workers = 2\nlisten = \"127.0.0.1:0\"\nworkers = = 3\n",
    )
    .unwrap();
    let (code, err) = run_binary(&["--config", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "{err}");
    assert_caret_under(&err, "workers = = 3", "= 3");
}
