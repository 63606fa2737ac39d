//! What operators do to the cluster, shared by the gRPC Admin service and the REST API: each
//! operation validates its input, applies a change through the control plane (validated whole,
//! versioned, saved, published) or reads its state, and logs what it did.
//!
//! - [`keys`]: create API keys, set their tier, block them, list them, show their usage.
//! - [`bans`]: list the bans in force, lift one.
//! - [`policy`]: set a policy, merging the fields given into the one in force.

pub mod bans;
pub mod keys;
pub mod policy;
