//! samgate turns Flowmon ADS detections into Check Point SAM quarantines, through Kafka.
//!
//! Module map, in the order data flows:
//! - [`flowmon`]: Flowmon ADS/IDS stdin lines (TSV 14/15/16/17 fields, JSON) → [`flowmon::FlowmonEvent`]; pure.
//! - [`event`]: the Kafka message formats: `samgate.event.v1` events and `samgate.dlq.v1` dead letters.
//! - [`command`]: `samgate.command.v1` operator commands (block, unblock, exempt, unexempt, reconcile).
//! - [`operator`]: the operator's side: `samgate block|unblock|exempt|blocks|explain|reconcile`.
//! - [`pipeline`]: `samgate run`: consume → decode → decide → batch → enforce (send, verify) → report.
//! - [`metrics`]: the one catalogue of Prometheus metrics; [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`shim`]: `samgate shim`, stdin → spool → Kafka, run by ADS as a custom script.
//! - [`flowmon_api`]: the shim's look-up of source MAC addresses in Flowmon's REST API.
//! - [`spool`]: the shim's durable local spool (segments, lock, settle).
//! - [`kafka`]: client configuration and topic set-up shared by every subcommand.
//! - [`enforcer`]: the one interface the pipeline enforces through, whatever the firewall.
//! - [`checkpoint`]: the Check Point Management API client and the `fw sam` / `fw samp` commands it sends.
//! - [`fortigate`]: the FortiOS REST API client (banned-IP list, automation-stitch webhook).
//! - [`feed`]: `samgate feed`, block-list feeds that gateways fetch, built from the state topic.
//! - [`simulate`]: `samgate simulate …`, the simulators of the `samgate-sim` crate as lab servers.
//! - [`demo`]: `samgate demo`, everything above on one machine (in-process Kafka, simulators, ADS generator).
//! - [`secret`]: the redacted type for passwords, API keys and session ids.
//! - [`config`]: the typed configuration (TOML + `SAMGATE_*` env) and its validation.
//! - [`cli`]: subcommands and flags, and ADS's `--name 'value'` parameter style.
//! - [`logging`]: text or JSON logs to stderr and an optional file.

pub mod checkpoint;
pub mod cli;
pub mod command;
pub mod config;
#[cfg(feature = "simulators")]
pub mod demo;
pub mod enforcer;
pub mod event;
pub mod feed;
pub mod flowmon;
pub mod flowmon_api;
pub mod fortigate;
pub mod http;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod secret;
pub mod shim;
#[cfg(feature = "simulators")]
pub mod simulate;
pub mod spool;
