//! Tests of [`super`]: flags over variables over the file over defaults, and what is refused.

use super::*;
use clap::Parser;

#[test]
fn flag_beats_file_beats_default() {
    let dir = std::env::temp_dir().join(format!("dp-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dp.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1000\"\nadmin_listen = \"127.0.0.1:1001\"\n",
    )
    .unwrap();
    let args = Args::parse_from([
        "data-plane",
        "--config",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:2000",
    ]);
    let s = Settings::load(args).unwrap();
    assert_eq!(s.listen.port(), 2000);
    assert_eq!(s.admin_listen.port(), 1001);
    assert_eq!(s.control_plane, "http://127.0.0.1:50051");
}

#[test]
fn variables_set_what_flags_set_and_flags_win() {
    let env = [
        ("LB_LISTEN", "127.0.0.1:3000"),
        ("LB_ADMIN_LISTEN", "127.0.0.1:3001"),
        ("LB_REDIS_URL", "redis://127.0.0.1:6390"),
        ("LB_ALLOWED_BACKENDS", "10.0.0.0/8, 192.168.1.7"),
        ("LB_HEADER_TIMEOUT_MS", "2.5s"),
        ("LB_BACKEND_TLS", "false"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let args = Args::parse_from(["data-plane", "--listen", "127.0.0.1:4000"]);
    let s = Settings::load_with_env(args, env).unwrap();
    assert_eq!(s.listen.port(), 4000, "the flag wins");
    assert_eq!(s.admin_listen.port(), 3001);
    assert_eq!(s.redis.as_deref(), Some("redis://127.0.0.1:6390"));
    assert_eq!(s.allowed_backends.len(), 2);
    assert_eq!(s.header_timeout, std::time::Duration::from_millis(2_500));
    // Flags take durations with units too.
    let args = Args::parse_from(["data-plane", "--drain-timeout-ms", "1m"]);
    let s = Settings::load_with_env(args, []).unwrap();
    assert_eq!(s.drain_timeout, std::time::Duration::from_secs(60));
}

#[test]
fn bad_file_names_file_and_key() {
    let dir = std::env::temp_dir().join(format!("dp-settings-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "listen = 5\n").unwrap();
    let e = Settings::load(Args {
        config: Some(file.clone()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.toml") && e.contains("listen"), "{e}");
    std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let e = Settings::load(Args {
        config: Some(file),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("lisen"), "{e}");
}

#[test]
fn tls_needs_both_files() {
    let e = Settings::load(Args {
        tls_cert: Some("cert.pem".into()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls_key: missing"), "{e}");
    let e = Settings::load(Args {
        tls_key: Some("key.pem".into()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls_cert: missing"), "{e}");
    let e = Settings::load(Args {
        tls_cert: Some("/nonexistent/cert.pem".into()),
        tls_key: Some("/nonexistent/key.pem".into()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/cert.pem"), "{e}");
}

#[test]
fn control_plane_ca_needs_https_and_a_certificate() {
    let e = Settings::load(Args {
        control_plane_ca: Some("/nonexistent/ca.pem".into()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("control_plane_ca: is set, but"), "{e}");
    let e = Settings::load(Args {
        control_plane: Some("https://cp.example:50051".into()),
        control_plane_ca: Some("/nonexistent/ca.pem".into()),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("control_plane_ca /nonexistent/ca.pem: cannot read"),
        "{e}"
    );
    // No CA file: the system's roots.
    let s = Settings::load(Args {
        control_plane: Some("https://cp.example:50051".into()),
        ..Args::default()
    })
    .unwrap();
    assert_eq!(s.control_plane_ca, None);
}

#[test]
fn cpu_affinity_is_auto_or_off() {
    let mode = |m: Option<&str>| {
        Settings::load(Args {
            cpu_affinity: m.map(str::to_owned),
            ..Args::default()
        })
    };
    assert!(!mode(None).unwrap().pin_workers);
    assert!(mode(Some("auto")).unwrap().pin_workers);
    assert!(!mode(Some("off")).unwrap().pin_workers);
    let e = mode(Some("on")).unwrap_err().to_string();
    assert!(e.contains("cpu_affinity") && e.contains("auto, off"), "{e}");
}

#[test]
fn bad_cidr_is_named() {
    let e = Settings::load(Args {
        allowed_backends: Some(vec!["10.0.0.0/99".into()]),
        ..Args::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("allowed_backends"), "{e}");
}

#[test]
fn the_shipped_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config/data-plane.toml");
    let s = Settings::load(Args {
        config: Some(path),
        ..Args::default()
    })
    .unwrap();
    assert_eq!(s.admin_listen.port(), 9901);
    assert!(s.state_dir.is_some());
}
