//! Single flight for concurrent misses of one record, within one data plane.
//!
//! The first miss of a record [`Flights::join`]s as the leader and gets a [`Flight`]; the
//! others get a receiver and [`wait`] for the flight's [`Outcome`], each bounded by its own
//! deadline. A flight is one `tokio::sync::watch` channel in a map keyed by the record's
//! digest; it leaves the map when its leader resolves it, or when the leader is dropped (a
//! client that went away, a panic), which resolves it as [`Outcome::Abandoned`]. No follower
//! can wait past its deadline or on a flight nobody will finish.
//!
//! Across data planes the same role falls to a Redis lock (`SET NX PX`), taken only by the
//! in-process leader so that one data plane makes one lock attempt per miss; see
//! [`super::Cache::lookup`] for how the two fit together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::time::Instant;

use super::entry::Entry;
use super::key::Digest32;

/// How a flight ended, as its followers see it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Pending,
    /// Stored under `variant`: followers whose request maps to the same variant use it.
    Filled {
        variant: Digest32,
        entry: Arc<Entry>,
    },
    /// The response may not be stored: followers go to the backend themselves.
    NotStored,
    /// The backend failed: followers holding a stale-if-error entry serve it.
    Failed,
    /// The leader went away without an answer: followers try again, one of them as leader.
    Abandoned,
}

type Channel = Arc<watch::Sender<Outcome>>;

/// The flights in progress in one data plane.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Digest32, Channel>>,
}

/// What [`Flights::join`] makes of a caller.
pub enum Join {
    Lead(Flight),
    Follow(watch::Receiver<Outcome>),
}

/// The leader's side of a flight; resolving or dropping it ends the flight.
pub struct Flight {
    flights: Arc<Flights>,
    key: Digest32,
    tx: Option<Channel>,
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<Digest32, Channel>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(self: &Arc<Self>, map: &mut HashMap<Digest32, Channel>, key: Digest32) -> Flight {
        let (tx, _) = watch::channel(Outcome::Pending);
        let tx = Arc::new(tx);
        map.insert(key, Arc::clone(&tx));
        Flight {
            flights: Arc::clone(self),
            key,
            tx: Some(tx),
        }
    }

    /// Leads the flight of `key`, or follows the one already in progress.
    pub fn join(self: &Arc<Self>, key: Digest32) -> Join {
        let mut map = self.lock();
        match map.get(&key) {
            Some(tx) => Join::Follow(tx.subscribe()),
            None => Join::Lead(self.start(&mut map, key)),
        }
    }

    /// Leads the flight of `key` only if none is in progress (background refreshes, which
    /// nobody waits for).
    pub fn try_lead(self: &Arc<Self>, key: Digest32) -> Option<Flight> {
        let mut map = self.lock();
        (!map.contains_key(&key)).then(|| self.start(&mut map, key))
    }

    /// Followers waiting on the flight of `key`.
    pub fn waiting(&self, key: &Digest32) -> usize {
        self.lock().get(key).map_or(0, |tx| tx.receiver_count())
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(any(test, feature = "internals"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Flight {
    pub fn key(&self) -> &Digest32 {
        &self.key
    }

    /// Ends the flight: later misses start a new one, current followers get `outcome`.
    pub fn resolve(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        let Some(tx) = self.tx.take() else { return };
        {
            let mut map = self.flights.lock();
            if map.get(&self.key).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                map.remove(&self.key);
            }
        }
        tx.send_replace(outcome);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.finish(Outcome::Abandoned);
    }
}

/// What a follower got.
#[derive(Debug, Clone)]
pub enum Waited {
    Done(Outcome),
    TimedOut,
}

/// Waits for a flight's outcome until `deadline`.
pub async fn wait(mut rx: watch::Receiver<Outcome>, deadline: Instant) -> Waited {
    let done = rx.wait_for(|o| !matches!(o, Outcome::Pending));
    match tokio::time::timeout_at(deadline, done).await {
        Ok(Ok(o)) => Waited::Done(o.clone()),
        // The sender is gone without a word: as good as abandoned.
        Ok(Err(_)) => Waited::Done(Outcome::Abandoned),
        Err(_) => Waited::TimedOut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn follow(j: Join) -> watch::Receiver<Outcome> {
        match j {
            Join::Follow(rx) => rx,
            Join::Lead(_) => panic!("expected to follow"),
        }
    }

    fn lead(j: Join) -> Flight {
        match j {
            Join::Lead(f) => f,
            Join::Follow(_) => panic!("expected to lead"),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn one_leader_and_its_followers_get_its_outcome() {
        let flights = Arc::new(Flights::default());
        let k = [1u8; 32];
        let leader = lead(flights.join(k));
        let rxs: Vec<_> = (0..5).map(|_| follow(flights.join(k))).collect();
        assert_eq!(flights.waiting(&k), 5);
        assert!(flights.try_lead(k).is_none());
        leader.resolve(Outcome::NotStored);
        assert!(flights.is_empty());
        for rx in rxs {
            assert!(matches!(
                wait(rx, far()).await,
                Waited::Done(Outcome::NotStored)
            ));
        }
        // A new miss starts a new flight.
        assert!(flights.try_lead(k).is_some());
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_followers() {
        let flights = Arc::new(Flights::default());
        let k = [2u8; 32];
        let leader = lead(flights.join(k));
        let rx = follow(flights.join(k));
        let waiting = tokio::spawn(wait(rx, far()));
        drop(leader);
        assert!(matches!(
            waiting.await.unwrap(),
            Waited::Done(Outcome::Abandoned)
        ));
        assert!(flights.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn followers_stop_waiting_at_their_deadline() {
        let flights = Arc::new(Flights::default());
        let k = [3u8; 32];
        let _leader = lead(flights.join(k));
        let rx = follow(flights.join(k));
        let waited = wait(rx, Instant::now() + Duration::from_millis(50)).await;
        assert!(matches!(waited, Waited::TimedOut));
    }
}
