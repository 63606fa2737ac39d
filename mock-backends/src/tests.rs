//! Port parsing, fault merging and the helpers, without sockets.

use super::*;

#[test]
fn parse_ports_accepts_lists() {
    assert_eq!(parse_ports("5001,5002,5003"), Ok(vec![5001, 5002, 5003]));
    assert_eq!(parse_ports(" 80 , 65535 "), Ok(vec![80, 65535]));
}

#[test]
fn parse_ports_names_the_bad_item() {
    let cases = [
        ("", "item 1 is empty"),
        ("5001,,5002", "item 2 is empty"),
        ("5001,", "item 2 is empty"),
        ("5001,abc", "item 2 \"abc\" is not a port number"),
        ("70000", "item 1 \"70000\" is not a port number"),
        ("-1", "item 1 \"-1\" is not a port number"),
        ("0", "item 1 \"0\" is not allowed"),
        ("5001,5002,5001", "item 3 \"5001\" is a duplicate"),
    ];
    for (input, expected) in cases {
        let err = parse_ports(input).unwrap_err();
        assert!(err.contains(expected), "{input:?}: {err}");
    }
}

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn merge_keeps_absent_fields() {
    let current = Faults {
        fail_health: true,
        latency_ms: 10,
        ..Faults::default()
    };
    let merged = merge_faults(&current, &object(json!({"error_rate": 0.5}))).unwrap();
    assert_eq!(
        merged,
        Faults {
            error_rate: 0.5,
            ..current.clone()
        }
    );
    assert_eq!(merge_faults(&current, &object(json!({}))).unwrap(), current);
}

#[test]
fn merge_validates_each_field() {
    let cases = [
        (json!({"error_rate": 1.01}), "error_rate"),
        (json!({"error_rate": "x"}), "error_rate"),
        (json!({"error_status": 199}), "error_status"),
        (json!({"error_status": 70000}), "error_status"),
        (json!({"latency_ms": 60001}), "latency_ms"),
        (json!({"latency_ms": -1}), "latency_ms"),
        (json!({"fail_health": null}), "fail_health"),
        (json!({"refuse": true}), "refuse"),
    ];
    for (patch, field) in cases {
        let err = merge_faults(&Faults::default(), &object(patch.clone())).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST, "{patch}");
        assert_eq!(err.field.as_deref(), Some(field), "{patch}");
        assert!(err.message.contains(field), "{patch}: {}", err.message);
    }
    let ok = json!({"error_status": 0, "error_rate": 1, "latency_ms": 60000});
    assert!(merge_faults(&Faults::default(), &object(ok)).is_ok());
}

#[test]
fn faults_deserialize_with_defaults() {
    let f: Faults = serde_json::from_str(r#"{"fail_health":true}"#).unwrap();
    assert_eq!(
        f,
        Faults {
            fail_health: true,
            ..Faults::default()
        }
    );
    let round: Faults = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
    assert_eq!(round, f);
}

#[test]
fn query_params_are_found_and_decoded() {
    let q = Some("a=1&vary=x%2Dy&empty=&plus=a+b&flag&bad=%zz");
    assert_eq!(query_param(q, "a").as_deref(), Some("1"));
    assert_eq!(query_param(q, "vary").as_deref(), Some("x-y"));
    assert_eq!(query_param(q, "empty").as_deref(), Some(""));
    assert_eq!(query_param(q, "plus").as_deref(), Some("a b"));
    assert_eq!(query_param(q, "flag").as_deref(), Some(""));
    assert_eq!(query_param(q, "bad").as_deref(), Some("%zz"));
    assert_eq!(query_param(q, "missing"), None);
    assert_eq!(query_param(None, "a"), None);
    assert_eq!(percent_decode("%41%4"), "A%4");
}

async fn collect(body: PatternBody) -> Vec<u8> {
    body.collect().await.unwrap().to_bytes().to_vec()
}

#[tokio::test]
async fn pattern_body_is_deterministic_and_sized() {
    let total = 3 * CHUNK_SIZE as u64 + 1234;
    let body = PatternBody {
        sent: 0,
        total,
        exact: true,
    };
    assert_eq!(body.size_hint().exact(), Some(total));
    let bytes = collect(body).await;
    assert_eq!(bytes.len() as u64, total);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    let chunked = PatternBody {
        sent: 0,
        total: 10,
        exact: false,
    };
    assert_eq!(chunked.size_hint().exact(), None);
    assert_eq!(collect(chunked).await, (0u8..10).collect::<Vec<_>>());
}

#[test]
fn random_unit_stays_in_range() {
    let samples: Vec<f64> = (0..10_000).map(|_| random_unit()).collect();
    assert!(samples.iter().all(|x| (0.0..1.0).contains(x)));
    let below_half = samples.iter().filter(|x| **x < 0.5).count();
    assert!((3_000..7_000).contains(&below_half), "{below_half}");
}

#[test]
fn admin_paths_are_recognised() {
    assert!(is_admin("/_admin/fault"));
    assert!(is_admin("/_admin"));
    assert!(!is_admin("/_adminx"));
    assert!(!is_admin("/data/_admin/fault"));
}

#[tokio::test]
async fn refusing_after_stop_does_not_rebind() {
    let mb = MockBackends::start(&["127.0.0.1:0".parse().unwrap()])
        .await
        .unwrap();
    let backend = mb.backend(0).clone();
    mb.shutdown().await;
    backend.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    backend.set_faults(Faults::default());
    assert!(backend.inner.control().listener.is_none());
    assert_eq!(backend.faults(), Faults::default());
}
