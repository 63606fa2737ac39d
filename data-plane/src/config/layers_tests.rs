use serde::{Deserialize, Serialize};

use super::*;
use crate::scratch::Dir;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Top {
    listen: Option<String>,
    workers: Option<u32>,
    #[serde(default, deserialize_with = "lb_proto::duration::opt_millis")]
    drain_ms: Option<u64>,
    #[serde(default, deserialize_with = "comma_list::deserialize")]
    nets: Option<Vec<String>>,
    policy: Option<Policy>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct Policy {
    enabled: bool,
    #[serde(deserialize_with = "lb_proto::duration::millis")]
    interval_ms: u32,
    path: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: false,
            interval_ms: 10_000,
            path: "/health".into(),
        }
    }
}

fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn flags_beat_variables_beat_the_file() {
    let dir = Dir::new("layers-order");
    let file = dir.write(
        "s.toml",
        "listen = \"file\"\nworkers = 1\ndrain_ms = 5\nnets = [\"10.0.0.0/8\"]\n",
    );
    let env = vars(&[("LB_WORKERS", "2"), ("LB_DRAIN_MS", "3s")]);
    let flags = Top {
        drain_ms: Some(7),
        ..Top::default()
    };
    let t: Top = layered(Some(&file), env, &flags).unwrap();
    assert_eq!(t.listen.as_deref(), Some("file"));
    assert_eq!(t.workers, Some(2), "the variable beats the file");
    assert_eq!(t.drain_ms, Some(7), "the flag beats the variable");
    assert_eq!(t.nets, Some(vec!["10.0.0.0/8".to_owned()]));
    // Nothing anywhere: every setting unset, for the binary's defaults.
    let t: Top = layered(None, Vec::new(), &Top::default()).unwrap();
    assert_eq!(t, Top::default());
}

#[test]
fn a_variable_changes_one_field_of_a_policy_the_file_sets() {
    let dir = Dir::new("layers-nested");
    for (name, text) in [
        ("p.toml", "[policy]\npath = \"/ready\"\ninterval_ms = \"2s\"\n"),
        ("p.yaml", "policy:\n  path: /ready\n  interval_ms: 2s\n"),
        ("p.json", "{\"policy\": {\"path\": \"/ready\", \"interval_ms\": 2000}}"),
    ] {
        let file = dir.write(name, text);
        let env = vars(&[("LB_POLICY__ENABLED", "true"), ("LB_NETS", "a, b,,c")]);
        let t: Top = layered(Some(&file), env, &Top::default()).unwrap();
        assert_eq!(
            t.policy,
            Some(Policy {
                enabled: true,
                interval_ms: 2_000,
                path: "/ready".into()
            }),
            "{name}"
        );
        assert_eq!(t.nets.unwrap(), ["a", "b", "c"]);
    }
    // Without the file, the variable alone sets the policy over its defaults.
    let env = vars(&[("LB_POLICY__INTERVAL_MS", "250ms")]);
    let t: Top = layered(None, env, &Top::default()).unwrap();
    assert_eq!(t.policy.unwrap().interval_ms, 250);
}

#[test]
fn variables_that_name_no_setting_are_left_alone() {
    let env = vars(&[
        ("LB_SERVICE_HOST", "10.96.0.10"),
        ("LB_PORT", "tcp://10.96.0.10:80"),
        ("LB_MOCK_PORTS", "1,2"),
        ("HOME", "/root"),
        ("LB_WORKERS", ""),
    ]);
    let t: Top = layered(None, env, &Top::default()).unwrap();
    assert_eq!(t, Top::default());
}

#[test]
fn a_bad_variable_is_named() {
    let cases = [
        (("LB_POLICY__ENABLD", "true"), "enabld"),
        (("LB_POLICY__INTERVAL_MS", "soon"), "is not a duration"),
        (("LB_WORKERS", "many"), "workers"),
    ];
    for ((name, value), what) in cases {
        let env = vars(&[(name, value), ("LB_LISTEN", "x")]);
        let e = layered::<Top, _>(None, env, &Top::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains(what), "{name}: {e}");
        assert!(!e.contains("LB_LISTEN"), "only the bad variable is named: {e}");
    }
}

#[test]
fn a_bad_file_is_named_with_the_line_and_key() {
    let dir = Dir::new("layers-bad");
    for (name, text, line) in [
        ("b.toml", "listen = \"a\"\n[policy]\nintervl_ms = 5\n", "line 3"),
        ("b.yaml", "listen: a\npolicy:\n  intervl_ms: 5\n", "line 3"),
        ("b.json", "{\"listen\": \"a\",\n \"policy\": {\"intervl_ms\": 5}}", "line 2"),
    ] {
        let file = dir.write(name, text);
        let e = layered::<Top, _>(Some(&file), Vec::new(), &Top::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && e.contains("intervl_ms") && e.contains(line),
            "{name}: {e}"
        );
    }
    let file = dir.write("b.ini", "listen = a\n");
    let e = layered::<Top, _>(Some(&file), Vec::new(), &Top::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.ini") && e.contains(".yaml"), "{e}");
}
