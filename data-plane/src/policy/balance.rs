//! Backend selection. Pure policy: a [`Balancer`] is built from the strategy name and the
//! backends' weights, and picks among the candidates a [`Candidates`] view offers, reading the
//! live counters (in flight, latency) through that view. No I/O and no clock here: the proxy
//! hands in what a pick needs, and rebuilds the balancer when a snapshot changes the backend set.
//!
//! Every pick skips backends the view marks unusable (draining, and later unhealthy, ejected or
//! open-circuit ones) and returns `None` when none is left.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a pick may read about backend `i`.
pub trait Candidates {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn usable(&self, i: usize) -> bool;
    fn in_flight(&self, i: usize) -> u32;
    /// Smoothed latency in microseconds; 0 when nothing is known yet.
    fn latency_us(&self, i: usize) -> u64;
    /// Recent failure share, 0.0 to 1.0.
    fn failure_rate(&self, _i: usize) -> f64 {
        0.0
    }
    /// Slow start: below 1.0 while a backend that just came back ramps up.
    fn warmth(&self, _i: usize) -> f64 {
        1.0
    }
    /// Which lane of the balancer's own state this pick uses (the worker thread): each thread
    /// turns its own counters, so picks never contend for one cache line.
    fn lane(&self) -> usize {
        0
    }
}

/// Lanes of per-thread balancer state; threads beyond share lanes.
const LANES: usize = 16;

/// A counter alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Lane<T>(T);

/// One rotating counter per lane.
#[derive(Debug)]
pub struct Counters(Box<[Lane<AtomicUsize>]>);

impl Counters {
    fn new() -> Counters {
        Counters((0..LANES).map(|_| Lane(AtomicUsize::new(0))).collect())
    }

    fn next(&self, c: &impl Candidates) -> usize {
        self.0[c.lane() % LANES].0.fetch_add(1, Ordering::Relaxed)
    }
}

/// The latency-driven strategies send one pick in this many to the next backend in turn, so a
/// backend judged slow keeps being measured and wins its share back when it recovers.
const EXPLORE_EVERY: usize = 16;

/// Latencies this close (plus a quarter of the fastest) count as equal for least_response_time.
const LATENCY_TIE_US: u64 = 200;

fn explore(c: &impl Candidates, tick: usize) -> Option<usize> {
    if !tick.is_multiple_of(EXPLORE_EVERY) {
        return None;
    }
    let n = c.len();
    let start = tick / EXPLORE_EVERY;
    (0..n).map(|k| (start + k) % n).find(|&i| c.usable(i))
}

/// A strategy, ready to pick.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(Counters),
    LeastConnections(Counters),
    WeightedRoundRobin(SmoothWeighted),
    IpHash(Vec<u64>),
    LeastResponseTime(Counters),
    Adaptive(Counters),
}

impl Balancer {
    /// `strategy` is one of [`lb_proto::validate::STRATEGIES`] (validated before); `ids` are the
    /// backends' addresses, `weights` their weights, in the same order.
    pub fn build(strategy: &str, ids: &[&str], weights: &[u32]) -> Balancer {
        match strategy {
            "least_connections" => Balancer::LeastConnections(Counters::new()),
            "weighted_round_robin" => Balancer::WeightedRoundRobin(SmoothWeighted::new(weights)),
            "ip_hash" => Balancer::IpHash(ids.iter().map(|id| hash_bytes(id.as_bytes())).collect()),
            "least_response_time" => Balancer::LeastResponseTime(Counters::new()),
            "adaptive" => Balancer::Adaptive(Counters::new()),
            _ => Balancer::RoundRobin(Counters::new()),
        }
    }

    /// Picks a usable backend. `affinity` is the hash of what ip_hash hashes (the client IP).
    pub fn pick(&self, c: &impl Candidates, affinity: u64) -> Option<usize> {
        if c.is_empty() {
            return None;
        }
        let n = c.len();
        match self {
            Balancer::RoundRobin(next) => {
                let start = next.next(c);
                (0..n).map(|k| (start + k) % n).find(|&i| c.usable(i))
            }
            Balancer::LeastConnections(next) => {
                // Rotating the scan start breaks ties without a random draw per pick.
                let start = next.next(c);
                min_by_key(c, start, |i| u64::from(c.in_flight(i)))
            }
            Balancer::WeightedRoundRobin(w) => w.pick(c),
            Balancer::IpHash(ids) => (0..n)
                .filter(|&i| c.usable(i))
                .max_by_key(|&i| mix(ids[i] ^ affinity)),
            Balancer::LeastResponseTime(next) => {
                let start = next.next(c);
                if let Some(i) = explore(c, start) {
                    return Some(i);
                }
                // A backend with no measurement yet is tried first, so it is probed, not starved.
                // Backends within a tolerance of the fastest count as tied and take turns: a
                // few microseconds of noise must not send everything to one backend, and a
                // recovered backend rejoins the rotation as soon as it is about as fast.
                let fastest = min_by_key(c, start, |i| c.latency_us(i))?;
                let best = c.latency_us(fastest);
                let tolerance = best + best / 4 + LATENCY_TIE_US;
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| c.usable(i) && c.latency_us(i) <= tolerance)
                    .or(Some(fastest))
            }
            Balancer::Adaptive(next) => {
                let tick = next.next(c);
                if let Some(i) = explore(c, tick) {
                    return Some(i);
                }
                // Two random candidates (the next usable from two random starts), no allocation.
                let seed = mix(tick as u64);
                let first_usable = |start: usize, skip: Option<usize>| {
                    (0..n)
                        .map(|k| (start + k) % n)
                        .find(|&i| c.usable(i) && Some(i) != skip)
                };
                let a = first_usable((seed % n as u64) as usize, None)?;
                let Some(b) = first_usable(((seed >> 32) % n as u64) as usize, Some(a)) else {
                    return Some(a);
                };
                // Lower is better: load times latency, inflated by recent failures and by slow
                // start (a backend just back looks busier than it is).
                let score = |i: usize| {
                    (f64::from(c.in_flight(i)) + 1.0)
                        * c.latency_us(i).max(1) as f64
                        * (1.0 + 10.0 * c.failure_rate(i))
                        / c.warmth(i).max(0.1)
                };
                Some(if score(b) < score(a) { b } else { a })
            }
        }
    }
}

fn min_by_key(c: &impl Candidates, start: usize, key: impl Fn(usize) -> u64) -> Option<usize> {
    let n = c.len();
    (0..n)
        .map(|k| (start + k) % n)
        .filter(|&i| c.usable(i))
        .min_by_key(|&i| key(i))
}

/// Smooth weighted round robin (as in nginx): each pick adds every weight to its backend's
/// current value, takes the largest, and subtracts the total from it. Weights 5,1,1 give
/// a a b a c a a: the heavy backend is spread out, never a burst.
#[derive(Debug)]
pub struct SmoothWeighted {
    weights: Vec<i64>,
    /// Per lane: each thread runs its own sequence, so the spread holds per thread and overall.
    current: Box<[Lane<Mutex<Vec<i64>>>]>,
}

impl SmoothWeighted {
    pub fn new(weights: &[u32]) -> Self {
        SmoothWeighted {
            weights: weights.iter().map(|&w| i64::from(w.max(1))).collect(),
            current: (0..LANES)
                .map(|_| Lane(Mutex::new(vec![0; weights.len()])))
                .collect(),
        }
    }

    fn pick(&self, c: &impl Candidates) -> Option<usize> {
        let mut current = self.current[c.lane() % LANES]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut total = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.weights.len().min(c.len()) {
            if !c.usable(i) {
                continue;
            }
            current[i] += self.weights[i];
            total += self.weights[i];
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }
}

/// A stable 64-bit hash (FNV-1a then a finaliser): the same on every data plane and every
/// build, unlike the std hasher, so ip_hash agrees across the fleet.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser: spreads every input bit over the output.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct View {
        usable: Vec<bool>,
        in_flight: Vec<u32>,
        latency: Vec<u64>,
    }

    impl View {
        fn new(n: usize) -> View {
            View {
                usable: vec![true; n],
                in_flight: vec![0; n],
                latency: vec![0; n],
            }
        }
    }

    impl Candidates for View {
        fn len(&self) -> usize {
            self.usable.len()
        }
        fn usable(&self, i: usize) -> bool {
            self.usable[i]
        }
        fn in_flight(&self, i: usize) -> u32 {
            self.in_flight[i]
        }
        fn latency_us(&self, i: usize) -> u64 {
            self.latency[i]
        }
    }

    fn picks(b: &Balancer, v: &View, n: usize) -> Vec<usize> {
        (0..n).map(|_| b.pick(v, 0).unwrap()).collect()
    }

    #[test]
    fn round_robin_cycles_and_skips_unusable() {
        let b = Balancer::build("round_robin", &["a", "b", "c"], &[1, 1, 1]);
        let mut v = View::new(3);
        assert_eq!(picks(&b, &v, 6), [0, 1, 2, 0, 1, 2]);
        v.usable[1] = false;
        assert!(picks(&b, &v, 6).iter().all(|&i| i != 1));
        v.usable = vec![false; 3];
        assert_eq!(b.pick(&v, 0), None);
    }

    #[test]
    fn smooth_weighted_sequence() {
        let b = Balancer::build("weighted_round_robin", &["a", "b", "c"], &[5, 1, 1]);
        let v = View::new(3);
        assert_eq!(picks(&b, &v, 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_connections_prefers_idle() {
        let b = Balancer::build("least_connections", &["a", "b", "c"], &[1, 1, 1]);
        let mut v = View::new(3);
        v.in_flight = vec![3, 1, 2];
        assert_eq!(picks(&b, &v, 3), [1, 1, 1]);
    }

    #[test]
    fn ip_hash_is_sticky_per_client_and_spreads_clients() {
        let b = Balancer::build("ip_hash", &["a:1", "b:1", "c:1"], &[1, 1, 1]);
        let v = View::new(3);
        let mut used = [0usize; 3];
        for i in 0..100u8 {
            let key = hash_bytes(&[10, 0, 0, i]);
            let first = b.pick(&v, key).unwrap();
            assert!(
                (0..10).all(|_| b.pick(&v, key) == Some(first)),
                "client 10.0.0.{i} moved"
            );
            used[first] += 1;
        }
        // A hundred clients over three backends: each backend gets a share (hashing is not an
        // even split; here 43, 38 and 19).
        assert!(used.iter().all(|&n| n >= 15), "{used:?}");
    }

    #[test]
    fn every_strategy_picks_only_usable() {
        for s in lb_proto::validate::STRATEGIES {
            let b = Balancer::build(s, &["a", "b", "c"], &[1, 2, 3]);
            let mut v = View::new(3);
            v.usable[0] = false;
            v.usable[2] = false;
            for k in 0..20 {
                assert_eq!(b.pick(&v, k), Some(1), "{s}");
            }
        }
    }
}
