//! Compiles `lb/v1/*.proto` with protox (pure Rust, no system `protoc`) and writes the encoded
//! descriptor set next to the generated code, for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "lb/v1/config.proto",
    "lb/v1/discovery.proto",
    "lb/v1/admin.proto",
    "lb/v1/state.proto",
];

/// Messages that appear in configuration files, with the function giving their defaults.
const SERDE_MESSAGES: &[(&str, &str)] = &[
    ("Backend", "backend"),
    ("HealthCheckPolicy", "health_check"),
    ("OutlierPolicy", "outlier"),
    ("CircuitBreakerPolicy", "circuit_breaker"),
    ("RetryPolicy", "retry"),
    ("QueuePolicy", "queue"),
    ("BanPolicy", "ban"),
    ("CachePolicy", "cache"),
    ("HashPolicy", "hash"),
    ("TimeoutPolicy", "timeouts"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out.join("lb_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Policies can be written in a control plane's TOML file under their proto field names; a
    // missing field takes the policy's default, an unknown one is an error naming it.
    let mut builder = tonic_prost_build::configure();
    for (message, default) in SERDE_MESSAGES {
        builder = builder.type_attribute(
            format!(".lb.v1.{message}"),
            format!(
                "#[derive(serde::Deserialize, serde::Serialize)] \
                 #[serde(default = \"crate::defaults::{default}\", deny_unknown_fields)]"
            ),
        );
    }
    // Their durations (`*_ms`) take milliseconds or a string with a unit ("10s").
    for file in &fds.file {
        for message in &file.message_type {
            let name = message.name();
            if !SERDE_MESSAGES.iter().any(|(m, _)| *m == name) {
                continue;
            }
            for field in message.field.iter().filter(|f| f.name().ends_with("_ms")) {
                let with = if field.proto3_optional() {
                    "#[serde(deserialize_with = \"crate::duration::opt_millis\")]"
                } else {
                    "#[serde(deserialize_with = \"crate::duration::millis\")]"
                };
                builder = builder.field_attribute(format!(".lb.v1.{name}.{}", field.name()), with);
            }
        }
    }
    builder.compile_fds(fds)?;
    Ok(())
}
