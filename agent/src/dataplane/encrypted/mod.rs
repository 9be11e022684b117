//! The userspace encrypted VTEP (issue 7; DESIGN.md "Encrypted data
//! plane"): frames from the network's TAP are sealed per host pair and sent
//! as UDP to the peer's encrypted port. This module holds the sans-IO parts:
//! the wire [`codec`] and the anti-[`replay`] window. Keys live in
//! `keys::pair`.

pub mod codec;
pub mod replay;
