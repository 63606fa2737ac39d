//! The in-process tier: a `moka` cache bounded in bytes (each record weighs its body, headers,
//! path and key), shared by every worker thread of a data plane.
//!
//! Moka applies inserts and evictions in batches; between two batches the records inserted
//! since the last one are resident but not yet counted. This tier counts those bytes itself
//! and runs the pending batch as soon as counted plus uncounted bytes would pass the bound, so
//! the tier holds at most its capacity plus the records being inserted at that very moment.
//!
//! Records leave on their own when their last stale window ends (per-record expiry); purges
//! by key or by path prefix use moka's invalidation predicates, which take effect at once for
//! reads and free memory on the next maintenance pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderMap;
use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use super::entry::{Entry, VarySpec};
use super::key::{self, CacheKey, Digest32};
use super::policy::State;

/// What one memory key holds.
#[derive(Debug, Clone)]
pub enum Stored {
    Entry(Arc<Entry>),
    Vary(Arc<VarySpec>),
}

#[derive(Debug)]
pub struct Slot {
    stored: Stored,
    primary: Digest32,
    weight: u32,
    ttl: Duration,
}

impl Slot {
    fn path(&self) -> &str {
        match &self.stored {
            Stored::Entry(e) => &e.path,
            Stored::Vary(v) => &v.path,
        }
    }
}

/// Fixed cost of a record besides its contents: the key, the slot and moka's bookkeeping.
const SLOT_OVERHEAD: u64 = 160;

struct ByExpiry;

impl Expiry<Digest32, Arc<Slot>> for ByExpiry {
    fn expire_after_create(&self, _: &Digest32, v: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Digest32,
        v: &Arc<Slot>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub hits: u64,
    pub misses: u64,
    /// Bytes held, by the weights above (counted and not yet counted by moka).
    pub bytes: u64,
    pub capacity: u64,
    pub entries: u64,
    /// Records removed to stay within the byte bound.
    pub evictions: u64,
}

pub struct MemoryTier {
    cache: Cache<Digest32, Arc<Slot>>,
    capacity: u64,
    /// Weight inserted since moka last applied its pending writes.
    unapplied: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

impl MemoryTier {
    pub fn new(capacity_bytes: u64) -> MemoryTier {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&evictions);
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &Digest32, s: &Arc<Slot>| s.weight)
            .expire_after(ByExpiry)
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryTier {
            cache,
            capacity: capacity_bytes,
            unapplied: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The record stored under one digest, whatever its state.
    pub async fn get(&self, id: &Digest32) -> Option<Stored> {
        self.cache.get(id).await.map(|s| s.stored.clone())
    }

    /// Looks a request up, following a vary spec. Returns the digest the request maps to (its
    /// variant's when the spec is known, else the primary one) and the entry, if one is held
    /// and either within its windows at `now_ms` or kept to be revalidated.
    pub async fn find(
        &self,
        key: &CacheKey,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> (Digest32, Option<Arc<Entry>>) {
        let primary = *key.primary();
        let (id, found) = match self.get(&primary).await {
            Some(Stored::Entry(e)) => (primary, Some(e)),
            Some(Stored::Vary(spec)) => {
                let v = key::variant(&primary, &spec.vary, headers);
                match self.get(&v).await {
                    Some(Stored::Entry(e)) => (v, Some(e)),
                    _ => (v, None),
                }
            }
            None => (primary, None),
        };
        // An entry past its windows is still found when it can be revalidated.
        let found = found.filter(|e| e.state(now_ms) != State::Expired || e.has_validator());
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (id, found)
    }

    /// Stores an entry under its variant digest and, when that differs from the primary one,
    /// the vary spec under the primary digest. Entries larger than the whole tier are skipped.
    pub async fn insert(
        &self,
        primary: &Digest32,
        variant: &Digest32,
        entry: Arc<Entry>,
        now_ms: u64,
    ) {
        let expires = entry.freshness.expires_at_ms();
        let ttl = Duration::from_millis(expires.saturating_sub(now_ms).max(1));
        if variant != primary {
            let spec = Arc::new(VarySpec {
                vary: entry.vary.clone(),
                path: entry.path.clone(),
            });
            let weight = SLOT_OVERHEAD
                + spec.path.len() as u64
                + spec
                    .vary
                    .iter()
                    .map(|n| n.as_str().len() as u64 + 32)
                    .sum::<u64>();
            self.put(*primary, Stored::Vary(spec), *primary, weight, ttl)
                .await;
        }
        let weight = SLOT_OVERHEAD + entry.weight();
        self.put(*variant, Stored::Entry(entry), *primary, weight, ttl)
            .await;
    }

    async fn put(
        &self,
        id: Digest32,
        stored: Stored,
        primary: Digest32,
        weight: u64,
        ttl: Duration,
    ) {
        if weight > self.capacity {
            return;
        }
        let weight32 = u32::try_from(weight).unwrap_or(u32::MAX);
        let slot = Arc::new(Slot {
            stored,
            primary,
            weight: weight32,
            ttl,
        });
        self.cache.insert(id, slot).await;
        let pending = self.unapplied.fetch_add(weight, Ordering::Relaxed) + weight;
        if self.cache.weighted_size() + pending > self.capacity {
            self.unapplied.store(0, Ordering::Relaxed);
            self.cache.run_pending_tasks().await;
        }
    }

    /// Removes every record of one primary digest (its vary spec and all its variants).
    pub fn purge_key(&self, primary: &Digest32) {
        let p = *primary;
        self.invalidate_if(move |_, s| s.primary == p);
    }

    /// Removes what one resource holds, at once: its entry, or its vary spec and (through a
    /// purge closure, as variants cannot be listed) its variants.
    pub async fn invalidate(&self, primary: &Digest32) {
        if let Some(slot) = self.cache.remove(primary).await
            && matches!(slot.stored, Stored::Vary(_))
        {
            self.purge_key(primary);
        }
    }

    /// Removes every record whose path starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &str) {
        let prefix = prefix.to_owned();
        self.invalidate_if(move |_, s| s.path().starts_with(&prefix));
    }

    pub fn purge_all(&self) {
        self.cache.invalidate_all();
    }

    fn invalidate_if(&self, pred: impl Fn(&Digest32, &Arc<Slot>) -> bool + Send + Sync + 'static) {
        if let Err(e) = self.cache.invalidate_entries_if(pred) {
            // Only possible if the builder above lost support_invalidation_closures().
            tracing::error!(cause = %e, "cache purge failed; clearing the memory tier instead");
            self.cache.invalidate_all();
        }
    }

    /// Applies moka's pending writes, evictions and purges now.
    pub async fn run_pending_tasks(&self) {
        self.unapplied.store(0, Ordering::Relaxed);
        self.cache.run_pending_tasks().await;
    }

    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.cache.weighted_size() + self.unapplied.load(Ordering::Relaxed),
            capacity: self.capacity,
            entries: self.cache.entry_count(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Freshness;
    use bytes::Bytes;
    use http::header::{HeaderName, HeaderValue};
    use http::{Method, StatusCode, Uri};

    const NOW: u64 = 1_700_000_000_000;

    fn key(path: &str) -> CacheKey {
        CacheKey::new(&Method::GET, "h", &path.parse::<Uri>().unwrap(), &[]).unwrap()
    }

    fn entry(path: &str, body: usize, vary: Vec<HeaderName>) -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at_ms: NOW,
            initial_age_ms: 0,
            freshness: Freshness {
                fresh_until_ms: NOW + 60_000,
                stale_while_revalidate_until_ms: NOW + 60_000,
                stale_if_error_until_ms: NOW + 120_000,
                keep_until_ms: NOW + 120_000,
            },
            public: false,
            vary,
            path: path.to_owned(),
        })
    }

    #[tokio::test]
    async fn a_flood_of_distinct_keys_stays_within_the_byte_bound() {
        let capacity = 1 << 20;
        let tier = MemoryTier::new(capacity);
        let none = HeaderMap::new();
        for i in 0..10_000 {
            let k = key(&format!("/flood/{i}"));
            let e = entry(k.path(), 1000 + i % 3000, Vec::new());
            tier.insert(k.primary(), k.primary(), e, NOW).await;
            // Read some back, so moka's admission sees real popularity.
            if i % 7 == 0 {
                let _ = tier.find(&k, &none, NOW).await;
            }
            let s = tier.stats();
            assert!(s.bytes <= capacity, "{i}: {s:?}");
        }
        tier.run_pending_tasks().await;
        let s = tier.stats();
        assert!(s.bytes <= capacity, "{s:?}");
        let resident: u64 = tier.cache.iter().map(|(_, v)| u64::from(v.weight)).sum();
        assert!(resident <= capacity, "{resident}");
        assert!(s.evictions > 0, "{s:?}");
        assert!(s.entries > 100, "the tier keeps working: {s:?}");
    }

    #[tokio::test]
    async fn vary_specs_lead_to_the_matching_variant() {
        let tier = MemoryTier::new(1 << 20);
        let k = key("/v");
        let ae = HeaderName::from_static("accept-encoding");
        let mut gzip = HeaderMap::new();
        gzip.insert(&ae, HeaderValue::from_static("gzip"));
        let br = {
            let mut h = HeaderMap::new();
            h.insert(&ae, HeaderValue::from_static("br"));
            h
        };
        let vg = key::variant(k.primary(), std::slice::from_ref(&ae), &gzip);
        tier.insert(k.primary(), &vg, entry("/v", 10, vec![ae.clone()]), NOW)
            .await;
        let (id, e) = tier.find(&k, &gzip, NOW).await;
        assert_eq!(id, vg);
        assert!(e.is_some());
        let (id, e) = tier.find(&k, &br, NOW).await;
        assert_ne!(id, vg);
        assert_ne!(id, *k.primary());
        assert!(e.is_none());
        // Expired entries are not returned.
        assert!(tier.find(&k, &gzip, NOW + 120_000).await.1.is_none());
        let s = tier.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
    }

    #[tokio::test]
    async fn purges_by_key_prefix_and_all() {
        let tier = MemoryTier::new(1 << 20);
        let none = HeaderMap::new();
        let paths = ["/api/a", "/api/b", "/static/c", "/apix"];
        for p in paths {
            let k = key(p);
            tier.insert(k.primary(), k.primary(), entry(p, 10, Vec::new()), NOW)
                .await;
        }
        let present = |p: &'static str| {
            let tier = &tier;
            let none = &none;
            async move { tier.find(&key(p), none, NOW).await.1.is_some() }
        };
        tier.purge_prefix("/api/");
        assert!(!present("/api/a").await && !present("/api/b").await);
        assert!(present("/static/c").await && present("/apix").await);
        tier.purge_key(key("/static/c").primary());
        assert!(!present("/static/c").await && present("/apix").await);
        // Entries stored after a purge are not affected by it.
        tier.run_pending_tasks().await;
        let k = key("/api/a");
        tier.insert(
            k.primary(),
            k.primary(),
            entry("/api/a", 10, Vec::new()),
            NOW + 1,
        )
        .await;
        tier.run_pending_tasks().await;
        assert!(present("/api/a").await);
        tier.purge_all();
        assert!(!present("/api/a").await && !present("/apix").await);
    }
}
