//! What `control-plane` prints for a person at a terminal or into a log file: log lines coloured
//! only on a terminal (and never with `NO_COLOR`), errors said once and readably.

mod common;
#[path = "../../data-plane/tests/support/terminal.rs"]
mod terminal;

use std::process::Command;

use common::serve_command;
use terminal::{Stderr, has_escape, stderr_until};

const STARTED: &str = "control plane started";

/// `serve` on free ports that starts, with `NO_COLOR` as given.
fn serve(no_color: Option<&str>) -> Command {
    let mut c = serve_command();
    c.arg("--insecure-discovery")
        .env("LB_ADMIN_TOKEN", "an-admin-token-long-enough")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    c
}

#[test]
fn logs_piped_to_a_file_carry_no_colour_codes() {
    let out = stderr_until(serve(None), Stderr::Pipe, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes in piped logs:\n{text:?}");
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let out = stderr_until(serve(None), Stderr::Terminal, STARTED);
    assert!(has_escape(&out), "{}", String::from_utf8_lossy(&out));
    let out = stderr_until(serve(Some("1")), Stderr::Terminal, STARTED);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(STARTED), "{text}");
    assert!(!has_escape(&out), "escape codes with NO_COLOR=1:\n{text:?}");
}
