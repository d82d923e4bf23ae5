//! Check Point: the Management API client, its error classes, TLS, and the SAM commands it
//! carries to gateways through `run-script`.
//!
//! - [`sam`]: typed SAM rules rendered as `fw sam` / `fw samp` scripts, and parsers of their output.
//! - [`client`]: sessions, the login budget, `run-script` and `show-task` polling.
//! - [`enforcer`]: the [`Enforcer`](crate::enforcer::Enforcer) of a Check Point target.
//! - [`error`]: [`ApiError`] and [`classify`], the one retry classification.
//! - [`tls`]: CA verification, fingerprint pinning, or (labs) none.

pub mod client;
pub mod enforcer;
pub mod error;
pub mod sam;
pub mod tls;
pub mod unsettled;

pub use client::{ManagementClient, RunScript, Task, TaskDetail, TaskRef, TaskStatus};
pub use error::{classify, ApiError, ErrorClass};
