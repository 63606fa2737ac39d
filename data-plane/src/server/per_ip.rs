//! A cap on the connections one client address may hold open at once (`--max-connections-per-ip`),
//! for a data plane that clients reach directly: one address opening thousands of idle
//! connections (slowloris) then costs its own connections, not everyone's. Off by default: behind
//! a load balancer every client shares the balancer's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections by client address.
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its address's count goes down when it is dropped.
pub struct PerIpGuard {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// `None` for a limit of 0 (no cap).
    pub fn new(limit: usize) -> Option<Arc<PerIp>> {
        (limit > 0).then(|| {
            Arc::new(PerIp {
                limit,
                open: Mutex::default(),
            })
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `ip`, unless that address already holds its limit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpGuard> {
        let mut open = self.open();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// Connections open from `ip`.
    #[cfg(test)]
    pub fn count(&self, ip: IpAddr) -> usize {
        self.open().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut open = self.owner.open();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_holds_up_to_its_limit_and_gets_its_room_back() {
        assert!(PerIp::new(0).is_none(), "0 is no cap");
        let caps = PerIp::new(2).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = caps.admit(a).unwrap();
        let _second = caps.admit(a).unwrap();
        assert!(caps.admit(a).is_none(), "a third from the same address");
        let _other = caps.admit(b).expect("another address has its own room");
        drop(first);
        assert_eq!(caps.count(a), 1);
        let _again = caps.admit(a).expect("room again once one closed");
        assert_eq!(caps.count(a), 2);
    }
}
