//! The link to the control plane.
//!
//! - [`discovery`]: the configuration stream, ACK/NACK, reconnection, the saved snapshot.
//! - [`report`]: this plane's activity, streamed every second.

pub mod discovery;
pub mod report;
