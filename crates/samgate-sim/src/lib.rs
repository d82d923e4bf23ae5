//! Simulators of the systems samgate talks to, faithful enough for tests, the demo, benchmarks
//! and labs (`samgate simulate …`). Each serves real HTTPS on loopback with a fresh self-signed
//! certificate, exposes `GET /sim/state` and `POST /sim/faults`, and follows the reference notes
//! in `../shared/reference/`.
//!
//! - [`checkpoint`]: a Check Point management server (`/web_api`) and gateways that interpret
//!   `fw sam` / `fw samp` for real.
//! - [`fortigate`]: a FortiGate's REST API: REST API administrator tokens, trusted hosts, the
//!   banned-IP list with expiry, the automation-stitch webhook, the error envelope, and a reboot.
//! - [`flowmon`]: the part of Flowmon's REST API the shim reads (OAuth token, ADS event detail
//!   with the source's MAC address).
//! - [`clock`]: the time the simulators read, injectable so tests can move it by hand.
//! - [`serve`]: the HTTPS listener they share.

pub mod checkpoint;
pub mod clock;
pub mod flowmon;
pub mod fortigate;
pub mod serve;
