//! The initial settings (`--strategy`, `--backends`, `--ip-limit`, or the same in the file) only
//! seed an empty store: once a state is stored, it wins, and changes go through the admin API.
//! [`overridden`] says, once per setting given, when the stored state replaces it.

use lb_proto::v1::ConfigSnapshot;

/// An initial setting that was given, and how it was given (`--strategy`, `strategy in the
/// config file`), for the warning that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Given {
    pub setting: Initial,
    pub named: &'static str,
}

/// The settings that seed an empty store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    Strategy,
    Backends,
    IpLimit,
}

impl Initial {
    /// The setting's value in `s`, as a flag takes it.
    fn show(self, s: &ConfigSnapshot) -> String {
        match self {
            Initial::Strategy => s.strategy.clone(),
            Initial::Backends => {
                let mut list: Vec<&str> = s.backends.iter().map(|b| b.address.as_str()).collect();
                list.sort_unstable();
                if list.is_empty() {
                    "none".to_owned()
                } else {
                    list.join(",")
                }
            }
            Initial::IpLimit => match s.rate_limit.as_ref().and_then(|r| r.ip_limit) {
                Some(l) if l.requests > 0 => {
                    format!("{}/{}", l.requests, l.period_ms as f64 / 1000.0)
                }
                _ => "0".to_owned(),
            },
        }
    }

    /// How to change it while running.
    fn changed_with(self) -> &'static str {
        match self {
            Initial::Strategy => "Admin/SetStrategy or POST /change_strategy",
            Initial::Backends => "Admin/AddBackend and Admin/RemoveBackend",
            Initial::IpLimit => "Admin/SetPolicy",
        }
    }
}

/// One warning per setting in `given` whose value in `initial` the running (stored) state
/// replaces, naming the setting, the value given and the value in force. None when the store
/// was empty: the running state is then the initial one.
pub fn overridden(
    given: &[Given],
    initial: &ConfigSnapshot,
    running: &ConfigSnapshot,
) -> Vec<String> {
    given
        .iter()
        .filter_map(|g| {
            let (wanted, stored) = (g.setting.show(initial), g.setting.show(running));
            (wanted != stored).then(|| {
                format!(
                    "{} {wanted} is not used: the stored state has {stored}, and a stored state \
                     wins over the initial settings; change it with {}",
                    g.named,
                    g.setting.changed_with()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proto::v1::{Backend, Limit, RateLimitPolicy};

    fn snapshot(strategy: &str, backends: &[&str], ip: u64) -> ConfigSnapshot {
        ConfigSnapshot {
            strategy: strategy.into(),
            backends: backends
                .iter()
                .map(|a| Backend {
                    address: (*a).into(),
                    weight: 1,
                    ..Default::default()
                })
                .collect(),
            rate_limit: Some(RateLimitPolicy {
                ip_limit: Some(Limit {
                    requests: ip,
                    period_ms: 60_000,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const ALL: [Given; 3] = [
        Given {
            setting: Initial::Strategy,
            named: "--strategy",
        },
        Given {
            setting: Initial::Backends,
            named: "--backends",
        },
        Given {
            setting: Initial::IpLimit,
            named: "ip_limit in the config file",
        },
    ];

    #[test]
    fn each_setting_the_stored_state_replaces_is_named_once() {
        let initial = snapshot("ip_hash", &["10.0.0.1:80", "10.0.0.2:80"], 10);
        let stored = snapshot("round_robin", &["10.0.0.2:80", "10.0.0.1:80"], 100);
        let w = overridden(&ALL, &initial, &stored);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("--strategy ip_hash is not used: the stored state has round_robin")
        );
        assert!(w[1].starts_with(
            "ip_limit in the config file 10/60 is not used: the stored state has 100/60"
        ));
    }

    #[test]
    fn nothing_is_said_when_the_store_was_empty_or_nothing_was_given() {
        let initial = snapshot("ip_hash", &["10.0.0.1:80"], 10);
        assert!(overridden(&ALL, &initial, &initial).is_empty());
        let stored = snapshot("round_robin", &[], 0);
        assert!(overridden(&[], &initial, &stored).is_empty());
    }
}
