//! The idle-connection pool ([`super::pool`]) over real loopback connections, on a paused clock:
//! most recently used first, expiry after 50 s idle (on taking, and from the cold end on every
//! return), the cap on idle connections, one list per worker, connections the backend closed or
//! wrote on while idle, and clearing. A connection the pool lets go of is closed: the backend's
//! side of it sees the end of the stream.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream as StdStream};
use std::time::Duration;

use tokio::net::TcpStream;

use lb_proto::validate::BackendProtocol;

use super::Transport;
use super::conn::{Conn, Io};
use super::pool::IdleConns;

/// A connection as the pool holds it, and the backend's side of it.
struct Pair {
    conn: Conn,
    /// The proxy's end, to tell the connection apart when the pool hands it out.
    local: SocketAddr,
    backend: StdStream,
}

/// A loopback listener standing for a backend; its connections are accepted as they come.
struct Backend(TcpListener);

impl Backend {
    fn new() -> Backend {
        Backend(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    async fn pair(&self) -> Pair {
        let stream = TcpStream::connect(self.0.local_addr().unwrap())
            .await
            .unwrap();
        let (backend, _) = self.0.accept().unwrap();
        let local = stream.local_addr().unwrap();
        Pair {
            conn: Conn::new(Io::Plain(stream)),
            local,
            backend,
        }
    }
}

fn local_of(conn: &Conn) -> SocketAddr {
    match &conn.io {
        Io::Plain(s) => s.local_addr().unwrap(),
        Io::Tls(s) => s.get_ref().0.local_addr().unwrap(),
    }
}

/// Waits (in real time, which the paused clock does not touch) for the proxy's end of the
/// connection to close: the backend reads the end of the stream.
fn assert_closed(backend: &mut StdStream, what: &str) {
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    match backend.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("{what}: the backend got bytes"),
        Err(e) => panic!("{what}: still open ({e})"),
    }
}

/// The proxy's end of the connection is open: nothing, not even its end, to read.
fn assert_open(backend: &mut StdStream, what: &str) {
    backend.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match backend.read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: not open and silent ({other:?})"),
    }
    backend.set_nonblocking(false).unwrap();
}

const IDLE: Duration = Duration::from_secs(50);

#[tokio::test(start_paused = true)]
async fn the_most_recently_returned_connection_is_taken_first() {
    let backend = Backend::new();
    let pool = IdleConns::new(1, Transport::Plain, BackendProtocol::Http1);
    let (a, b) = (backend.pair().await, backend.pair().await);
    let (mut a_backend, mut b_backend) = (a.backend, b.backend);
    pool.put(0, a.conn);
    pool.put(0, b.conn);
    let first = pool.take(0).expect("a connection");
    assert_eq!(local_of(&first), b.local);
    let second = pool.take(0).expect("a connection");
    assert_eq!(local_of(&second), a.local);
    assert!(pool.take(0).is_none());
    // Taken connections are the caller's, open.
    assert_open(&mut a_backend, "a");
    assert_open(&mut b_backend, "b");
}

#[tokio::test(start_paused = true)]
async fn a_connection_idle_for_50_s_is_closed_not_handed_out() {
    let backend = Backend::new();
    let pool = IdleConns::new(1, Transport::Plain, BackendProtocol::Http1);
    let p = backend.pair().await;
    let mut p_backend = p.backend;
    pool.put(0, p.conn);
    tokio::time::advance(IDLE - Duration::from_millis(1)).await;
    let conn = pool.take(0).expect("a connection idle for just under 50 s");
    assert_eq!(local_of(&conn), p.local);
    // Back in the pool, its idle time starts again.
    pool.put(0, conn);
    tokio::time::advance(IDLE).await;
    assert!(pool.take(0).is_none(), "handed out after 50 s idle");
    assert_closed(&mut p_backend, "the expired connection");
}

#[tokio::test(start_paused = true)]
async fn expired_connections_are_closed_from_the_cold_end_when_one_returns() {
    let backend = Backend::new();
    let pool = IdleConns::new(1, Transport::Plain, BackendProtocol::Http1);
    let (old, warm, new) = (
        backend.pair().await,
        backend.pair().await,
        backend.pair().await,
    );
    let (mut old_backend, mut warm_backend) = (old.backend, warm.backend);
    pool.put(0, old.conn);
    tokio::time::advance(Duration::from_secs(30)).await;
    pool.put(0, warm.conn);
    tokio::time::advance(Duration::from_secs(20)).await;
    // `old` has been idle 50 s, `warm` 20 s: the return of `new` closes `old` only, before
    // anyone asks for a connection.
    pool.put(0, new.conn);
    assert_closed(&mut old_backend, "the expired connection");
    assert_open(&mut warm_backend, "the connection idle for 20 s");
    assert_eq!(pool.take(0).map(|c| local_of(&c)), Some(new.local));
    assert_eq!(pool.take(0).map(|c| local_of(&c)), Some(warm.local));
    assert!(pool.take(0).is_none());
}

/// The soft limit on open files, from /proc (None where there is none to read).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(start_paused = true)]
async fn at_most_1024_idle_connections_are_kept_per_worker() {
    const CAP: usize = 1024;
    // Two descriptors per connection (both ends live in this process).
    if open_files_limit().is_some_and(|n| n < 2 * CAP as u64 + 200) {
        eprintln!(
            "skipped: raise the open-files limit (ulimit -n) to 2300 or more to run this test"
        );
        return;
    }
    let backend = Backend::new();
    let pool = IdleConns::new(2, Transport::Plain, BackendProtocol::Http1);
    let mut kept = Vec::with_capacity(CAP);
    let mut backends = Vec::with_capacity(CAP);
    for _ in 0..CAP {
        let p = backend.pair().await;
        kept.push(p.local);
        backends.push(p.backend);
        pool.put(0, p.conn);
    }
    // One more: the list is full, so this one is closed rather than kept.
    let extra = backend.pair().await;
    let mut extra_backend = extra.backend;
    pool.put(0, extra.conn);
    assert_closed(&mut extra_backend, "the connection past the cap");
    assert_open(&mut backends[0], "the oldest kept connection");
    // The other worker's list is its own, and has room.
    let other = backend.pair().await;
    pool.put(1, other.conn);
    assert_eq!(pool.take(1).map(|c| local_of(&c)), Some(other.local));
    // Every kept one comes back, most recent first, then none.
    for expected in kept.iter().rev() {
        let conn = pool.take(0).expect("a kept connection");
        assert_eq!(local_of(&conn), *expected);
    }
    assert!(pool.take(0).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_full_list_of_expired_connections_makes_room_for_a_new_one() {
    const CAP: usize = 1024;
    if open_files_limit().is_some_and(|n| n < 2 * CAP as u64 + 200) {
        eprintln!(
            "skipped: raise the open-files limit (ulimit -n) to 2300 or more to run this test"
        );
        return;
    }
    let backend = Backend::new();
    let pool = IdleConns::new(1, Transport::Plain, BackendProtocol::Http1);
    let mut backends = Vec::with_capacity(CAP);
    for _ in 0..CAP {
        let p = backend.pair().await;
        backends.push(p.backend);
        pool.put(0, p.conn);
    }
    tokio::time::advance(IDLE).await;
    let fresh = backend.pair().await;
    pool.put(0, fresh.conn);
    for (i, b) in backends.iter_mut().enumerate() {
        assert_closed(b, &format!("expired connection {i}"));
    }
    assert_eq!(pool.take(0).map(|c| local_of(&c)), Some(fresh.local));
    assert!(pool.take(0).is_none());
}

#[tokio::test(start_paused = true)]
async fn each_worker_has_its_own_list() {
    let backend = Backend::new();
    let pool = IdleConns::new(2, Transport::Plain, BackendProtocol::Http1);
    let p = backend.pair().await;
    pool.put(0, p.conn);
    assert!(
        pool.take(1).is_none(),
        "worker 1 took worker 0's connection"
    );
    // Worker numbers past the list count wrap around.
    assert_eq!(pool.take(2).map(|c| local_of(&c)), Some(p.local));
}

/// Waits, in real time, until the proxy's end of `pair` has something to read (the backend's
/// bytes or its close), so the pool's check, on the runtime's next look at the socket, sees it.
async fn until_readable(local_end: &StdStream) {
    // The descriptor shares the non-blocking mode of the one the pool holds: look until the
    // close or the bytes are there.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut byte = [0u8; 1];
    loop {
        match local_end.peek(&mut byte) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the backend's close or bytes never arrived"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // One turn of the runtime: the I/O driver takes in the socket's readiness.
    tokio::task::yield_now().await;
}

/// A pair whose proxy end is also reachable through a second descriptor, to watch it while
/// the pool holds it.
async fn watched_pair(backend: &Backend) -> (Pair, StdStream) {
    let std = StdStream::connect(backend.0.local_addr().unwrap()).unwrap();
    let (backend_end, _) = backend.0.accept().unwrap();
    let watch = std.try_clone().unwrap();
    std.set_nonblocking(true).unwrap();
    let stream = TcpStream::from_std(std).unwrap();
    let local = stream.local_addr().unwrap();
    (
        Pair {
            conn: Conn::new(Io::Plain(stream)),
            local,
            backend: backend_end,
        },
        watch,
    )
}

#[tokio::test(start_paused = true)]
async fn a_connection_the_backend_closed_or_wrote_on_while_idle_is_passed_over() {
    use std::io::Write;
    let backend = Backend::new();
    let pool = IdleConns::new(1, Transport::Plain, BackendProtocol::Http1);
    let (live, _) = watched_pair(&backend).await;
    let (closed, closed_watch) = watched_pair(&backend).await;
    let (chatty, chatty_watch) = watched_pair(&backend).await;
    let mut live_backend = live.backend;
    pool.put(0, live.conn);
    pool.put(0, closed.conn);
    pool.put(0, chatty.conn);
    // While idle: one backend closes its connection, another sends bytes nobody asked for.
    drop(closed.backend);
    let mut chatty_backend = chatty.backend;
    chatty_backend
        .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        .unwrap();
    until_readable(&closed_watch).await;
    until_readable(&chatty_watch).await;
    // Both are passed over (most recent first), and the live one is handed out.
    let conn = pool.take(0).expect("the live connection");
    assert_eq!(local_of(&conn), live.local);
    assert!(pool.take(0).is_none());
    assert_open(&mut live_backend, "the live connection");
}

#[tokio::test(start_paused = true)]
async fn clearing_closes_every_idle_connection() {
    let backend = Backend::new();
    let pool = IdleConns::new(2, Transport::Plain, BackendProtocol::Http1);
    let (a, b) = (backend.pair().await, backend.pair().await);
    let (mut a_backend, mut b_backend) = (a.backend, b.backend);
    pool.put(0, a.conn);
    pool.put(1, b.conn);
    pool.clear();
    assert_closed(&mut a_backend, "worker 0's connection");
    assert_closed(&mut b_backend, "worker 1's connection");
    assert!(pool.take(0).is_none() && pool.take(1).is_none());
}
