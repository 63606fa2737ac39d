//! Admission when every backend is full: one bounded queue per data plane, served by priority
//! (the tier's: enterprise 40 > premium 30 > basic 20 > free 10), then by arrival.
//!
//! Each backend has a cap on requests in flight (kept by the caller with its other counters).
//! A request that finds every candidate at its cap joins the queue and sleeps; when a request
//! finishes anywhere, the caller calls [`Admission::notify_one`], which wakes the best waiter to
//! pick again. A waiter that finds nothing free after all (a newcomer took the slot) waits again
//! at its original place: it keeps its ticket, so later arrivals of its priority stay behind it.
//!
//! One queue for the data plane rather than one per backend: a waiter takes whichever backend
//! frees first, and priorities hold across the whole pool. The cost is a re-pick per wake-up,
//! which is what a pick is for.
//!
//! Shedding is immediate when the queue is full (capacity 0 means no waiting at all), and a
//! waiter that outlives the queue timeout is shed by the caller, who wraps [`Waiter::wait`] in
//! `tokio::time::timeout`: no clock is read here. Nothing leaks: a [`Waiter`] dropped in any
//! state (timed out, client gone) leaves the queue, and one dropped holding a wake-up it never
//! saw passes it on, so freed capacity never goes unclaimed while others wait.
//!
//! The caller's loop, which also closes the race between a failed pick and joining (capacity
//! freed in between would wake nobody): join, then pick once more before sleeping.
//!
//! ```ignore
//! let mut waiter = None;
//! let backend = loop {
//!     if let Some(b) = pick_with_capacity() {
//!         break b;
//!     }
//!     match waiter.as_mut() {
//!         None => waiter = Some(admission.join(priority)?), // Shed::QueueFull
//!         Some(w) => timeout_at(deadline, w.wait()).await.map_err(|_| Shed::Timeout)?,
//!     }
//! };
//! drop(waiter); // leaves the queue
//! ```
//!
//! [`Admission::wait`] is the one-call form (join, sleep, leave) for a caller that loops on its
//! own; it gives up the kept place on a second wait and closes the race with a remembered
//! wake-up instead.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Why a request was not admitted; the caller answers 503 with Retry-After.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    QueueFull,
    Timeout,
}

/// A bounded queue ordered by priority (higher first), then by ticket (earlier first). Pure:
/// no locking, no waking.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    entries: BTreeMap<(Reverse<u32>, u64), T>,
    /// Ticket → priority, to find an entry's key for [`PriorityQueue::remove`].
    priorities: HashMap<u64, u32>,
    next_ticket: u64,
    capacity: usize,
}

impl<T> PriorityQueue<T> {
    pub fn new(capacity: usize) -> Self {
        PriorityQueue {
            entries: BTreeMap::new(),
            priorities: HashMap::new(),
            next_ticket: 0,
            capacity,
        }
    }

    /// Adds an item behind every earlier one of its priority; returns its ticket, or the item
    /// back when the queue is full (always, at capacity 0).
    pub fn push(&mut self, priority: u32, item: T) -> Result<u64, T> {
        if self.entries.len() >= self.capacity {
            return Err(item);
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.insert(ticket, priority, item);
        Ok(ticket)
    }

    /// Puts an item back under a ticket this queue issued before and that is no longer in it,
    /// at that ticket's original place. Not bounded: it is for an entry that left the queue
    /// while still counted elsewhere against the bound (see [`Admission`]).
    pub fn reinsert(&mut self, ticket: u64, priority: u32, item: T) {
        debug_assert!(ticket < self.next_ticket && !self.priorities.contains_key(&ticket));
        self.insert(ticket, priority, item);
    }

    fn insert(&mut self, ticket: u64, priority: u32, item: T) {
        self.entries.insert((Reverse(priority), ticket), item);
        self.priorities.insert(ticket, priority);
    }

    /// Removes the highest-priority, earliest item.
    pub fn pop(&mut self) -> Option<(u32, T)> {
        let ((Reverse(priority), ticket), item) = self.entries.pop_first()?;
        self.priorities.remove(&ticket);
        Some((priority, item))
    }

    pub fn remove(&mut self, ticket: u64) -> Option<T> {
        let priority = self.priorities.remove(&ticket)?;
        self.entries.remove(&(Reverse(priority), ticket))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(any(test, feature = "internals"))]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A smaller capacity evicts nobody: items already queued keep their place and the bound
    /// applies to new pushes.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }
}

#[derive(Debug)]
struct Inner {
    queue: PriorityQueue<oneshot::Sender<()>>,
    /// Waiters woken and not yet back in the queue or gone. They still count against the
    /// bound, so a woken waiter that must wait again always finds its place free.
    woken: usize,
    /// A wake-up found nobody queued. [`Admission::wait`] takes it and returns at once, which
    /// closes the gap between its caller's failed pick and its joining the queue.
    unclaimed: bool,
}

impl Inner {
    fn wake_one(&mut self) {
        while let Some((_, tx)) = self.queue.pop() {
            self.woken += 1;
            if tx.send(()).is_ok() {
                return;
            }
            // Unreachable while a waiter removes its entry before dropping its receiver, but
            // a wake-up must never be spent on nobody.
            self.woken -= 1;
        }
        self.unclaimed = true;
    }
}

/// The data plane's waiting queue, shared by its worker threads.
#[derive(Debug)]
pub struct Admission {
    inner: Mutex<Inner>,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        Admission {
            inner: Mutex::new(Inner {
                queue: PriorityQueue::new(capacity),
                woken: 0,
                unclaimed: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent at every unlock, so a panic elsewhere does not taint it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new snapshot's capacity. Waiters already queued keep their place when it shrinks.
    pub fn set_capacity(&self, capacity: usize) {
        self.lock().queue.set_capacity(capacity);
    }

    /// Joins the queue at `priority`, or sheds at once with [`Shed::QueueFull`].
    pub fn join(&self, priority: u32) -> Result<Waiter<'_>, Shed> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if inner.queue.len() + inner.woken >= inner.queue.capacity() {
            return Err(Shed::QueueFull);
        }
        let ticket = inner
            .queue
            .push(priority, tx)
            .map_err(|_| Shed::QueueFull)?;
        Ok(Waiter {
            admission: self,
            ticket,
            priority,
            rx: Some(rx),
        })
    }

    /// Joins, sleeps until woken, and leaves: the one-call form for a caller that picks again
    /// after each wake-up. Returns at once if capacity was freed while nobody was queued (the
    /// caller may have just missed it). Unlike a kept [`Waiter`], a second call joins behind
    /// later arrivals of the same priority. Dropped (a timeout), it leaves the queue.
    pub async fn wait(&self, priority: u32) -> Result<(), Shed> {
        let missed = std::mem::take(&mut self.lock().unclaimed);
        if missed {
            return Ok(());
        }
        self.join(priority)?.wait().await;
        Ok(())
    }

    /// Capacity was freed somewhere: wake the best waiter to pick again.
    pub fn notify_one(&self) {
        self.lock().wake_one();
    }

    /// Requests holding a place: those queued plus those woken and picking again. Never above
    /// the capacity, except after it was lowered with more waiting.
    pub fn depth(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + inner.woken
    }
}

/// A request's place in the queue, from [`Admission::join`] until dropped.
#[derive(Debug)]
pub struct Waiter<'a> {
    admission: &'a Admission,
    ticket: u64,
    priority: u32,
    /// `Some` while queued or woken without the caller having seen it; `None` once
    /// [`Waiter::wait`] returned and until it is called again.
    rx: Option<oneshot::Receiver<()>>,
}

impl Waiter<'_> {
    /// Sleeps until woken. Called again after a pick found nothing, it goes back to its
    /// original place first. Cancel-safe: dropped before returning (a timeout), a wake-up that
    /// arrived meanwhile is kept for the next call or passed on when the waiter is dropped.
    pub async fn wait(&mut self) {
        let rx = match &mut self.rx {
            Some(rx) => rx,
            None => {
                let (tx, rx) = oneshot::channel();
                let mut inner = self.admission.lock();
                inner.woken -= 1;
                inner.queue.reinsert(self.ticket, self.priority, tx);
                self.rx.insert(rx)
            }
        };
        // The sender only goes away by sending; treat anything else as a wake-up all the same,
        // so a caller is never left asleep.
        let _ = rx.await;
        self.rx = None;
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        if inner.queue.remove(self.ticket).is_some() {
            return;
        }
        inner.woken -= 1;
        // Woken but the caller never saw it: the freed capacity is still unclaimed, so the
        // next waiter gets the wake-up. At worst that one finds nothing and waits again.
        if self.rx.is_some() {
            inner.wake_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn queue_orders_by_priority_then_arrival() {
        let mut q = PriorityQueue::new(10);
        for (p, name) in [
            (10, "free1"),
            (40, "ent1"),
            (20, "basic1"),
            (40, "ent2"),
            (10, "free2"),
            (30, "prem1"),
        ] {
            q.push(p, name).unwrap();
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [
                (40, "ent1"),
                (40, "ent2"),
                (30, "prem1"),
                (20, "basic1"),
                (10, "free1"),
                (10, "free2")
            ]
        );
    }

    #[test]
    fn queue_bound_remove_and_reinsert() {
        let mut q = PriorityQueue::new(2);
        let a = q.push(10, 'a').unwrap();
        let b = q.push(10, 'b').unwrap();
        assert_eq!(q.push(40, 'c'), Err('c'));
        assert_eq!(q.remove(a), Some('a'));
        assert_eq!(q.remove(a), None);
        q.push(10, 'd').unwrap();
        assert_eq!(q.pop(), Some((10, 'b')));
        // 'b' back under its ticket goes ahead of 'd', which came later.
        q.reinsert(b, 10, 'b');
        assert_eq!(q.pop(), Some((10, 'b')));
        assert_eq!(q.pop(), Some((10, 'd')));
        assert!(q.is_empty());

        let mut none = PriorityQueue::new(0);
        assert_eq!(none.push(40, ()), Err(()));
        none.set_capacity(1);
        assert!(none.push(40, ()).is_ok());
    }

    #[test]
    fn full_queue_sheds_at_once() {
        let adm = Admission::new(2);
        let _a = adm.join(10).unwrap();
        let _b = adm.join(10).unwrap();
        assert_eq!(adm.join(40).unwrap_err(), Shed::QueueFull);
        assert_eq!(adm.depth(), 2);
        assert_eq!(Admission::new(0).join(40).unwrap_err(), Shed::QueueFull);
    }

    #[test]
    fn dropped_waiters_leave_the_queue() {
        let adm = Admission::new(2);
        let a = adm.join(10).unwrap();
        let _b = adm.join(10).unwrap();
        drop(a);
        assert_eq!(adm.depth(), 1);
        assert!(adm.join(10).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_waiter_leaves_the_queue() {
        let adm = Admission::new(1);
        let mut w = adm.join(10).unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(5), w.wait()).await;
        assert!(waited.is_err());
        drop(w);
        assert_eq!(adm.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn woken_waiter_keeps_its_place() {
        let adm = Admission::new(3);
        let mut a = adm.join(20).unwrap();
        let mut b = adm.join(20).unwrap();
        adm.notify_one();
        a.wait().await;
        // a found nothing free; meanwhile c arrives. The bound still counts a.
        let _c = adm.join(20).unwrap();
        assert_eq!(adm.depth(), 3);
        assert_eq!(adm.join(20).unwrap_err(), Shed::QueueFull);
        // a waits again, back at its place, and the next wake-up is its, not b's or c's.
        let again = a.wait();
        tokio::pin!(again);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut again)
                .await
                .is_err()
        );
        adm.notify_one();
        tokio::time::timeout(Duration::from_secs(1), again)
            .await
            .expect("a woken");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), b.wait())
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unseen_wake_up_is_passed_on() {
        let adm = Admission::new(3);
        let a = adm.join(40).unwrap();
        let mut b = adm.join(10).unwrap();
        adm.notify_one();
        // a leaves (client gone) before seeing its wake-up: b gets it.
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), b.wait())
            .await
            .expect("b woken");
        drop(b);
        assert_eq!(adm.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_that_arrives_during_a_timeout_is_kept() {
        let adm = Admission::new(2);
        let mut a = adm.join(10).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(1), a.wait())
                .await
                .is_err()
        );
        adm.notify_one();
        tokio::time::timeout(Duration::from_millis(1), a.wait())
            .await
            .expect("kept");
    }

    /// A spike: every backend slot is taken, requests of every tier queue up, then slots free
    /// one by one. Each slot goes to the best waiter, and a newcomer that takes a slot first
    /// does not cost a woken waiter its place.
    #[tokio::test(start_paused = true)]
    async fn spike_serves_enterprise_first() {
        let adm = Arc::new(Admission::new(100));
        let free = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let take = |free: &AtomicUsize| {
            free.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let tiers = [10u32, 20, 30, 40];
        let mut tasks = Vec::new();
        for i in 0..40usize {
            let priority = tiers[i % 4];
            let (adm, free, served) = (adm.clone(), free.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let mut waiter = None;
                loop {
                    if take(&free) {
                        break;
                    }
                    match waiter.as_mut() {
                        None => waiter = Some(adm.join(priority).unwrap()),
                        Some(w) => w.wait().await,
                    }
                }
                drop(waiter);
                served.lock().unwrap().push((priority, i));
            }));
            // Arrivals spread out a little, as a spike does.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while adm.depth() < 40 {
            tokio::task::yield_now().await;
        }
        for round in 0..40 {
            if round == 5 {
                // A newcomer grabs the freed slot before the woken waiter runs.
                free.fetch_add(1, Ordering::SeqCst);
                adm.notify_one();
                assert!(take(&free));
                tokio::time::sleep(Duration::from_millis(1)).await;
                assert_eq!(served.lock().unwrap().len(), 5);
            }
            free.fetch_add(1, Ordering::SeqCst);
            adm.notify_one();
            while served.lock().unwrap().len() <= round {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let served = served.lock().unwrap().clone();
        let priorities: Vec<u32> = served.iter().map(|&(p, _)| p).collect();
        let mut want = priorities.clone();
        want.sort_by_key(|&p| Reverse(p));
        assert_eq!(priorities, want);
        // Within a tier, arrival order.
        for tier in tiers {
            let ids: Vec<usize> = served
                .iter()
                .filter(|&&(p, _)| p == tier)
                .map(|&(_, i)| i)
                .collect();
            assert!(ids.is_sorted(), "{tier}: {ids:?}");
        }
        assert_eq!(adm.depth(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Pop,
        Remove(usize),
    }

    proptest! {
        #[test]
        fn queue_matches_a_sorted_list(ops in proptest::collection::vec(prop_oneof![
            3 => (0u32..4).prop_map(Op::Push),
            2 => Just(Op::Pop),
            1 => (0usize..64).prop_map(Op::Remove),
        ], 0..300), capacity in 0usize..20) {
            let mut q = PriorityQueue::new(capacity);
            // The reference: (priority, ticket) kept sorted by priority desc, ticket asc.
            let mut model: Vec<(u32, u64)> = Vec::new();
            let mut tickets: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(p) => match q.push(p, ()) {
                        Ok(t) => {
                            prop_assert!(model.len() < capacity);
                            model.push((p, t));
                            model.sort_by_key(|&(p, t)| (Reverse(p), t));
                            tickets.push(t);
                        }
                        Err(()) => prop_assert_eq!(model.len(), capacity),
                    },
                    Op::Pop => {
                        let want = (!model.is_empty()).then(|| model.remove(0).0);
                        prop_assert_eq!(q.pop().map(|(p, ())| p), want);
                    }
                    Op::Remove(k) => if let Some(&t) = tickets.get(k) {
                        let was = model.iter().position(|&(_, m)| m == t);
                        if let Some(i) = was { model.remove(i); }
                        prop_assert_eq!(q.remove(t).is_some(), was.is_some());
                    },
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert!(q.len() <= capacity);
            }
        }
    }
}
