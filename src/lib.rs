//! The `madtech` binary's library: the whole-binary configuration, the
//! in-process suite that `madtech up` runs (and the end-to-end tests drive),
//! and the command-line interface over them. Each component's logic lives in
//! its own crate; this crate only wires them together.

pub mod cli;
pub mod config;
pub mod generate;
pub mod suite;

pub use config::MadtechConfig;
