//! Where the planes meet in Redis: the rate-limit state that data planes keep there and the
//! control plane reads (usage, bans) and deletes (lifted bans). Both planes name the keys
//! through these functions, so the layout is written once.
//!
//! A client's identity is `key:<key id>` or `ip:<address>`. Its keys carry the identity as a
//! Redis Cluster hash tag, so one client's keys share a slot and a data plane's script can touch
//! them together:
//!
//! - `lb:rl:{<identity>}:gcra`: a string `"<tat> <t>"`, the theoretical arrival time (unix ms)
//!   and the emission interval in ms it was computed with, both decimal numbers, with a TTL.
//! - `lb:rl:{<identity>}:ban`: a string `"<until> <count>"`, the end of the ban (unix ms) and
//!   the bans so far, with a TTL that outlasts the ban by the strike decay period.
//! - `lb:rl:{<identity>}:strikes`: recent rejections, an integer with a TTL.
//!
//! Plain strings rather than hashes: the script reads every state of a batch with one `MGET`
//! and writes each with one `SET ... PX`.

use std::net::IpAddr;

/// Glob matching every ban key (braces are literal in Redis globs).
pub const BAN_KEY_PATTERN: &str = "lb:rl:{*}:ban";

/// The identity of an API key, by its id.
pub fn key_identity(key_id: &str) -> String {
    format!("key:{key_id}")
}

/// The identity of a client address: `ip:` and the address as `Display` writes it (so one
/// address has one form), IPv4 written digit by digit (a data plane names every IP-limited
/// request's client so).
pub fn ip_identity(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return format!("ip:{ip}");
    };
    let mut s = String::with_capacity(18);
    s.push_str("ip:");
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

pub fn gcra_key(identity: &str) -> String {
    format!("lb:rl:{{{identity}}}:gcra")
}

pub fn ban_key(identity: &str) -> String {
    format!("lb:rl:{{{identity}}}:ban")
}

pub fn strikes_key(identity: &str) -> String {
    format!("lb:rl:{{{identity}}}:strikes")
}

/// The identity in a ban key, if it is one.
pub fn identity_of_ban_key(key: &str) -> Option<&str> {
    key.strip_prefix("lb:rl:{")?.strip_suffix("}:ban")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_carry_the_identity_as_hash_tag() {
        assert_eq!(key_identity("ab"), "key:ab");
        assert_eq!(ip_identity("::1".parse().unwrap()), "ip:::1");
        assert_eq!(gcra_key("key:ab"), "lb:rl:{key:ab}:gcra");
        assert_eq!(ban_key("ip:::1"), "lb:rl:{ip:::1}:ban");
        assert_eq!(strikes_key("ip:1.2.3.4"), "lb:rl:{ip:1.2.3.4}:strikes");
        assert_eq!(identity_of_ban_key("lb:rl:{ip:::1}:ban"), Some("ip:::1"));
        assert_eq!(identity_of_ban_key("lb:rl:{ip:::1}:gcra"), None);
    }

    #[test]
    fn ip_identities_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.0.2.9",
            "100.99.10.9",
            "::1",
            "2001:db8::7",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_identity(ip), format!("ip:{ip}"));
        }
    }
}
