//! API keys: the registry the control plane keeps, and the operations on it that gRPC and REST
//! share.
//!
//! Only a key's SHA-256 is stored; the key itself exists once, in the answer to `CreateApiKey`.
//! The registry is the source of truth and `ConfigSnapshot.keys` is derived from it on every
//! change: every registered key travels to data planes (its hash, its tier when not the default,
//! its block; about 85 bytes a key), so they can tell a created key from an invented one. A data
//! plane limits a key it does not find there by the default tier and by its client address as
//! well (or refuses it, when unknown keys are refused), so inventing keys never multiplies a
//! client's quota; naming such a key in `SetKeyTier`, `BlockKey` or `UnblockKey` registers it.

use std::collections::{BTreeMap, HashSet};

use lb_proto::v1::{
    ApiKeyRecord, ConfigSnapshot, KeyOverride, KeyRef, Tier, UnknownKeyPolicy, key_ref,
};
use lb_proto::validate::Invalid;
use sha2::{Digest, Sha256};

/// Why a key cannot be found or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
}

/// Prefix of generated keys, so a leaked one is recognisable in logs and by secret scanners.
pub const KEY_PREFIX: &str = "lbk_";

/// Random bytes in a generated key: 160 bits, beyond any guessing over the network.
const KEY_RANDOM_BYTES: usize = 20;

/// Longest key accepted; bounds what one client header makes us hash and store.
pub const MAX_KEY_BYTES: usize = 256;

/// Hex digits of the SHA-256 that make a key id: 64 bits, enough that ids do not collide among
/// the keys one cluster has (and a collision is detected, see [`KeyRegistry::find_id`]).
pub const KEY_ID_LEN: usize = 16;

/// Longest operator label; labels travel in every saved state.
const MAX_LABEL_BYTES: usize = 256;

/// Lower-case hex SHA-256 of a key, as stored and as data planes match it.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The id shown for a key: the first [`KEY_ID_LEN`] hex digits of its hash.
pub fn key_id(key_hash: &str) -> String {
    key_hash.chars().take(KEY_ID_LEN).collect()
}

/// 1 to 256 bytes of visible ASCII (0x21 to 0x7e): what fits in a header, a query parameter and a
/// log line without escaping.
pub fn validate_key(key: &str) -> Result<(), Invalid> {
    const RULE: &str = "must be 1 to 256 bytes of visible ASCII (0x21 to 0x7e)";
    if key.is_empty() {
        return Err(Invalid::new("api_key", format_args!("{RULE}; it is empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Invalid::new(
            "api_key",
            format_args!("{RULE}; it has {} bytes", key.len()),
        ));
    }
    if let Some(pos) = key.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(Invalid::new(
            "api_key",
            format_args!("{RULE}; byte {pos} is not"),
        ));
    }
    Ok(())
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn validate_key_id(id: &str) -> Result<(), Invalid> {
    if id.len() == KEY_ID_LEN && is_lower_hex(id) {
        Ok(())
    } else {
        Err(Invalid::new(
            "key_id",
            format_args!("{id:?} is not {KEY_ID_LEN} lower-case hex digits"),
        ))
    }
}

/// A new key: [`KEY_PREFIX`] and 40 lower-case hex digits, 160 bits from the operating
/// system's CSPRNG. There is no weaker fallback: without it, no key is made.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{KEY_PREFIX}{}", hex(&bytes)))
}

/// Which key a call is about, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTarget {
    /// The key itself was given: it may or may not be registered.
    Key { hash: String },
    /// Only its id: it must be registered.
    Id(String),
}

impl KeyTarget {
    pub fn from_key(api_key: &str) -> Result<KeyTarget, Invalid> {
        validate_key(api_key)?;
        Ok(KeyTarget::Key {
            hash: hash_key(api_key),
        })
    }

    pub fn from_ref(r: Option<&KeyRef>) -> Result<KeyTarget, Invalid> {
        match r.and_then(|r| r.key.as_ref()) {
            Some(key_ref::Key::ApiKey(k)) => KeyTarget::from_key(k),
            Some(key_ref::Key::KeyId(id)) => {
                validate_key_id(id)?;
                Ok(KeyTarget::Id(id.clone()))
            }
            None => Err(Invalid::new("key", "missing: give api_key or key_id")),
        }
    }
}

/// Every registered key, by hash.
#[derive(Debug, Clone, Default)]
pub struct KeyRegistry {
    by_hash: BTreeMap<String, ApiKeyRecord>,
}

impl KeyRegistry {
    /// Rebuilds the registry from stored records, refusing malformed ones (the state would not
    /// match what data planes are told otherwise). Ids are recomputed from the hashes.
    pub fn from_records(records: Vec<ApiKeyRecord>) -> Result<KeyRegistry, Invalid> {
        let mut by_hash = BTreeMap::new();
        for mut r in records {
            if r.key_hash.len() != 64 || !is_lower_hex(&r.key_hash) {
                return Err(Invalid::new(
                    "keys.key_hash",
                    format_args!("{:?} is not a lower-case hex SHA-256", r.key_hash),
                ));
            }
            r.key_id = key_id(&r.key_hash);
            let hash = r.key_hash.clone();
            if by_hash.insert(hash.clone(), r).is_some() {
                return Err(Invalid::new(
                    "keys.key_hash",
                    format_args!("{hash} is registered twice"),
                ));
            }
        }
        Ok(KeyRegistry { by_hash })
    }

    pub fn to_records(&self) -> Vec<ApiKeyRecord> {
        self.by_hash.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn records(&self) -> impl Iterator<Item = &ApiKeyRecord> {
        self.by_hash.values()
    }

    pub fn get(&self, key_hash: &str) -> Option<&ApiKeyRecord> {
        self.by_hash.get(key_hash)
    }

    /// The record whose id is `id`. Two keys sharing an id (a 64-bit prefix) is an error asking
    /// for the key itself rather than a guess.
    pub fn find_id(&self, id: &str) -> Result<Option<&ApiKeyRecord>, Invalid> {
        let mut matches = self
            .by_hash
            .range(id.to_owned()..)
            .take_while(|(h, _)| h.starts_with(id))
            .map(|(_, r)| r);
        let first = matches.next();
        if first.is_some() && matches.next().is_some() {
            return Err(Invalid::new(
                "key_id",
                format_args!("{id} names more than one key; give the key itself"),
            ));
        }
        Ok(first)
    }

    /// The hash of the key `target` names: the key's own, or that of the one record whose id
    /// starts with the id given (NotFound for an id nobody has).
    fn hash_of(&self, target: &KeyTarget) -> Result<String, KeyError> {
        Ok(match target {
            KeyTarget::Key { hash } => hash.clone(),
            KeyTarget::Id(id) => self
                .find_id(id)?
                .map(|r| r.key_hash.clone())
                .ok_or_else(|| KeyError::NotFound(format!("no API key with id {id}")))?,
        })
    }

    /// The record `target` names: registered on the spot when the key itself is given, NotFound
    /// for an id nobody has.
    pub fn resolve_mut(
        &mut self,
        target: &KeyTarget,
        now_ms: u64,
    ) -> Result<&mut ApiKeyRecord, KeyError> {
        let hash = self.hash_of(target)?;
        Ok(self
            .by_hash
            .entry(hash.clone())
            .or_insert_with(|| ApiKeyRecord {
                key_id: key_id(&hash),
                key_hash: hash,
                tier: String::new(),
                blocked: false,
                label: String::new(),
                created_at_ms: now_ms,
            }))
    }

    /// The record `target` names, NotFound when nobody registered it.
    pub fn find_mut(&mut self, target: &KeyTarget) -> Result<&mut ApiKeyRecord, KeyError> {
        let hash = self.hash_of(target)?;
        self.by_hash.get_mut(&hash).ok_or_else(|| {
            KeyError::NotFound(format!(
                "no API key with id {} (create keys with POST /admin/keys or CreateApiKey)",
                key_id(&hash)
            ))
        })
    }

    /// Adds a record; false when its hash is already registered.
    pub fn insert(&mut self, record: ApiKeyRecord) -> bool {
        match self.by_hash.entry(record.key_hash.clone()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(record);
                true
            }
        }
    }

    /// What data planes need: every registered key, so they can tell a created key (its own
    /// limit) from an invented one (which also counts against its address, or is refused), with
    /// its tier when not the default one and its block.
    pub fn overrides(&self, default_tier: &str) -> Vec<KeyOverride> {
        self.by_hash
            .values()
            .map(|r| {
                let tier = if r.tier == default_tier {
                    ""
                } else {
                    r.tier.as_str()
                };
                KeyOverride {
                    key_hash: r.key_hash.clone(),
                    tier: tier.to_owned(),
                    blocked: r.blocked,
                }
            })
            .collect()
    }

    /// Every key's tier exists in `config` (so a tier in use cannot be deleted).
    pub fn check_tiers(&self, config: &ConfigSnapshot) -> Result<(), Invalid> {
        let names: HashSet<&str> = config
            .rate_limit
            .iter()
            .flat_map(|rl| rl.tiers.iter().map(|t| t.name.as_str()))
            .collect();
        match self
            .by_hash
            .values()
            .find(|r| !r.tier.is_empty() && !names.contains(r.tier.as_str()))
        {
            Some(r) => Err(Invalid::new(
                "keys.tier",
                format_args!(
                    "API key {} uses tier {:?}, which is not configured",
                    r.key_id, r.tier
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A record built from a snapshot's override, for state saved before the registry existed.
pub fn record_from_override(o: &KeyOverride) -> ApiKeyRecord {
    ApiKeyRecord {
        key_id: key_id(&o.key_hash),
        key_hash: o.key_hash.clone(),
        tier: o.tier.clone(),
        blocked: o.blocked,
        label: String::new(),
        created_at_ms: 0,
    }
}

/// Whether `config` refuses API keys the control plane does not know.
pub fn rejects_unknown(config: &ConfigSnapshot) -> bool {
    config
        .rate_limit
        .as_ref()
        .is_some_and(|rl| rl.unknown_key == UnknownKeyPolicy::Reject as i32)
}

pub fn default_tier(config: &ConfigSnapshot) -> &str {
    config
        .rate_limit
        .as_ref()
        .map_or("", |rl| rl.default_tier.as_str())
}

pub(crate) fn find_tier<'a>(config: &'a ConfigSnapshot, name: &str) -> Option<&'a Tier> {
    config
        .rate_limit
        .as_ref()
        .and_then(|rl| rl.tiers.iter().find(|t| t.name == name))
}

/// A tier name a key may be given: empty (the default tier) or a configured tier.
pub(crate) fn check_tier(config: &ConfigSnapshot, name: &str) -> Result<(), Invalid> {
    if name.is_empty() || find_tier(config, name).is_some() {
        return Ok(());
    }
    let configured: Vec<&str> = config
        .rate_limit
        .iter()
        .flat_map(|rl| rl.tiers.iter().map(|t| t.name.as_str()))
        .collect();
    Err(Invalid::new(
        "tier",
        format_args!(
            "{name:?} is not a configured tier; configured: {}",
            configured.join(", ")
        ),
    ))
}

pub(crate) fn check_label(label: &str) -> Result<(), Invalid> {
    if label.len() > MAX_LABEL_BYTES || label.chars().any(char::is_control) {
        return Err(Invalid::new(
            "label",
            format_args!("must be at most {MAX_LABEL_BYTES} bytes with no control characters"),
        ));
    }
    Ok(())
}

/// The tier name a record runs under now.
pub(crate) fn effective_tier<'a>(config: &'a ConfigSnapshot, tier: &'a str) -> &'a str {
    if tier.is_empty() {
        default_tier(config)
    } else {
        tier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        validate_key("k").unwrap();
        validate_key(&"a".repeat(256)).unwrap();
        validate_key("~!azAZ09").unwrap();
        for bad in ["", "a b", "tab\there", "new\nline", "é", "\u{7f}"] {
            let e = validate_key(bad).unwrap_err();
            assert_eq!(e.field, "api_key", "{bad:?}");
        }
        let e = validate_key(&"a".repeat(10 * 1024)).unwrap_err();
        assert!(e.message.contains("10240 bytes"), "{e}");
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate_key().unwrap();
        assert_eq!(k.len(), 44);
        assert!(k.starts_with("lbk_"));
        assert!(is_lower_hex(&k[4..]));
        assert_ne!(k, generate_key().unwrap());
    }

    #[test]
    fn hash_and_id() {
        let h = hash_key("abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key_id(&h), "ba7816bf8f01cfea");
        validate_key_id("ba7816bf8f01cfea").unwrap();
        assert!(validate_key_id("BA7816BF8F01CFEA").is_err());
        assert!(validate_key_id("ba7816").is_err());
    }

    #[test]
    fn every_key_travels_with_its_tier_only_when_not_the_default() {
        let mut reg = KeyRegistry::default();
        for (key, tier, blocked) in [
            ("free-implicit", "", false),
            ("free-explicit", "free", false),
            ("premium", "premium", false),
            ("blocked", "", true),
        ] {
            let t = KeyTarget::from_key(key).unwrap();
            let r = reg.resolve_mut(&t, 1).unwrap();
            r.tier = tier.into();
            r.blocked = blocked;
        }
        let o = reg.overrides("free");
        assert_eq!(o.len(), 4, "{o:?}");
        let of = |key: &str| o.iter().find(|k| k.key_hash == hash_key(key)).unwrap();
        assert_eq!(
            (
                of("free-implicit").tier.as_str(),
                of("free-implicit").blocked
            ),
            ("", false)
        );
        assert_eq!(
            (
                of("free-explicit").tier.as_str(),
                of("free-explicit").blocked
            ),
            ("", false)
        );
        assert_eq!(
            (of("premium").tier.as_str(), of("premium").blocked),
            ("premium", false)
        );
        assert_eq!(
            (of("blocked").tier.as_str(), of("blocked").blocked),
            ("", true)
        );
    }

    #[test]
    fn ids_resolve_and_unknown_ids_are_not_found() {
        let mut reg = KeyRegistry::default();
        let t = KeyTarget::from_key("some-key").unwrap();
        let id = reg.resolve_mut(&t, 1).unwrap().key_id.clone();
        assert_eq!(reg.find_id(&id).unwrap().unwrap().key_id, id);
        let e = reg
            .resolve_mut(&KeyTarget::Id("0000000000000000".into()), 1)
            .unwrap_err();
        assert!(matches!(e, KeyError::NotFound(_)), "{e}");
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn stored_records_are_checked() {
        let bad = ApiKeyRecord {
            key_hash: "XYZ".into(),
            ..Default::default()
        };
        assert!(KeyRegistry::from_records(vec![bad]).is_err());
        let good = ApiKeyRecord {
            key_hash: hash_key("a"),
            key_id: "wrong".into(),
            ..Default::default()
        };
        let reg = KeyRegistry::from_records(vec![good.clone()]).unwrap();
        assert_eq!(reg.records().next().unwrap().key_id, key_id(&good.key_hash));
        assert!(KeyRegistry::from_records(vec![good.clone(), good]).is_err());
    }
}
