//! Process-level plumbing shared by the binaries: log set-up and the shutdown signal.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Logs to stderr, one JSON object per line when `json`, filtered by `RUST_LOG` (default info).
/// Text logs are coloured only when stderr is a terminal and `NO_COLOR` is unset or empty.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR");
    let ansi = colour_wanted(std::io::stderr().is_terminal(), no_color.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether log lines carry ANSI colour: only on a terminal, and never when `NO_COLOR` holds a
/// non-empty value (<https://no-color.org>).
pub fn colour_wanted(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// An error and its causes on one line, `outer: inner: …`, each cause said once: a cause whose
/// text an outer message already quotes is left out.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. Logs nothing: each binary says so under
/// its own name.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new(""))));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("state file x: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_quoted_by_its_error_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Quoting { source: io }).context("cannot load");
        assert_eq!(error_report(&e), "cannot load: state file x: no such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_report(&e), "outer: inner");
    }
}
