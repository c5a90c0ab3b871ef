//! The bundled device simulator and load-test tool.
//!
//! - [`device`], [`plan`], [`fleet`]: devices, what each will send (faults included), and the
//!   fleet over real MQTT 5 connections with a ledger of every PUBACK.
//! - [`scenario`]: the scenario files in `load-tests/scenarios/`; [`chaos`]: what a chaos
//!   scenario breaks during the run, and how the time to recover is measured.
//! - [`load`]: what `iotp-load` runs, phase by phase: starts the pipeline ([`stack`]), drives
//!   a scenario through it, reconciles the ledger with the store and the dead-letter archive
//!   ([`audit`]), measures the forward-only ceiling ([`ceiling`]) and writes the [`report`].

pub mod audit;
pub mod ceiling;
pub mod chaos;
pub mod device;
pub mod fleet;
pub mod load;
pub mod plan;
pub mod report;
pub mod scenario;
pub mod stack;
