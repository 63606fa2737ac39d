//! The data plane's log lines as the terminal or file they go to receives them: coloured only on a
//! terminal, and never when `NO_COLOR` is set.

#[path = "support/terminal.rs"]
mod terminal;

use std::process::Command;

use terminal::{Stderr, has_escape, stderr_until};

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
