//! WebSocket echo load: `ws_load URL CONNECTIONS SECONDS [MESSAGE_BYTES]` opens CONNECTIONS
//! WebSockets to URL (a mock backend's `/ws`, directly or through a proxy), and on each sends a
//! text message and waits for its echo, over and over, for SECONDS. Prints one line:
//! `messages/s <n> mean_us <n> failed <n>`. Used by `bench/websocket.sh`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: ws_load URL CONNECTIONS SECONDS [MESSAGE_BYTES]";
    let url = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let connections: usize = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let seconds: u64 = args.get(3).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let size: usize = args.get(4).map_or(Ok(64), |s| s.parse())?;
    let message = "x".repeat(size);

    let mut sockets = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        sockets.push(ws);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (echoed, failed, waited_us) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for mut ws in sockets {
        let (stop, echoed, failed, waited_us) = (
            stop.clone(),
            echoed.clone(),
            failed.clone(),
            waited_us.clone(),
        );
        let message = message.clone();
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if ws.send(Message::text(message.clone())).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.len() == message.len() => {
                        echoed.fetch_add(1, Ordering::Relaxed);
                        let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        waited_us.fetch_add(us, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            let _ = ws.close(None).await;
        });
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let n = echoed.load(Ordering::Relaxed);
    let mean = waited_us.load(Ordering::Relaxed) / n.max(1);
    while tasks.join_next().await.is_some() {}
    println!(
        "messages/s {:.0} mean_us {mean} failed {}",
        n as f64 / elapsed,
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}
