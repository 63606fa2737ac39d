//! The link to the control plane.
//!
//! - [`discovery`]: the configuration stream, ACK/NACK, reconnection, the saved snapshot.

pub mod discovery;
