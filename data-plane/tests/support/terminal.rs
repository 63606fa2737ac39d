//! A binary run with its standard error on a pipe or on a pseudo-terminal, as a user's shell would
//! give it: what it wrote there.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the child's standard error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    Pipe,
    Terminal,
}

/// Runs `command` with its standard error on `stderr` until it has written `until` (then stops
/// it) or has exited; the bytes it wrote there. Panics when neither happens within 60 s.
pub fn stderr_until(mut command: Command, stderr: Stderr, until: &str) -> Vec<u8> {
    command.stdin(Stdio::null()).stdout(Stdio::null());
    let reader: Box<dyn Read + Send> = match stderr {
        Stderr::Pipe => {
            command.stderr(Stdio::piped());
            Box::new(std::io::empty())
        }
        Stderr::Terminal => {
            let pty = nix::pty::openpty(None, None).expect("openpty");
            command.stderr(Stdio::from(pty.slave));
            Box::new(std::fs::File::from(pty.master))
        }
    };
    let mut child = command.spawn().expect("spawn");
    // The parent's copy of the terminal's slave side goes with the command, so that reading the
    // master side ends when the child exits.
    drop(command);
    let reader = match child.stderr.take() {
        Some(pipe) => Box::new(pipe) as Box<dyn Read + Send>,
        None => reader,
    };
    let chunks = read_in_background(reader);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(until) {
        let left = deadline.saturating_duration_since(Instant::now());
        match chunks.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "no {until:?} within 60 s; seen:\n{}",
                    String::from_utf8_lossy(&seen)
                );
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// Sends what `reader` yields, chunk by chunk, until it ends or fails (a terminal's master side
/// fails with EIO once the child has gone).
fn read_in_background(mut reader: Box<dyn Read + Send>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Whether `bytes` hold an ANSI escape sequence.
pub fn has_escape(bytes: &[u8]) -> bool {
    bytes.contains(&0x1b)
}

/// `err` quotes the source line `source` and, on the next line, points a caret at `spot` in it.
pub fn assert_caret_under(err: &str, source: &str, spot: &str) {
    let lines: Vec<&str> = err.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.ends_with(source))
        .unwrap_or_else(|| panic!("no line quoting {source:?}:\n{err}"));
    let column = lines[at].len() - source.len() + source.find(spot).unwrap();
    let caret = lines.get(at + 1).and_then(|l| l.find('^'));
    assert_eq!(caret, Some(column), "caret not under {spot:?}:\n{err}");
}
